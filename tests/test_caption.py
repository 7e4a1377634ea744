"""A CoCa model trained on the digits demo: `caption` from a run and from an export, the
exports' contents, and `eval` on a fusion checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, clean_env, run_train
from mmpretrain.logging.metrics import read_jsonl


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmpretrain.cli", *args], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def coca_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("coca")
    run_train([f"output_dir={tmp}", "name=coca", "optim.steps=12", "checkpoint.every=0",
               "logging.log_every=4", "logging.wandb_mode=disabled",
               f"data.cache_dir={tmp / 'cache'}", "data.batch_size=32",
               "eval.caption_samples=16", "eval.every=6"],
              config="experiments/demo_coca_digits.yaml")
    return tmp / "coca"


def test_training_logs_both_losses_and_caption_eval(coca_run: Path) -> None:
    records = read_jsonl(coca_run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert all("caption_loss" in r and "contrastive_loss" in r for r in train)
    for r in train:
        assert abs(r["loss"] - (r["contrastive_loss"] + 2.0 * r["caption_loss"])) < 1e-4
    evals = [r for r in records if "caption_samples" in r]
    # eval.every=6 over 12 steps: at 6 and 12 (the final evaluation is not repeated)
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[-1]["caption_samples"] == 16
    assert 0.0 <= evals[-1]["caption_class_match"] <= 1.0
    assert "zeroshot_top1" in evals[-1] and "retrieval_t2i_r1" in evals[-1]


def _images(tmp: Path) -> list[str]:
    paths = []
    for i, mode in enumerate(["RGB", "L"]):
        arr = np.random.default_rng(i).integers(0, 255, (20, 24, 3 if mode == "RGB" else 1))
        img = Image.fromarray(arr.squeeze().astype(np.uint8), mode)
        paths.append(str(tmp / f"img{i}.png"))
        img.save(paths[-1])
    return paths


def test_caption_cli_from_run_and_export_agree(coca_run: Path, tmp_path: Path) -> None:
    images = _images(tmp_path)
    greedy = _cli("caption", "--checkpoint", str(coca_run), *images, "--json")
    assert greedy.returncode == 0, greedy.stderr
    rows = [json.loads(line) for line in greedy.stdout.splitlines()]
    assert [r["image"] for r in rows] == images and all(isinstance(r["caption"], str)
                                                        for r in rows)
    beam1 = _cli("caption", "--checkpoint", str(coca_run), *images, "--json", "--beam", "1")
    assert beam1.stdout == greedy.stdout
    assert _cli("caption", "--checkpoint", str(coca_run), *images, "--beam", "3").returncode == 0
    out = tmp_path / "export"
    exported = _cli("export", str(coca_run), str(out))
    assert exported.returncode == 0, exported.stderr
    assert "caption decoder" in exported.stderr
    extra = json.loads((out / "hf" / "mmpretrain_extra.json").read_text())
    assert any(k.startswith("decoder.") for k in extra["unmapped"])
    again = _cli("caption", "--checkpoint", str(out), *images, "--json")
    assert again.returncode == 0, again.stderr
    assert again.stdout == greedy.stdout


def test_caption_cli_errors(coca_run: Path, tmp_path: Path) -> None:
    missing = _cli("caption", "--checkpoint", str(coca_run), str(tmp_path / "nope.jpg"))
    assert missing.returncode == 2 and "nope.jpg" in missing.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    broken = _cli("caption", "--checkpoint", str(coca_run), str(bad))
    assert broken.returncode == 2 and "bad.jpg" in broken.stderr


@pytest.mark.slow
def test_zero3_two_ranks_evaluate_like_one_process(tmp_path: Path) -> None:
    """ZeRO-3 partitions the weights; ranks hold uneven held-out shares and captions end at
    different lengths, yet evaluation neither hangs nor differs from `mmpretrain eval`."""
    run_train([f"output_dir={tmp_path}", "name=z3", "optim.steps=4", "checkpoint.every=0",
               "logging.wandb_mode=disabled", f"data.cache_dir={tmp_path / 'cache'}",
               "data.batch_size=16", "engine.zero_stage=3", "eval.caption_samples=20"],
              config="experiments/demo_coca_digits.yaml", nproc=2)
    logged = [r for r in read_jsonl(tmp_path / "z3" / "metrics.jsonl") if "caption_samples" in r]
    assert logged and logged[-1]["caption_samples"] == 20
    out = _cli("eval", "--checkpoint", str(tmp_path / "z3"), "--json")
    assert out.returncode == 0, out.stderr
    again = json.loads(out.stdout)
    again = again.get("metrics", again)
    for key in ("zeroshot_top1", "zeroshot_top5", "retrieval_images", "retrieval_texts"):
        assert again[key] == pytest.approx(logged[-1][key], abs=1e-6), key
    # A 4-step model has near-tied similarities; the two ranks batch the held-out set
    # differently than one process, so the last bits (and a tie or two) may differ.
    for key in ("retrieval_i2t_r5", "retrieval_t2i_r10"):
        assert again[key] == pytest.approx(logged[-1][key], abs=3 / 297), key
