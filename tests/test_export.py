"""`mmpretrain export`: ZeRO consolidation, safetensors, and transformers CLIPModel equivalence.

Tiny runs train a few steps through the real DeepSpeed engine (subprocesses, gloo on CPU); the
exports are compared with the weights DeepSpeed itself holds and with `transformers.CLIPModel`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import REPO, clean_env, free_port, run_train
from mmpretrain.checkpoint.convert import (from_hf_state_dict, hf_config_dict,
                                           hf_incompatibilities, to_hf_state_dict)
from mmpretrain.checkpoint.export import ExportError, export, load_exported
from mmpretrain.config.load import load_config
from mmpretrain.model import build_model

DEMO = "experiments/demo_digits.yaml"
TOL = 1e-4
CAPTIONS = ["a photo of the digit 3", "zero", "  A   Handwritten  SEVEN,\tdrawn quickly by "
            "someone in a great hurry, with far too many words for the context", "Ünïcödé 7"]


def _train(root: Path, name: str, *extra: str, config: str = "experiments/tiny_synthetic.yaml",
           nproc: int = 1) -> Path:
    run_train([f"output_dir={root}", f"name={name}", "optim.steps=3", "checkpoint.every=3",
               "data.batch_size=8", "logging.wandb_mode=disabled", "logging.log_every=1",
               *extra], config=config, nproc=nproc)
    return root / name


def _stage_module(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The `module` weights DeepSpeed wrote for a ZeRO 0-2 checkpoint, without `model.`."""
    file = run / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    module = torch.load(file, map_location="cpu", weights_only=True)["module"]
    return {k.removeprefix("model."): v for k, v in module.items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _text_rows(vocab: int, context: int) -> torch.Tensor:
    """Token rows laid out like ours: sot, ids, eot, 0-padding (one row fills the context)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.zeros(3, context, dtype=torch.long)
    for row, length in zip(rows, (3, 1, context - 2)):
        row[0], row[length + 1] = 2, 3
        row[1:length + 1] = torch.randint(4, vocab, (length,), generator=gen)
    return rows


def _assert_hf_matches(out: Path, tokens: torch.Tensor | None = None) -> dict[str, float]:
    """CLIPModel.from_pretrained(out/hf) embeds like our model loaded from out/model.safetensors."""
    from transformers import CLIPModel

    state, cfg = load_exported(out)
    ours = build_model(cfg.model, cfg.loss.kind).eval()
    ours.load_state_dict(state)
    hf = CLIPModel.from_pretrained(out / "hf").eval()
    size = cfg.model.vision.image_size
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    if tokens is None:
        tokens = _text_rows(cfg.model.text.vocab_size, cfg.model.text.context_length)
    with torch.no_grad():
        img = (ours.encode_image(images, normalize=False)
               - hf.get_image_features(pixel_values=images).pooler_output).abs().max().item()
        txt = (ours.encode_text(tokens, normalize=False) - hf.get_text_features(
            input_ids=tokens, attention_mask=(tokens != 0).long()).pooler_output)
    diffs = {"image": img, "text": txt.abs().max().item()}
    assert diffs["image"] < TOL and diffs["text"] < TOL, diffs
    return diffs


# ---- the key mapping alone (no training) ----------------------------------------------------
def test_mapping_round_trip_and_transformers_equivalence() -> None:
    from transformers import CLIPConfig, CLIPModel

    cfg = load_config("experiments/tiny_synthetic.yaml", ["loss.kind=siglip"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss.kind).eval()
    with torch.no_grad():  # make norms and biases non-trivial
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    state = {**model.state_dict(), "fusion.cross.weight": torch.ones(2, 2)}
    hf_state, unmapped = to_hf_state_dict(state, cfg.model.max_logit_scale)
    assert sorted(unmapped) == ["fusion.cross.weight", "logit_bias"]  # reported, not dropped
    back = from_hf_state_dict(hf_state)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items() if k != "logit_bias")
    hf = CLIPModel(CLIPConfig(**hf_config_dict(cfg.model, model, {"pad": 0, "sot": 2, "eot": 3})))
    hf.load_state_dict(hf_state, strict=True)
    assert hf.config.text_config.hidden_act == "gelu"
    tokens = _text_rows(cfg.model.text.vocab_size, cfg.model.text.context_length)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval().get_image_features(pixel_values=images).pooler_output,
                                   model.encode_image(images, normalize=False), atol=TOL, rtol=0)
        torch.testing.assert_close(hf.get_text_features(input_ids=tokens).pooler_output,
                                   model.encode_text(tokens, normalize=False), atol=TOL, rtol=0)


def test_what_transformers_cannot_express_is_refused() -> None:
    assert hf_incompatibilities(load_config(None, ["model.vision.pool=cls"]).model) == []
    problems = hf_incompatibilities(load_config(None, ["model.vision.pool=mean"]).model)
    assert problems and "mean" in problems[0]
    big = {"logit_scale": torch.tensor([10.0])}  # exp(10) > max_logit_scale=100
    assert to_hf_state_dict(big, 100.0)[0]["logit_scale"].item() == pytest.approx(np.log(100.0))
    cfg = load_config(None)
    with pytest.raises(ValueError, match="legacy"):
        hf_config_dict(cfg.model, build_model(cfg.model), {"pad": 0, "sot": 1, "eot": 2})


# ---- demo run: bf16, ZeRO-0, real tokenizer -------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export_demo")
    return _train(root, "demo", "optim.steps=2", "checkpoint.every=2", "engine.zero_stage=0",
                  "engine.precision=bf16", "eval.at_end=false", f"data.cache_dir={root / 'c'}",
                  config=DEMO)


def test_demo_bf16_stage0_export_matches_transformers(demo_run: Path, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer

    from mmpretrain.data.decode import normalize
    from mmpretrain.data.tokenize import load_tokenizer

    report = export(demo_run, tmp_path / "out")
    assert "master" in report.weights_from and report.step == 2 and not report.unmapped
    state, cfg = load_exported(tmp_path / "out")
    assert cfg == load_config(demo_run / "config.yaml") == load_config(tmp_path / "out" /
                                                                        "config.yaml")
    module = _stage_module(demo_run, 2)  # bf16: the exported fp32 masters round to them
    assert all(torch.equal(state[k].to(torch.bfloat16), v) for k, v in module.items())
    assert any(not torch.equal(state[k], v.float()) for k, v in module.items())
    tok = load_tokenizer(str(demo_run / "tokenizer"))
    ours = tok.encode(CAPTIONS, cfg.model.text.context_length)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "hf")
    enc = hf_tok(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ours)
    _assert_hf_matches(tmp_path / "out", ours)
    size = cfg.model.vision.image_size  # at the model's size the processor only normalizes
    img = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels = AutoImageProcessor.from_pretrained(tmp_path / "out" / "hf")(
        images=img, return_tensors="pt")["pixel_values"]
    expect = normalize(torch.from_numpy(img).permute(2, 0, 1)[None], cfg.data.mean, cfg.data.std)
    torch.testing.assert_close(pixels, expect, atol=1e-5, rtol=0)
    extra = json.loads((tmp_path / "out" / "hf" / "mmpretrain_extra.json").read_text())
    assert extra["logit_bias"] is None and extra["text"]["eot_id"] == 3


def test_cli_checkpoint_dir_bf16_no_hf(demo_run: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open

    from mmpretrain.cli import main

    ckpt = demo_run / "checkpoints" / "step_00000002"
    assert main(["export", str(ckpt), str(tmp_path / "o"), "--dtype", "bf16", "--no-hf"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["export"]["step"] == 2
    assert not (tmp_path / "o" / "hf").exists()
    with safe_open(str(tmp_path / "o" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        meta_cfg = yaml.safe_load(f.metadata()["mmpretrain_config"])
    assert meta_cfg == yaml.safe_load((demo_run / "config.yaml").read_text())
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 1  # clear error
    assert "neither a run directory" in capsys.readouterr().err


def test_mean_pooling_refuses_hf_export(demo_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "mean"
    shutil.copytree(demo_run / "checkpoints", run / "checkpoints")
    tree = yaml.safe_load((demo_run / "config.yaml").read_text())
    tree["model"]["vision"]["pool"] = "mean"
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ExportError, match="--no-hf"):
        export(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything
    export(run, tmp_path / "out", hf=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_run_from_another_machine_without_its_attention_files(demo_run: Path,
                                                              tmp_path: Path) -> None:
    """A run trained with model.attention_speeds / attention_tiles exports and loads for
    evaluation where those files are not: they only chose kernels (a warning, not an error)."""
    from mmpretrain.checkpoint.load import load_for_inference

    run = tmp_path / "moved"
    shutil.copytree(demo_run / "checkpoints", run / "checkpoints")
    shutil.copytree(demo_run / "tokenizer", run / "tokenizer")
    tree = yaml.safe_load((demo_run / "config.yaml").read_text())
    tree["model"]["attention_speeds"] = "/elsewhere/attention.json"
    tree["model"]["attention_tiles"] = "/elsewhere/tiles.json"
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    export(run, tmp_path / "out", hf=False)
    state, cfg = load_exported(tmp_path / "out")
    assert cfg.model.attention_speeds == "/elsewhere/attention.json"  # the record is kept
    for source in (run, tmp_path / "out"):
        cfg, model, tokenizer = load_for_inference(source)
        assert tokenizer is not None and cfg.model.attention_tiles == "/elsewhere/tiles.json"
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---- ZeRO-2 and ZeRO-3 on two ranks, SigLIP ---------------------------------------------------
# eps=1 makes Adam's first steps gradient-proportional (not sign-like), so two engines agree to
# fp32 round-off even where a gradient is pure cancellation noise.
ZERO_COMMON = ("loss.kind=siglip", "optim.eps=1.0", "optim.lr=0.05")


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("export_z2"), "z2", "engine.zero_stage=2",
                  *ZERO_COMMON, nproc=2)


def test_zero2_two_ranks_siglip(zero2_run: Path, tmp_path: Path) -> None:
    report = export(zero2_run, tmp_path / "out")
    assert "ZeRO" in report.weights_from and report.unmapped == ["logit_bias"]
    assert any("no tokenizer" in w for w in report.warnings)
    state, _ = load_exported(tmp_path / "out")
    # ZeRO-2 in fp32 also saves the full module; the merged optimizer partitions must equal it
    assert _max_diff(state, _stage_module(zero2_run, 3)) == 0.0
    extra = json.loads((tmp_path / "out" / "hf" / "mmpretrain_extra.json").read_text())
    assert extra["logit_bias"] == pytest.approx(state["logit_bias"].item())
    assert extra["unmapped"] == {"logit_bias": [1]}
    _assert_hf_matches(tmp_path / "out")


LIVE_SCRIPT = """
import sys, deepspeed, torch
from mmpretrain.config.load import load_config
from mmpretrain.engine.trainer import Trainer
trainer = Trainer(load_config(sys.argv[1] + "/config.yaml"))
assert trainer.resume()
with deepspeed.zero.GatheredParameters(list(trainer.task.parameters())):
    if trainer.rank == 0:
        torch.save({n: p.detach().clone() for n, p in trainer.task.named_parameters()}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("export_z3"), "z3", "engine.zero_stage=3",
                  *ZERO_COMMON, nproc=2)


@pytest.mark.slow
def test_zero3_two_ranks_equals_live_engine(zero3_run: Path, tmp_path: Path) -> None:
    """The export equals the parameters a 2-rank ZeRO-3 engine holds after loading the
    checkpoint (gathered from both ranks' partitions)."""
    export(zero3_run, tmp_path / "out")
    state, _ = load_exported(tmp_path / "out")
    script, live_file = tmp_path / "live.py", tmp_path / "live.pt"
    script.write_text(LIVE_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
           str(zero3_run), str(live_file)]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    live = torch.load(live_file, weights_only=True)
    assert _max_diff(state, {k.removeprefix("model."): v for k, v in live.items()}) == 0.0
    _assert_hf_matches(tmp_path / "out")


@pytest.mark.slow
def test_zero3_training_matches_zero2(zero2_run: Path, zero3_run: Path, tmp_path: Path) -> None:
    export(zero3_run, tmp_path / "o3", hf=False)
    export(zero2_run, tmp_path / "o2", hf=False)
    s3, cfg = load_exported(tmp_path / "o3")
    s2, _ = load_exported(tmp_path / "o2")
    torch.manual_seed(cfg.seed)
    assert _max_diff(s2, build_model(cfg.model, cfg.loss.kind).state_dict()) > 1e-3  # it trained
    assert _max_diff(s3, s2) < 1e-5
