"""Pure engine pieces: AdamW parameter groups, the lr schedule, the DeepSpeed config, precision
resolution, the step meter and the metrics.jsonl writer/formatter."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mmpretrain.config.load import load_config
from mmpretrain.config.schema import OptimConfig
from mmpretrain.engine.ds_config import precision_dtype, resolve_precision
from mmpretrain.engine.optim import (AdamWSkipNonFinite, build_optimizer, build_scheduler,
                                     lr_factor, no_decay, optimizer_impl, param_groups)
from mmpretrain.engine.stepflags import LaggedFlags, StepFlags
from mmpretrain.logging import metrics
from mmpretrain.logging.metrics import (JsonlWriter, StepMeter, format_metrics, peak_memory_gb,
                                        read_jsonl)
from mmpretrain.model import build_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # constructing a cuda device needs no GPU


# ---- parameter groups --------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["clip", "siglip"])
def tiny_model(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(None).model, request.param)


def _by_id(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def test_param_groups_partition_every_trainable_param(tiny_model: nn.Module) -> None:
    groups = param_groups(tiny_model, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    trainable = {id(p) for p in tiny_model.parameters() if p.requires_grad}
    assert set(ids) == trainable
    names = _by_id(tiny_model)
    decay = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    # every weight matrix (and conv kernel, positional table) decays ...
    assert decay == {n for n, p in tiny_model.named_parameters() if p.ndim >= 2}
    # ... and every 1-d tensor (norm weights, biases, class embedding, logit scale/bias) does not
    assert plain == {n for n, p in tiny_model.named_parameters() if p.ndim < 2}
    for must_be_plain in ("logit_scale", "visual.class_embedding", "visual.ln_pre.weight",
                          "visual.ln_pre.bias", "visual.transformer.blocks.0.attn.qkv.bias",
                          "text.transformer.blocks.0.ln1.weight"):
        assert must_be_plain in plain
    for must_decay in ("visual.patch_embed.weight", "visual.proj.weight",
                       "visual.transformer.blocks.0.attn.qkv.weight",
                       "visual.transformer.blocks.0.mlp.fc2.weight",
                       "text.token_embedding.weight"):
        assert must_decay in decay
    if getattr(tiny_model, "logit_bias", None) is not None:
        assert "logit_bias" in plain


def test_param_groups_skip_frozen_params(tiny_model: nn.Module) -> None:
    frozen = [tiny_model.visual.proj.weight, tiny_model.visual.ln_post.bias]
    try:
        for p in frozen:
            p.requires_grad_(False)
        ids = {id(p) for g in param_groups(tiny_model, 0.1) for p in g["params"]}
        assert not ids & {id(p) for p in frozen}
        assert len(ids) == sum(1 for p in tiny_model.parameters() if p.requires_grad)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def test_logit_names_never_decay_even_as_matrices() -> None:
    m = nn.Module()
    m.logit_scale = nn.Parameter(torch.zeros(1, 1))
    m.logit_bias = nn.Parameter(torch.zeros(2, 2))
    m.weight = nn.Parameter(torch.zeros(2, 2))
    m.scale = nn.Parameter(torch.zeros(()))
    decay, plain = param_groups(m, 0.1)
    assert [id(p) for p in decay["params"]] == [id(m.weight)]
    assert {id(p) for p in plain["params"]} == {id(m.logit_scale), id(m.logit_bias), id(m.scale)}
    assert no_decay("model.logit_scale", m.logit_scale)
    assert not no_decay("model.weight", m.weight)


def test_build_optimizer_cpu(tiny_model: nn.Module) -> None:
    cfg = OptimConfig(lr=3e-4, weight_decay=0.2, betas=[0.9, 0.95], eps=1e-8)
    opt = build_optimizer(tiny_model, cfg, CPU)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == 3e-4 and g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8
        assert not g["fused"] and not g["foreach"]  # auto on CPU: the per-parameter loop


@pytest.mark.parametrize("impl", ["fused", "foreach", "loop"])
def test_optimizer_impls_agree(tiny_model: nn.Module, impl: str) -> None:
    """`optim.impl` picks torch's AdamW kernel; three steps of each give the loop's weights to
    rounding."""
    def run(which: str) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(tiny_model)
        cfg = OptimConfig(lr=1e-2, impl=which)  # type: ignore[arg-type]
        opt = build_optimizer(model, cfg, CPU)
        g = opt.param_groups[0]
        assert bool(g["fused"]) == (which == "fused")
        assert bool(g["foreach"]) == (which == "foreach")
        for step in range(3):
            torch.manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        return {n: p.detach() for n, p in model.named_parameters()}

    want, got = run("loop"), run(impl)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert optimizer_impl(OptimConfig(), torch.device("cuda")) == "fused"


@pytest.mark.parametrize("impl", ["fused", "foreach", "loop"])
def test_nonfinite_step_is_skipped_on_device_or_host(impl: str) -> None:
    """A NaN gradient leaves weights, moments and the step count untouched; the next finite
    step updates. Fused: the flag reaches the kernel as `found_inf` (the CUDA path, no host
    read); the fused CPU kernel takes the same argument, so the path is tested here."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    opt = AdamWSkipNonFinite(model.parameters(), lr=0.1, weight_decay=0.1, **kwargs)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    model.weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skip_flag is not None and opt.skip_flag.shape == () and opt.skip_flag.item() == 1
    assert not hasattr(opt, "found_inf")  # never left behind for a later step
    after = (model.state_dict(), opt.state_dict())
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k
    for i, st in before[1]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after[1]["state"][i][k]), (i, k)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.skip_flag.item() == 0
    assert not torch.equal(model.weight, before[0]["weight"])
    assert all(float(st["step"]) == 2 for st in opt.state.values())


def test_lagged_flags_read_one_step_late() -> None:
    flags = LaggedFlags(CPU, world=1)
    assert flags.push(1, torch.zeros(()), stop=False) == []
    assert flags.push(2, torch.ones(()), stop=False) == [StepFlags(1, False, False)]
    # None: the optimizer was not called (DeepSpeed's fp16 overflow skip) -> skipped
    assert flags.push(3, None, stop=True) == [StepFlags(2, True, False)]
    assert flags.drain() == [StepFlags(3, True, True)]
    assert flags.drain() == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_reading_a_steps_flags_leaves_the_next_step_queued() -> None:
    """Reading step 1's flags after step 2 is queued waits for step 1 only: step 2's work
    (here a ~0.5 s spin of the GPU) is still running when `push` returns. A plain `.tolist()`
    of the device tensor would wait for the spin too, leaving the GPU's queue empty."""
    cuda = torch.device("cuda")
    flags = LaggedFlags(cuda, world=1)
    assert flags.push(1, torch.ones((), device=cuda), stop=False) == []
    torch.cuda._sleep(1_000_000_000)  # step 2's work: ~0.5 s at 2 GHz
    assert flags.push(2, torch.zeros((), device=cuda), stop=True) == [StepFlags(1, True, False)]
    still_queued = not torch.cuda.current_stream().query()
    assert flags.drain() == [StepFlags(2, False, True)]  # now it waits for step 2
    assert still_queued


# ---- learning-rate schedule --------------------------------------------------------------------
def test_warmup_is_linear_to_one() -> None:
    cfg = OptimConfig(steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    got = [lr_factor(s, cfg) for s in range(10)]
    assert got == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(9, cfg) == 1.0
    diffs = [b - a for a, b in zip(got, got[1:])]
    assert diffs == pytest.approx([0.1] * 9)


def test_cosine_shape_and_end() -> None:
    cfg = OptimConfig(steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(10, cfg) == pytest.approx(1.0)          # first step after warm-up: peak
    assert lr_factor(60, cfg) == pytest.approx(0.55)         # half way: (1 + min) / 2
    assert lr_factor(35, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    after = [lr_factor(s, cfg) for s in range(10, 111)]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:])), "cosine must not increase"
    # the lr after the last optimizer step (what the trainer logs at step == steps) is the floor
    assert lr_factor(110, cfg) == pytest.approx(0.1, abs=1e-12)
    # the last update itself (0-based step steps-1) is within one step of the floor
    assert 0.1 < lr_factor(109, cfg) < 0.1 + 1e-3
    # and it never goes below the floor or comes back up past the end
    assert all(lr_factor(s, cfg) == pytest.approx(0.1) for s in (111, 150, 10_000))
    assert min(after) >= 0.1 - 1e-12


def test_cosine_min_zero_and_no_warmup() -> None:
    cfg = OptimConfig(steps=50, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0)
    assert lr_factor(0, cfg) == 1.0
    assert lr_factor(25, cfg) == pytest.approx(0.5)
    assert lr_factor(50, cfg) == pytest.approx(0.0, abs=1e-12)


def test_warmup_longer_than_run_does_not_divide_by_zero() -> None:
    cfg = OptimConfig(steps=5, warmup_steps=10, schedule="cosine", min_lr_ratio=0.0)
    assert [lr_factor(s, cfg) for s in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(11, cfg) == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule() -> None:
    cfg = OptimConfig(steps=40, warmup_steps=4, schedule="constant", min_lr_ratio=0.3)
    assert [lr_factor(s, cfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(lr_factor(s, cfg) == 1.0 for s in range(4, 60))
    no_warm = OptimConfig(steps=40, warmup_steps=0, schedule="constant")
    assert all(lr_factor(s, no_warm) == 1.0 for s in range(0, 41))


def _one_param_optimizer(lr: float) -> torch.optim.Optimizer:
    m = nn.Linear(2, 2)
    return torch.optim.AdamW(param_groups(m, 0.1), lr=lr, foreach=False)


def test_build_scheduler_follows_lr_factor() -> None:
    cfg = OptimConfig(steps=20, warmup_steps=5, lr=2e-3, schedule="cosine", min_lr_ratio=0.05)
    opt = _one_param_optimizer(cfg.lr)
    sched = build_scheduler(opt, cfg)
    used = []
    for _ in range(cfg.steps):
        used.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for s, lrs in enumerate(used):  # both groups get the same lr at every step
        assert lrs == pytest.approx([cfg.lr * lr_factor(s, cfg)] * 2), s
    assert used[0][0] == pytest.approx(2e-3 / 5)
    assert used[4][0] == pytest.approx(2e-3)
    assert sched.get_last_lr() == pytest.approx([cfg.lr * 0.05] * 2)


def test_scheduler_state_round_trip() -> None:
    cfg = OptimConfig(steps=30, warmup_steps=3, lr=1e-3)
    opt = _one_param_optimizer(cfg.lr)
    sched = build_scheduler(opt, cfg)
    for _ in range(17):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = _one_param_optimizer(cfg.lr)
    sched2 = build_scheduler(opt2, cfg)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 17
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_factor(18, cfg))


# ---- precision -----------------------------------------------------------------------------------
def test_resolve_precision() -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", CUDA) == "bf16"
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("fp16", CUDA) == "fp16"
    assert resolve_precision("fp32", CUDA) == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", CPU)


def test_precision_dtype() -> None:
    assert precision_dtype("fp32") is torch.float32
    assert precision_dtype("bf16") is torch.bfloat16
    assert precision_dtype("fp16") is torch.float16
    with pytest.raises(KeyError):
        precision_dtype("auto")


# ---- StepMeter -----------------------------------------------------------------------------------
class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock(100.0)
    monkeypatch.setattr(metrics.time, "perf_counter", c)
    return c


def test_step_meter_summary(clock: FakeClock) -> None:
    meter = StepMeter()
    for data_time in (0.5, 0.25, 0.25):
        meter.update(64, data_time)
    clock.t = 104.0
    s = meter.summary()
    assert s == pytest.approx({"samples_per_s": 192 / 4, "step_time_s": 4 / 3,
                               "data_wait_frac": 1.0 / 4})


def test_step_meter_reset_starts_a_new_window(clock: FakeClock) -> None:
    meter = StepMeter()
    meter.update(10, 1.0)
    clock.t = 110.0
    meter.reset()
    assert (meter.steps, meter.samples, meter.data_time) == (0, 0, 0.0)
    meter.update(32, 0.0)
    meter.update(32, 0.5)
    clock.t = 112.0
    assert meter.summary() == pytest.approx({"samples_per_s": 32.0, "step_time_s": 1.0,
                                             "data_wait_frac": 0.25})


def test_step_meter_empty_and_zero_elapsed(clock: FakeClock) -> None:
    meter = StepMeter()
    s = meter.summary()  # no time passed, no steps: no division by zero
    assert s["samples_per_s"] == 0.0 and s["data_wait_frac"] == 0.0
    assert math.isfinite(s["step_time_s"]) and s["step_time_s"] >= 0.0
    clock.t = 103.0
    assert meter.summary()["step_time_s"] == pytest.approx(3.0)


def test_peak_memory_cpu_is_plausible() -> None:
    gb = peak_memory_gb(CPU)
    assert 0.01 < gb < 256


# ---- JsonlWriter ---------------------------------------------------------------------------------
def test_jsonl_write_and_truncate_after(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    w = JsonlWriter(path)
    for step in range(1, 11):
        w.write({"step": step, "loss": 1.0 / step})
        if step % 5 == 0:
            w.write({"step": step, "zeroshot_top1": step / 10})
    w.write({"note": "no step"})
    with open(path, "a") as f:
        f.write("\n   \n")  # blank lines are tolerated and dropped
    assert len(read_jsonl(path)) == 13
    w.truncate_after(5)
    recs = read_jsonl(path)
    assert [r["step"] for r in recs if "step" in r] == [1, 2, 3, 4, 5, 5]
    assert recs[5] == {"step": 5, "zeroshot_top1": 0.5}
    assert recs[-1] == {"note": "no step"}  # a record without a step counts as step 0
    assert path.read_text().endswith("}\n") and "\n\n" not in path.read_text()
    assert not list(tmp_path.glob("*.tmp"))
    w.write({"step": 6, "loss": 0.1})  # appending continues after the kept records
    assert [r.get("step") for r in read_jsonl(path)][-2:] == [None, 6]


def test_truncate_after_edge_cases(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    JsonlWriter(path).truncate_after(3)  # no file yet: nothing to do
    assert not path.exists()
    w = JsonlWriter(path)
    for step in (10, 20, 30):
        w.write({"step": step})
    w.truncate_after(0)
    assert path.read_text() == ""
    for step in (10, 20):
        w.write({"step": step})
    w.truncate_after(100)
    assert [r["step"] for r in read_jsonl(path)] == [10, 20]


def test_disabled_writer_touches_nothing(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    JsonlWriter(path, enabled=False).write({"step": 1})
    assert not path.exists()
    JsonlWriter(path).write({"step": 7})
    JsonlWriter(path, enabled=False).truncate_after(0)
    assert read_jsonl(path) == [{"step": 7}]


def test_truncate_after_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    JsonlWriter(path).truncate_after(2)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


# ---- format_metrics ------------------------------------------------------------------------------
def test_format_metrics_training_line() -> None:
    record = {"step": 10, "total_steps": 300, "loss": 2.30123, "lr": 3.3e-4, "grad_norm": 0.0,
              "samples_per_s": 1234.5678, "data_wait_frac": 0.0001234, "peak_mem_gb": 1.5,
              "samples_seen": 640}
    assert format_metrics(record) == (
        "step 10/300 | loss 2.301 | lr 3.300e-04 | grad_norm 0 | samples_per_s 1235 | "
        "data_wait_frac 1.234e-04 | peak_mem_gb 1.5 | samples_seen 640")


def test_format_metrics_other_cases() -> None:
    # without total_steps the step is shown alone; lr is always in scientific notation
    assert format_metrics({"step": 3, "lr": 0.1}) == "step 3 | lr 1.000e-01"
    # total_steps is never printed as its own field, wherever it appears
    assert format_metrics({"total_steps": 9, "step": 2}) == "step 2/9"
    assert format_metrics({"zeroshot_top1": 0.5, "zeroshot_top5": 0.98765}) == (
        "zeroshot_top1 0.5 | zeroshot_top5 0.9877")
    assert format_metrics({"grad_norm": float("nan"), "status": "ok", "flag": True}) == (
        "grad_norm nan | status ok | flag True")
    assert format_metrics({"x": -2e-5, "y": 123456.0}) == "x -2.000e-05 | y 1.235e+05"
    assert format_metrics({}) == ""


def test_stream_ordered_epilogue_only_where_the_device_orders_the_data(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed on a ZeRO-1/2 optimizer with overlap on the contiguous path and streams that
    DeepSpeed orders by synchronizing; never with CPU offload (the host reads the gradients),
    the other gradient path, overlap off, or where DeepSpeed skips the synchronize itself.
    While installed, the epilogue's synchronize becomes a stream wait and is restored after."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    import mmpretrain.engine.zero_epilogue as ze

    acc = get_accelerator()
    waits: list[tuple[object, object]] = []

    class Stream:
        def wait_stream(self, other: object) -> None:
            waits.append((self, other))

    def fake(**kw: object) -> DeepSpeedZeroOptimizer:
        opt = object.__new__(DeepSpeedZeroOptimizer)
        vars(opt).update(dict(cpu_offload=False, overlap_comm=True, contiguous_gradients=True,
                              reduction_stream=Stream()), **kw)
        return opt

    monkeypatch.setattr(type(acc), "resolves_data_dependency", lambda self: False)
    for kw in ({"cpu_offload": True}, {"contiguous_gradients": False},
               {"overlap_comm": False}, {"reduction_stream": None}):
        assert not ze.install_stream_ordered_epilogue(fake(**kw)), kw
    assert not ze.install_stream_ordered_epilogue(object())
    opt = fake()
    monkeypatch.setattr(type(acc), "resolves_data_dependency", lambda self: True)
    assert not ze.install_stream_ordered_epilogue(opt)
    monkeypatch.setattr(type(acc), "resolves_data_dependency", lambda self: False)
    assert ze.install_stream_ordered_epilogue(opt)

    current = Stream()
    monkeypatch.setattr(type(acc), "current_stream", lambda self, device_index=None: current)
    monkeypatch.setattr(DeepSpeedZeroOptimizer, "independent_gradient_partition_epilogue",
                        lambda self: get_accelerator().synchronize())
    opt.independent_gradient_partition_epilogue()
    assert waits == [(current, opt.reduction_stream)]
    assert "synchronize" not in vars(acc)  # the class's own synchronize again
