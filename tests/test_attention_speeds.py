"""Measured dispatch (`kernels/speeds.py`, `model.attention_speeds`): `auto` on CUDA takes the
Triton kernel for the shape classes a `bench attention --json` file timed it faster than every
SDPA backend, separately with and without the backward; SDPA everywhere else."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmpretrain import kernels
from mmpretrain.kernels import speeds


def _cell(impl: str, dims: list[int], fwd: float | None, fwd_bwd: float | None,
          causal: bool = False, dtype: str = "bfloat16") -> dict:
    rec = {"impl": impl, "shape": "x", "dims": dims, "causal": causal, "dtype": dtype}
    if fwd is None:
        rec["error"] = "OutOfResources: out of shared memory"
    else:
        rec.update(fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, fwd_tflops=1.0, fwd_bwd_tflops=1.0)
    return rec


B16, L14, TEXT = [256, 12, 197, 197, 64], [128, 16, 257, 257, 64], [512, 8, 77, 77, 64]
RECORDS = [
    # ViT-B/16: Triton faster with the backward (0.7 < 0.82), slower forward (0.25 > 0.2)
    _cell("triton", B16, 0.25, 0.70), _cell("triton_fused", B16, 0.25, 0.60),
    _cell("sdpa_flash", B16, 0.30, 1.36), _cell("sdpa_cudnn", B16, 0.20, 0.82),
    # L/14: Triton failed to launch -> no entry
    _cell("triton", L14, None, None), _cell("sdpa_cudnn", L14, 0.25, 1.0),
    # text: Triton faster at batch 512, slower at batch 256 -> not taken
    _cell("triton", TEXT, 0.10, 0.40, causal=True), _cell("sdpa_cudnn", TEXT, 0.12, 0.51, True),
    _cell("triton", [256, 8, 77, 77, 64], 0.06, 0.30, True),
    _cell("sdpa_cudnn", [256, 8, 77, 77, 64], 0.07, 0.26, True),
    # a shape without any SDPA measurement -> no entry
    _cell("triton", [8, 16, 4096, 4096, 128], 1.0, 3.0),
]


@pytest.fixture(autouse=True)
def _clean_table():
    speeds.clear_speed_table()
    kernels.set_default_impl("auto")
    yield
    speeds.clear_speed_table()
    kernels.set_default_impl("auto")


def _write(tmp_path: Path, records: list | None = None, gpu: str = "NVIDIA H200",
           name: str = "attention.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"meta": {"gpu": gpu, "torch": "2.11.0"},
                                "records": RECORDS if records is None else records}))
    return path


def _q(sq: int, dim: int = 64, grad: bool = True, dtype: torch.dtype = torch.bfloat16):
    """Stands in for a CUDA query (B, H, Sq, D): what dispatch reads of it, nothing more."""
    return SimpleNamespace(device=torch.device("cuda"), shape=(2, 12, sq, dim), dtype=dtype,
                           requires_grad=grad)


def test_choices_per_shape_class(tmp_path: Path) -> None:
    table = speeds.load_speed_table(_write(tmp_path))
    assert set(table) == {(197, 197, 64, False, "bfloat16"), (77, 77, 64, True, "bfloat16")}
    b16 = speeds.lookup(197, 197, 64, False, torch.bfloat16)
    assert b16 is not None and b16.train and not b16.infer
    assert (b16.triton_fwd_bwd, b16.sdpa_fwd_bwd, b16.sdpa_names) == (0.70, 0.82, "sdpa_cudnn")
    text = speeds.lookup(77, 77, 64, True, torch.bfloat16)
    assert text is not None and not text.train and text.infer  # lost once with the backward
    assert text.triton_fwd_bwd == pytest.approx(0.70) and text.sdpa_fwd_bwd == pytest.approx(0.77)
    assert speeds.lookup(257, 257, 64, False, torch.bfloat16) is None  # triton failed there
    assert speeds.lookup(197, 197, 64, False, torch.float16) is None  # another dtype
    assert speeds.lookup(197, 197, 64, True, torch.bfloat16) is None  # causal is its own class


def test_auto_dispatch_follows_the_table(tmp_path: Path) -> None:
    assert kernels.resolve_impl("auto", _q(197)) == "sdpa"  # no table: SDPA on CUDA
    speeds.load_speed_table(_write(tmp_path))
    assert kernels.resolve_impl("auto", _q(197)) == "triton"  # training call, faster
    with torch.no_grad():
        assert kernels.resolve_impl("auto", _q(197)) == "sdpa"  # forward alone, slower
    assert kernels.resolve_impl("auto", _q(197, grad=False)) == "sdpa"
    assert kernels.resolve_impl("auto", _q(197), padded=True) == "sdpa"  # not measured
    assert kernels.resolve_impl("auto", _q(197), sk=257) == "sdpa"  # cross-attention class
    assert kernels.resolve_impl("auto", _q(77), causal=True) == "sdpa"
    assert kernels.resolve_impl("auto", _q(77, grad=False), causal=True) == "triton"
    assert kernels.resolve_impl("auto", _q(197, dtype=torch.float16)) == "sdpa"
    assert kernels.resolve_impl("sdpa", _q(197)) == "sdpa"  # an explicit choice wins
    kernels.set_default_impl("sdpa")  # model.attention=sdpa forces it everywhere
    assert kernels.resolve_impl("auto", _q(197)) == "sdpa"
    cpu_q = torch.randn(2, 12, 197, 64, requires_grad=True)
    kernels.set_default_impl("auto")
    assert kernels.resolve_impl("auto", cpu_q) == "reference"  # off CUDA, never the table


def test_dynamo_traces_the_choice_and_guards_grad_mode(tmp_path: Path) -> None:
    """Inside torch.compile (fullgraph, as the compiled blocks are) the choice is traced, not
    a graph break, and a call without gradients is not served the training call's graph."""
    dims = [2, 2, 8, 8, 16]
    speeds.load_speed_table(_write(tmp_path, [
        {**_cell("triton", dims, 0.3, 0.1), "dtype": "float32"},  # wins only with backward
        {**_cell("sdpa_cudnn", dims, 0.2, 0.2), "dtype": "float32"}]))

    @torch.compile(fullgraph=True, backend="eager")
    def pick(q: torch.Tensor) -> torch.Tensor:
        return q * 2 if speeds.prefers_triton(q, 8, False, False) else q * 3

    q = torch.ones(2, 2, 8, 16, requires_grad=True)
    assert pick(q).flatten()[0].item() == 2
    with torch.no_grad():
        assert pick(q).flatten()[0].item() == 3


@pytest.mark.parametrize("content, match", [
    ("not json", "not a `mmpretrain bench attention --json` file"),
    ({"records": {"a": 1}}, "records is not a list"),
    ({"meta": {}, "records": [{"shape": "vit_b16", "kernel": "fwd", "config": {}, "ms": 1.0}]},
     r"record 0 .*a --sweep file\? use it as model.attention_tiles"),
    ({"records": [{"impl": "triton", "dims": [1, 2, 3], "causal": False, "dtype": "bf16"}]},
     "record 0 is not a bench attention cell"),
    ({"records": [_cell("sdpa_cudnn", B16, 0.2, 0.8), {**_cell("triton", B16, 0.1, 0.5),
                                                       "fwd_bwd_ms": "fast"}]},
     "record 1 is not a bench attention cell"),
])
def test_unusable_files_name_themselves_and_keep_the_table(tmp_path: Path, content: object,
                                                           match: str) -> None:
    speeds.load_speed_table(_write(tmp_path, name="good.json"))
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=match) as err:
        speeds.load_speed_table(path)
    assert str(path) in str(err.value)
    assert speeds.lookup(197, 197, 64, False, torch.bfloat16) is not None  # kept
    with pytest.raises(ValueError, match="no.json"):
        speeds.load_speed_table(tmp_path / "no.json")


def test_load_logs_every_choice_and_warns_about_another_gpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    with caplog.at_level(logging.INFO, logger="mmpretrain.kernels"):
        speeds.load_speed_table(_write(tmp_path))
    text = caplog.text
    assert "measured on NVIDIA H200): 2 shape classes" in text
    assert "Sq=197 Sk=197 D=64 causal=False bfloat16: training triton (triton 0.700 ms vs " \
           "0.820 fwd+bwd), no grad sdpa" in text
    assert "measured on NVIDIA H200, this is NVIDIA H100 80GB HBM3" in text


def test_config_and_model_build(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mmpretrain.config import load_config
    from mmpretrain.config.load import ConfigError
    from mmpretrain.model import build_model, local_model_config

    path = _write(tmp_path)
    with pytest.raises(ConfigError, match="model.attention_speeds needs model.attention=auto"):
        load_config(None, ["model.size=tiny", "model.attention=triton",
                           f"model.attention_speeds={path}"])
    cfg = load_config(None, ["model.size=tiny", f"model.attention_speeds={path}"])
    build_model(cfg.model)
    assert speeds.lookup(197, 197, 64, False, torch.bfloat16) is not None
    assert local_model_config(cfg.model) is cfg.model  # the file is here: kept
    missing = load_config(None, ["model.size=tiny",
                                 f"model.attention_speeds={tmp_path / 'gone.json'}",
                                 f"model.attention_tiles={tmp_path / 'tiles.json'}"])
    with pytest.raises(ValueError, match="tiles.json"):  # training asked for them: loud
        build_model(missing.model)
    with pytest.raises(ValueError, match="gone.json"):
        build_model(replace(missing.model, attention_tiles=""))
    with caplog.at_level(logging.WARNING, logger="mmpretrain.model"):
        local = local_model_config(missing.model, "run r1")
        assert local_model_config(missing.model, "run r1") == local  # warned once
    assert local.attention_speeds == "" and local.attention_tiles == ""
    assert "run r1 names model.attention_speeds=" in caplog.text and "gone.json" in caplog.text
    assert "model.attention_tiles=" in caplog.text and caplog.text.count("gone.json") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_runs_what_the_table_chose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the table's choice is what runs: Triton for the class it won (training calls),
    SDPA for the class it lost and for calls without gradients, equal results either way."""
    ran: list[str] = []
    for name in ("triton", "sdpa"):
        fn = kernels._IMPLS[name]
        monkeypatch.setitem(kernels._IMPLS, name,
                            lambda *a, _fn=fn, _name=name, **k: ran.append(_name) or _fn(*a, **k))
    dims = [4, 2, 40, 40, 32]
    speeds.load_speed_table(_write(tmp_path, [
        _cell("triton", dims, 0.2, 0.5), _cell("sdpa_cudnn", dims, 0.1, 0.6),
        _cell("triton", dims, 0.2, 0.9, causal=True), _cell("sdpa_cudnn", dims, 0.1, 0.6, True)]))
    q, k, v = (torch.randn(4, 2, 40, 32, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    out = kernels.attention(q, k, v)
    with torch.no_grad():
        ref = kernels.attention(q, k, v)
    kernels.attention(q, k, v, causal=True)
    assert ran == ["triton", "sdpa", "sdpa"]
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    out.float().square().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
