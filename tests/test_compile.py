"""`engine.compile`: the compiled model (one graph, or block by block) trains like the eager
one (CPU, inductor).

The CoCa digits model has all three block kinds (image, causal text with a padding mask,
decoder with cross-attention); its evaluation runs compiled no-grad blocks and eager caption
decoding (`torch.compiler.set_stance("force_eager")`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import losses, run_train
from mmpretrain.config.load import ConfigError, load_config
from mmpretrain.logging.metrics import read_jsonl


def _run(tmp: Path, name: str, *overrides: str) -> tuple[Path, str]:
    proc = run_train([f"output_dir={tmp}", f"name={name}", "optim.steps=3", "checkpoint.every=0",
               "logging.log_every=1", "logging.wandb_mode=disabled",
               f"data.cache_dir={tmp / 'cache'}", "data.batch_size=16", "engine.zero_stage=1",
               "eval.caption_samples=8", *overrides],
              config="experiments/demo_coca_digits.yaml", timeout=900)
    return tmp / name, proc.stdout + proc.stderr


@pytest.mark.slow
def test_compiled_model_and_blocks_train_and_evaluate_like_eager(tmp_path: Path) -> None:
    """One rank: `engine.compile_scope=auto` compiles the whole forward, `blocks` each block."""
    eager, _ = _run(tmp_path, "eager")
    ref = losses(eager)
    for scope in ("auto", "blocks"):
        compiled, log = _run(tmp_path, scope, "engine.compile=true",
                             f"engine.compile_scope={scope}")
        assert ("the training forward of CoCa as one graph" in log) == (scope == "auto"), log
        got = losses(compiled)
        assert sorted(got) == [1, 2, 3]
        for step, loss in ref.items():  # fp32: only summation order differs
            assert got[step] == pytest.approx(loss, rel=1e-4), (scope, step)
        evals = [read_jsonl(run / "metrics.jsonl")[-1] for run in (eager, compiled)]
        assert evals[1]["caption_samples"] == 8
        for key in ("zeroshot_top1", "caption_class_match", "retrieval_i2t_r5"):
            assert evals[1][key] == pytest.approx(evals[0][key], abs=1 / 8), (scope, key)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_blocks_compile_to_one_graph(impl: str) -> None:
    """Every block kind traces with fullgraph=True (a graph break raises), padding mask and
    cross-attention included; the Triton kernel's case is `tests/triton_compile_checks.py`."""
    from mmpretrain.model.fusion import DecoderBlock
    from mmpretrain.model.layers import Block

    torch.manual_seed(0)
    x = torch.randn(2, 9, 32, requires_grad=True)  # (B, S, D)
    keep = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])  # (B, S)
    decoder = DecoderBlock(32, 32, 2, 4.0, attention_impl=impl)
    cases = [(Block(32, 2, attention_impl=impl), (x,)),
             (Block(32, 2, causal=True, attention_impl=impl), (x, keep)),
             (decoder, (x, decoder.memory_kv(torch.randn(2, 5, 32))))]
    for block, args in cases:
        eager = block(*args)
        compiled = torch.compile(block, fullgraph=True, dynamic=False, backend="aot_eager")
        out = compiled(*args)
        torch.testing.assert_close(out, eager)
        out.sum().backward()


def test_model_scope_traces_one_graph_through_compiled_blocks() -> None:
    """`engine.compile_scope=model`: with every block already compiled (as `compile_model`
    leaves them, for evaluation), the CoCa model's forward still traces with fullgraph=True
    (a graph break raises): image and text towers with padded captions, the decoder, the
    logit scale and bias; outputs and gradients as eager."""
    from mmpretrain.engine.compile import compile_blocks
    from mmpretrain.model import build_model

    torch.manual_seed(0)
    cfg = load_config(None, ["model.size=coca_tiny"])
    model = build_model(cfg.model, "siglip")
    size, context = cfg.model.vision.image_size, cfg.model.text.context_length
    images = torch.randn(2, 3, size, size)
    tokens = torch.randint(1, 50, (2, context))
    tokens[1, 5:] = 0  # padding
    eager = model(images, tokens)
    compile_blocks(model)
    whole = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    out = whole(images, tokens)
    assert sorted(out) == sorted(eager) and out["logit_bias"] is not None
    for key, value in eager.items():
        torch.testing.assert_close(out[key], value)
    grads = []
    for result in (eager, out):
        model.zero_grad()
        total = sum(v.float().sum() for v in result.values() if v.requires_grad)
        total.backward(retain_graph=result is eager)
        grads.append([p.grad.clone() for p in model.parameters()])
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize(("overrides", "world", "scope"), [
    ([], 1, "model"),
    ([], 2, "blocks"),  # gradients reach ZeRO's reduction as each block's backward ends
    (["engine.zero_stage=1", "engine.offload_optimizer=true"], 1, "blocks"),
    (["model.activation_checkpointing=true"], 1, "blocks"),
    (["engine.compile_scope=model"], 2, "model"),
    (["engine.compile_scope=blocks"], 1, "blocks"),
])
def test_compile_scope_auto_is_one_graph_only_where_nothing_overlaps_the_backward(
        overrides: list[str], world: int, scope: str) -> None:
    from mmpretrain.engine.compile import compile_scope

    cfg = load_config(None, ["engine.compile=true", *overrides])
    assert compile_scope(cfg, world) == scope


def test_compile_model_compiles_the_forward_once_and_every_block(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from mmpretrain.engine.compile import compile_model
    from mmpretrain.model import build_model

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(nn.Module, "compile",
                        lambda self, **kw: calls.append((type(self).__name__, kw)))
    model = build_model(load_config(None, ["model.size=coca_tiny"]).model)
    n = compile_model(model, "max-autotune", "model")
    assert calls[-1] == ("CoCa", {"dynamic": False, "mode": "max-autotune"})
    assert n == len(calls) and sum(name == "CoCa" for name, _ in calls) == 1
    calls.clear()
    assert compile_model(model, "default", "blocks") == len(calls) == n - 1
    assert all(name != "CoCa" for name, _ in calls)
    with pytest.raises(ValueError, match="compile scope must be"):
        compile_model(model, "default", "tower")


def test_compile_with_zero3_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="engine.compile needs engine.zero_stage <= 2"):
        load_config(None, ["engine.compile=true", "engine.zero_stage=3"])


CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_fast_path_matches_reference_path(tmp_path: Path) -> None:
    """bf16 ZeRO-1 on the GPU: compiled blocks (with SDPA, and with the Triton kernel, each also
    as CUDA graphs; the Triton kernel also with the fused loss, foreach AdamW and TF32 logits)
    give the losses of the eager SDPA run within bf16 tolerance."""
    runs = {"eager_sdpa": ("false", "sdpa", "default"),
            "compiled_sdpa": ("true", "sdpa", "default"),
            "cudagraphs_sdpa": ("true", "sdpa", "reduce-overhead"),
            "compiled_triton": ("true", "triton", "default"),
            "cudagraphs_triton": ("true", "triton", "reduce-overhead"),  # custom ops captured
            "compiled_triton_fused_loss_foreach_tf32": ("true", "triton", "default",
                                                        "loss.fused=true", "optim.impl=foreach",
                                                        "engine.tf32=true")}
    traces = {}
    for name, (compiled, impl, mode, *extra) in runs.items():
        run_train([f"output_dir={tmp_path}", f"name={name}", "optim.steps=20",
                   "engine.zero_stage=1", "engine.device=cuda", "engine.precision=bf16",
                   "checkpoint.every=0", "logging.log_every=1", "logging.wandb_mode=disabled",
                   f"engine.compile={compiled}", f"engine.compile_mode={mode}",
                   f"model.attention={impl}", *extra], timeout=900)
        traces[name] = losses(tmp_path / name)
    ref = traces.pop("eager_sdpa")
    for name, trace in traces.items():
        assert sorted(trace) == sorted(ref), name
        for step, loss in ref.items():
            assert abs(trace[step] - loss) <= 0.05 * max(1.0, abs(loss)), (name, step, traces)


def test_compile_mode_reaches_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from mmpretrain.engine.compile import compile_blocks
    from mmpretrain.model import build_model

    from mmpretrain.model.layers import LayerNorm

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(nn.Module, "compile",
                        lambda self, **kw: calls.append((type(self).__name__, kw)))
    cfg = load_config(None, ["model.size=coca_tiny", "engine.compile=true",
                             "engine.compile_mode=reduce-overhead"])
    model = build_model(cfg.model)
    n = compile_blocks(model, cfg.engine.compile_mode)
    blocks = [kw for name, kw in calls if name != "LayerNorm"]
    norms = [kw for name, kw in calls if name == "LayerNorm"]
    assert blocks == [{"dynamic": False, "mode": "reduce-overhead"}] * (4 + 4 + 2)
    # ln_pre, ln_post, ln_final and the CoCa head's own: the LayerNorms no block holds
    outside = {"visual.ln_pre", "visual.ln_post", "text.ln_final"}
    named = {n for n, m in model.named_modules() if isinstance(m, LayerNorm)
             and ".blocks." not in n}
    assert outside <= named and len(norms) == len(named) and n == len(calls)
    assert norms == [{"dynamic": False, "mode": None}] * len(norms)  # no CUDA graphs for them
    calls.clear()
    compile_blocks(build_model(cfg.model))
    assert [kw for _, kw in calls] == [{"dynamic": False, "mode": None}] * n  # the default


def test_compile_mode_needs_compile_and_a_known_mode() -> None:
    with pytest.raises(ConfigError, match="engine.compile_mode needs engine.compile=true"):
        load_config(None, ["engine.compile_mode=max-autotune"])
    with pytest.raises(ConfigError, match="engine.compile_mode"):
        load_config(None, ["engine.compile=true", "engine.compile_mode=fast"])
    with pytest.raises(ConfigError, match="engine.compile_scope needs engine.compile=true"):
        load_config(None, ["engine.compile_scope=model"])
    with pytest.raises(ConfigError, match="engine.compile_scope"):
        load_config(None, ["engine.compile=true", "engine.compile_scope=towers"])
