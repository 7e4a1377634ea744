"""`mmpretrain plot`: PNG curves from metrics.jsonl files."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mmpretrain.cli import main
from mmpretrain.logging.plot import FIGSIZE, Run, plot_runs


def _write_run(run_dir: Path, caption: bool, mfu: bool) -> None:
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, 21):
        rec = {"step": step, "loss": 3.0 - 0.1 * step, "lr": 1e-3 * min(1, step / 5),
               "samples_per_s": 200.0 + step, "data_wait_frac": 0.05,
               "tflops_per_s": 0.02, "grad_norm": float("nan")}
        if caption:
            rec.update(contrastive_loss=1.0 - 0.02 * step, caption_loss=1.0 - 0.04 * step)
        if mfu:
            rec["mfu"] = 0.3
        lines.append(json.dumps(rec))
        if step % 10 == 0:
            lines.append(json.dumps({"step": step, "zeroshot_top1": 0.05 * step,
                                     "zeroshot_samples": 297, "retrieval_i2t_r1": 0.02 * step}))
    lines.append('{"step": 21, "loss": 1.')  # torn by a crash while appending
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert chunk == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def test_two_runs_render_to_a_png_of_the_expected_size(tmp_path: Path) -> None:
    _write_run(tmp_path / "clip", caption=False, mfu=False)
    _write_run(tmp_path / "coca", caption=True, mfu=True)
    out = plot_runs([tmp_path / "clip", tmp_path / "coca"], tmp_path / "x" / "curves.png", dpi=40)
    assert _png_size(out) == (int(FIGSIZE[0] * 40), int(FIGSIZE[1] * 40))
    run = Run(tmp_path / "coca", "coca")
    assert len(run.train) == 20 and len(run.evals) == 2  # torn line skipped
    assert run.eval_keys() == ["retrieval_i2t_r1", "zeroshot_top1"]  # no counts


def test_cli_default_output_and_empty_panels(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "bare"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert main(["plot", str(run_dir), "--dpi", "30"]) == 0
    assert _png_size(run_dir / "metrics.png") == (int(FIGSIZE[0] * 30), int(FIGSIZE[1] * 30))
    assert str(run_dir / "metrics.png") in capsys.readouterr().out


def test_cli_names_a_run_dir_without_metrics(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    _write_run(tmp_path / "good", caption=False, mfu=False)
    missing = tmp_path / "nothing-here"
    assert main(["plot", str(tmp_path / "good"), str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "metrics.jsonl" in err
    assert not (tmp_path / "good" / "metrics.png").exists()
