"""`engine.float8`: the blocks' linear layers through torchao's float8 recipes.

On CPU torch's scaled matmul runs (slowly, through oneDNN), so the real float8 path is
checked here on micro models; speed, and the GPU's own kernels, are for the `gpu` test and
`tests/gpu_session.sh`."""
from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import losses, run_train
from mmpretrain.config.load import ConfigError, load_config
from mmpretrain.engine.float8 import block_linears, convert_float8
from mmpretrain.model import build_model
from mmpretrain.model.task import build_task

pytest.importorskip("torchao")  # in the `dev` extra: skipped only outside `make test`
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

CPU = torch.device("cpu")
MICRO = ["model.size=tiny", "model.vision.width=32", "model.vision.heads=2",
         "model.text.width=32", "model.text.heads=2", "model.embed_dim=32",
         "model.vision.layers=2", "model.text.layers=2"]


def _cfg(*overrides: str):
    return load_config(None, [*MICRO, *overrides])


def test_block_linears_in_float8_and_the_rest_in_precision() -> None:
    cfg = load_config(None, ["model.size=coca_tiny"])
    model = build_model(cfg.model, cfg.loss.kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {id(p) for p in model.parameters()}
    expected = sorted(name for name, _ in block_linears(model))
    names = convert_float8(model, "tensorwise", CPU, micro_batch=32)
    m = cfg.model  # a block: qkv, proj, fc1, fc2; a decoder block also cross q, kv, proj
    assert names == expected
    assert len(names) == 4 * (m.vision.layers + m.text.layers) + 7 * m.fusion.layers
    assert any(".cross." in n for n in names)  # the decoder's cross-attention too
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    in_float8 = sorted(n for n, m in linears.items() if isinstance(m, Float8Linear))
    assert in_float8 == names
    plain = set(linears) - set(names)  # the projections, the decoder's LM head
    assert {"visual.proj", "text.proj"} <= plain and any("lm_head" in n for n in plain)
    after = model.state_dict()
    assert list(after) == list(before)  # checkpoints and exports see the same names
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert {id(p) for p in model.parameters()} == params  # DeepSpeed wraps the same tensors


def _loss_and_grads(task: nn.Module, images: torch.Tensor, tokens: torch.Tensor):
    task.zero_grad()
    loss = task(images, tokens)["loss"]
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in task.named_parameters()
                         if p.grad is not None}


def test_float8_rounds_the_matmuls_and_nothing_else() -> None:
    cfg = _cfg()
    torch.manual_seed(0)
    ref = build_task(cfg, build_model(cfg.model, cfg.loss.kind))
    f8 = copy.deepcopy(ref)
    convert_float8(f8.model, "tensorwise", CPU, micro_batch=8)
    images = torch.rand(8, 3, 32, 32)
    tokens = torch.randint(1, cfg.model.text.vocab_size, (8, cfg.model.text.context_length))
    loss_ref, grads_ref = _loss_and_grads(ref, images, tokens)
    loss_f8, grads_f8 = _loss_and_grads(f8, images, tokens)
    # float8's 3-bit mantissa moves the loss, but not far; an unconverted model would be equal
    assert 1e-6 < abs(loss_f8 - loss_ref) / abs(loss_ref) < 0.05
    assert sorted(grads_f8) == sorted(grads_ref)
    for name, g in grads_ref.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), grads_f8[name].flatten(), dim=0)
        assert cos > 0.97, (name, cos.item())


def test_blocks_with_odd_widths_stay_and_are_named(caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg("model.text.width=40")  # 40 is no multiple of 16: the text blocks stay
    model = build_model(cfg.model, cfg.loss.kind)
    with caplog.at_level(logging.INFO, logger="mmpretrain.engine"):
        names = convert_float8(model, "rowwise", CPU, micro_batch=16)
    assert names and all(n.startswith("visual.") for n in names)
    assert "not multiples of 16 (e.g. text." in caplog.text
    cfg = _cfg("model.text.width=40", "model.vision.width=40")
    with pytest.raises(ValueError, match="nothing would run in float8"):
        convert_float8(build_model(cfg.model, cfg.loss.kind), "tensorwise", CPU, micro_batch=16)


@pytest.mark.parametrize("batch,padded", [(32, False), (24, True)])
def test_only_odd_batches_pad_the_weight_gradient_matmul(batch: int, padded: bool) -> None:
    cfg = _cfg()
    model = build_model(cfg.model, cfg.loss.kind)
    convert_float8(model, "tensorwise", CPU, micro_batch=batch)
    configs = {m.config.pad_inner_dim for m in model.modules() if isinstance(m, Float8Linear)}
    assert configs == {padded}


def test_bad_requests_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg()
    model = build_model(cfg.model, cfg.loss.kind)
    with pytest.raises(ValueError, match="unknown recipe 'delayed'"):
        convert_float8(model, "delayed", CPU, micro_batch=16)
    with pytest.raises(ConfigError, match="engine.float8 needs engine.precision bf16 or fp32"):
        _cfg("engine.float8=tensorwise", "engine.precision=fp16")
    with pytest.raises(ConfigError):
        _cfg("engine.float8=fp8")  # not a recipe
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4")
    with pytest.raises(RuntimeError, match="NVIDIA A100-SXM4 is 8.0"):
        convert_float8(model, "tensorwise", torch.device("cuda"), micro_batch=16)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'mmpretrain\[fp8\]'"):
        convert_float8(model, "tensorwise", CPU, micro_batch=16)
    assert not any(isinstance(m, Float8Linear) for m in model.modules())  # nothing half-done


@pytest.mark.parametrize("compiled", [False, True])
def test_eager_float8_on_a_gpu_is_warned_about(compiled: bool, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cfg = _cfg()
    model = build_model(cfg.model, cfg.loss.kind)  # on CPU: only the device check sees "cuda"
    with caplog.at_level(logging.INFO, logger="mmpretrain.engine"):
        convert_float8(model, "tensorwise", torch.device("cuda"), 16, compiled=compiled)
    assert ("without engine.compile" in caplog.text) is not compiled
    assert "16 linear layers in float8" in caplog.text


def _train(tmp: Path, name: str, *extra: str) -> dict[int, float]:
    run_train([f"output_dir={tmp}", f"name={name}", *MICRO, "data.batch_size=8",
               "engine.zero_stage=1", "logging.log_every=1", "logging.wandb_mode=disabled",
               *extra], config="experiments/tiny_synthetic.yaml", timeout=900)
    return losses(tmp / name)


@pytest.mark.slow
def test_float8_trains_and_its_checkpoints_resume_without_it(tmp_path: Path) -> None:
    ref = _train(tmp_path, "plain", "optim.steps=3", "checkpoint.every=0")
    got = _train(tmp_path, "f8", "optim.steps=3", "checkpoint.every=2", "engine.float8=tensorwise",
                 "checkpoint.save_final=false")
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    assert any(got[s] != ref[s] for s in ref)  # the matmuls really ran in float8
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=0.05), (step, got, ref)
    # the same weights, names and optimizer state: resume the float8 run's step 2 without it
    resumed = _train(tmp_path, "f8", "optim.steps=3", "checkpoint.every=0")
    assert sorted(resumed) == [1, 2, 3] and resumed[3] == pytest.approx(ref[3], rel=0.05)
    assert resumed[2] == got[2] != ref[2]  # steps 1-2 are the float8 run's: it resumed
    assert resumed[3] != got[3]  # and step 3 ran again, without float8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with float8 tensor cores (sm_89+)")
def test_gpu_float8_follows_the_bf16_losses(tmp_path: Path) -> None:
    """bf16 ZeRO-1 compiled, 20 steps: each float8 recipe within the bf16 run's tolerance."""
    common = ["optim.steps=20", "engine.zero_stage=1", "engine.device=cuda",
              "engine.precision=bf16", "engine.compile=true", "checkpoint.every=0",
              "logging.log_every=1", "logging.wandb_mode=disabled"]
    run_train([f"output_dir={tmp_path}", "name=bf16", *common], timeout=900)
    ref = losses(tmp_path / "bf16")
    for recipe in ("tensorwise", "rowwise"):
        run_train([f"output_dir={tmp_path}", f"name={recipe}", *common,
                   f"engine.float8={recipe}"], timeout=900)
        got = losses(tmp_path / recipe)
        assert sorted(got) == sorted(ref), recipe
        for step, loss in ref.items():
            assert abs(got[step] - loss) <= 0.05 * max(1.0, abs(loss)), (recipe, step, got)
