"""The Triton attention inside `torch.compile`, on CPU under Triton's interpreter:

    TRITON_INTERPRET=1 python tests/triton_compile_checks.py   # prints a JSON line last

1. The model's three block kinds with `attention_impl="triton"` compiled by Inductor with
   `fullgraph=True` (any graph break raises) and `dynamic=False`, as `engine.compile` compiles
   them: output and gradients of the input and every parameter against the same blocks run
   eagerly (the `autograd.Function` path) and against the reference implementation. As in
   training, `kernels/ops.py` is first imported while Dynamo traces the first block.
2. The tiny CoCa with the kernel compiled as one graph (`engine.compile_scope=model`) through
   its compiled blocks, against the same model run eagerly.
3. `torch.library.opcheck` on the four custom ops of `kernels/ops.py` (schema, fake tensors
   against the real outputs' shapes/strides/dtypes, autograd registration, AOT dispatch with
   static and dynamic shapes).

Exits 1 on a failed check; the JSON line has the worst relative errors.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from mmpretrain.kernels import attention_triton as at
from mmpretrain.model.fusion import DecoderBlock
from mmpretrain.model.layers import Block

TOLERANCE = 1e-4  # fp32, relative to max |eager|: kernels are identical, the code around differs
WIDTH, HEADS = 64, 2  # head dim 32


def _padding(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(batch, seq, generator=gen) > 0.3  # (B, S) True = attend
    keep[:, 0] = True
    keep[-1] = False  # a fully padded sample: its rows must come out 0, not NaN
    return keep


def opchecks(gen: torch.Generator) -> int:
    """opcheck every op with and without a padding mask, causal and not; returns the count."""
    from mmpretrain.kernels import ops

    batch, heads, sq, sk, dim = 2, 2, 17, 40, 32
    scale = dim ** -0.5

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).requires_grad_()

    q, k, v = t(batch, heads, sq, dim), t(batch, heads, sk, dim), t(batch, heads, sk, dim)
    qkv = t(batch, sk, 3, heads, dim)
    kpm = _padding(batch, sk, gen)
    n = 0
    for mask, causal in ((None, True), (kpm, False), (kpm, True)):
        torch.library.opcheck(ops.attention_fwd, (q, k, v, mask, causal, scale))
        torch.library.opcheck(ops.attention_packed_fwd, (qkv, mask, causal, scale))
        # the backward ops have no backward of their own: opcheck them on detached inputs
        with torch.no_grad():
            o, lse = ops.attention_fwd(q, k, v, mask, causal, scale)
            do = torch.randn(o.shape, generator=gen)
            qkd, kd, vd = q.detach(), k.detach(), v.detach()
            torch.library.opcheck(ops.attention_bwd, (do, qkd, kd, vd, o, lse, mask, causal,
                                                      scale))
            o, lse = ops.attention_packed_fwd(qkv, mask, causal, scale)
            do = torch.randn(o.shape, generator=gen)
            torch.library.opcheck(ops.attention_packed_bwd,
                                  (do, qkv.detach(), o, lse, mask, causal, scale))
        n += 4
    return n


def _run(block: torch.nn.Module, inputs: tuple, params: list) -> list[torch.Tensor]:
    """Output, then the gradients of inputs[0] and of params, of sum(out * weights)."""
    out = block(*inputs)
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), [inputs[0], *params])
    return [out.detach(), *grads]


def _errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(got, ref):
        if not torch.isfinite(a).all():
            return float("inf")
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-2)).item())
    return worst


def _count_launches() -> dict[str, int]:
    """Count the kernels' forward and backward launches (the compiled graph calls the same
    launch code at run time; the counts show the Triton kernels ran, not a fallback)."""
    calls = {"forward": 0, "backward": 0}
    for name, attr in (("forward", "_forward"), ("backward", "_backward")):
        def counted(*args: object, _fn=getattr(at, attr), _name=name) -> object:
            calls[_name] += 1
            return _fn(*args)
        setattr(at, attr, counted)
    return calls


def compiled_blocks(gen: torch.Generator) -> dict[str, dict[str, float]]:
    """Each block kind compiled with fullgraph=True vs eager triton and eager reference."""
    calls = _count_launches()
    batch, seq, mem = 2, 33, 20
    x = torch.randn(batch, seq, WIDTH, generator=gen).requires_grad_()
    kinds = {
        "image": (lambda impl: Block(WIDTH, HEADS, attention_impl=impl), lambda b: (x,)),
        "text_causal_padded": (
            lambda impl: Block(WIDTH, HEADS, causal=True, attention_impl=impl),
            lambda b: (x, _padding(batch, seq, torch.Generator().manual_seed(1)))),
        "decoder_cross": (
            lambda impl: DecoderBlock(WIDTH, WIDTH, HEADS, 4.0, attention_impl=impl),
            lambda b: (x, b.memory_kv(torch.randn(batch, mem, WIDTH,
                                                  generator=torch.Generator().manual_seed(2))))),
    }
    report = {}
    for name, (make, inputs_for) in kinds.items():
        torch.manual_seed(0)
        block = make("triton")
        ref_block = make("reference")
        ref_block.load_state_dict(block.state_dict())
        params, ref_params = list(block.parameters()), list(ref_block.parameters())
        eager = _run(block, inputs_for(block), params)
        reference = _run(ref_block, inputs_for(ref_block), ref_params)
        compiled = torch.compile(block, fullgraph=True, dynamic=False)  # a break raises
        calls.update(forward=0, backward=0)
        got = _run(compiled, inputs_for(block), params)
        launches = 2 if name == "decoder_cross" else 1  # self- and cross-attention
        if calls != {"forward": launches, "backward": launches}:
            raise AssertionError(f"{name}: expected {launches} Triton forward and backward "
                                 f"launches in the compiled run, got {calls}")
        report[name] = {"vs_eager": _errors(got, eager), "vs_reference": _errors(got, reference)}
        print(name, report[name], flush=True)
    return report


def compiled_model() -> dict[str, dict[str, float]]:
    """`engine.compile_scope=model` with the Triton kernel: the tiny CoCa's training forward
    compiled by Inductor as one graph with fullgraph=True through its already-compiled blocks
    (as `engine/compile.py` leaves them), vs the same model run eagerly: every output and
    every parameter's gradient, and the same number of Triton launches."""
    from mmpretrain.config import load_config
    from mmpretrain.engine.compile import compile_blocks
    from mmpretrain.model import build_model

    torch.manual_seed(0)
    cfg = load_config(None, ["model.size=coca_tiny", "model.attention=triton"])
    model = build_model(cfg.model, "siglip")
    gen = torch.Generator().manual_seed(3)
    size, context = cfg.model.vision.image_size, cfg.model.text.context_length
    images = torch.randn(2, 3, size, size, generator=gen)
    tokens = torch.randint(4, 50, (2, context), generator=gen)
    tokens[1, 5:] = 0  # a padded caption
    params = list(model.parameters())
    calls = _count_launches()

    def run(fn: torch.nn.Module) -> list[torch.Tensor]:
        out = fn(images, tokens)
        total = sum((v.float() * torch.linspace(-1, 1, v.numel()).view(v.shape)).sum()
                    for v in out.values() if v is not None and v.requires_grad)
        return [out[k].detach() for k in sorted(out) if out[k] is not None] + list(
            torch.autograd.grad(total, params, allow_unused=True))

    eager = run(model)
    eager_calls = dict(calls)
    compile_blocks(model)
    whole = torch.compile(model, fullgraph=True, dynamic=False)  # a graph break raises
    calls.update(forward=0, backward=0)
    got = run(whole)
    if calls != eager_calls:
        raise AssertionError(f"one graph launched the Triton kernels {calls}, eagerly "
                             f"{eager_calls}")
    pairs = [(a, b) for a, b in zip(got, eager) if b is not None]
    report = {"coca_one_graph": {"vs_eager": _errors(*map(list, zip(*pairs)))}}
    print("coca_one_graph", report["coca_one_graph"], calls, flush=True)
    return report


def main() -> int:
    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    # as in training, the custom ops' module is first imported while Dynamo traces a block
    assert "mmpretrain.kernels.ops" not in sys.modules
    report = compiled_blocks(gen)
    model = compiled_model()
    n_ops = opchecks(gen)
    both = {**report, **model}
    worst = max(max(r.values()) for r in both.values())
    failed = [name for name, r in both.items() if max(r.values()) > TOLERANCE]
    print(json.dumps({"opchecks": n_ops, "blocks": report, "model": model, "worst": worst,
                      "failed": failed, "tolerance": TOLERANCE,
                      "seconds": round(time.time() - t0, 1)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
