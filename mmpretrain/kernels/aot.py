"""Compile the attention kernels for a GPU architecture ahead of time, on any machine.

Triton lowers a kernel to PTX and assembles it with the `ptxas` bundled in its wheel: no GPU or
driver is needed and nothing is launched. The launches are captured from the real launch code
(`attention_triton._forward` / `_backward`, called on small CPU tensors laid out as the model
lays them out), and each argument is specialised as Triton's JIT does on a GPU (strides equal to
1 become constants, integers and pointers divisible by 16 are marked so), so what is compiled
here is what a GPU run compiles for the same shapes and tiles.

Reported per kernel: registers per thread, spill bytes, shared memory, whether Hopper's
warpgroup MMA (`wgmma`) is used, compile seconds (0 when Triton's cache had the kernel). Uses:
`tests/test_attention_aot.py` (every launch the tile heuristics pick compiles for sm_90 and
sm_80, within shared memory and a small spill bound) and `mmpretrain bench attention --aot`
(the same table, also for the tile sweep's candidates: which of them spill, before a GPU
session times them).
"""
from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from mmpretrain.kernels import attention_triton
from mmpretrain.kernels.attention_triton import (Blocks, _backward, _forward, _grads_bhsd,
                                                 _packed_grad, _unpack, interpreter_enabled,
                                                 tile_override)

KERNELS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq", "bwd_fused", "bwd_resident",
           "bwd_sum_chunks")
# the kernels a sweep candidate (keyed by its first tile_override key) compiles
_SWEPT = {"fwd": ("fwd",), "bwd_kv": ("bwd_dkdv", "bwd_dq"),
          "bwd_fused": ("bwd_fused", "bwd_resident"),
          "bwd_chunked": ("bwd_resident", "bwd_sum_chunks")}
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # opt-in bytes per block
_PTXAS_USE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Launch:
    """One captured kernel launch: the JIT function, its bound arguments and launch options."""

    name: str
    fn: Any
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class KernelBuild:
    """What compiling one launch for one architecture produced."""

    name: str
    arch: int
    warps: int
    stages: int
    constants: dict
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    wgmma: bool
    seconds: float
    mma_sync: int = 0
    """mma.sync instructions in the PTX: Ampere's synchronous MMA, which Hopper runs where a
    matmul's shape rules out wgmma (M < 64 per warpgroup)"""

    @property
    def spills(self) -> bool:
        """Whether ptxas spilled registers to local memory."""
        return self.spill_stores > 0 or self.spill_loads > 0


class _Recorder:
    """Stands in for a JIT kernel: `rec[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, name: str, fn: Any, sink: list[Launch]) -> None:
        self.name, self.fn, self.sink = name, fn, sink

    def __getitem__(self, grid: tuple) -> Any:
        return lambda *args, **kwargs: self.sink.append(Launch(self.name, self.fn, args, kwargs))


@contextlib.contextmanager
def _capturing() -> Iterator[list[Launch]]:
    from mmpretrain.kernels import triton_bwd, triton_fwd

    targets = {"fwd": (triton_fwd, "_attn_fwd"),
               "bwd_preprocess": (triton_bwd, "_attn_bwd_preprocess"),
               "bwd_dkdv": (triton_bwd, "_attn_bwd_dkdv"), "bwd_dq": (triton_bwd, "_attn_bwd_dq"),
               "bwd_fused": (triton_bwd, "_attn_bwd_fused"),
               "bwd_resident": (triton_bwd, "_attn_bwd_resident"),
               "bwd_sum_chunks": (triton_bwd, "_attn_bwd_sum_chunks")}
    sink: list[Launch] = []
    saved = {name: getattr(mod, attr) for name, (mod, attr) in targets.items()}
    try:
        for name, (mod, attr) in targets.items():
            setattr(mod, attr, _Recorder(name, saved[name], sink))
        yield sink
    finally:
        for name, (mod, attr) in targets.items():
            setattr(mod, attr, saved[name])


def capture_launches(batch: int, heads: int, sq: int, sk: int, dim: int, *,
                     dtype: torch.dtype = torch.bfloat16, causal: bool = False,
                     masked: bool = False, packed: bool | None = None,
                     contiguous: bool = False, arch: int = 90, sms: int = 132) -> list[Launch]:
    """The launches of one attention call on a GPU of compute capability `arch` with `sms`
    multiprocessors (the tile heuristics depend on both): forward, backward preprocess, then
    dK/dV and dQ (split plan) or the fused backward (the plan `_use_fused` picks from the
    shape, batch included).

    `packed` (default: self-attention, sq == sk): q, k, v are views of one (B, S, 3, H, D)
    projection, as the towers produce them; else separate (B, S, H, D) tensors as the fusion
    decoder's cross-attention, or with `contiguous` separate (B, H, S, D) tensors and dO, as
    `bench attention` makes them. `masked`: a (B, Sk) key-padding mask.
    """
    if interpreter_enabled():
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (the "
                           "interpreter replaces the JIT functions it compiles)")
    packed = sq == sk and not contiguous if packed is None else packed
    if packed and (sq != sk or contiguous):
        raise ValueError(f"packed self-attention needs sq == sk and not contiguous, got "
                         f"{sq}, {sk}, contiguous={contiguous}")
    q, k, v, grads = _capture_inputs(batch, heads, sq, sk, dim, dtype, packed, contiguous)
    kpm = torch.ones(batch, sk, dtype=torch.uint8) if masked else None
    scale = dim ** -0.5
    previous = attention_triton.capture_arch, attention_triton.capture_sms
    attention_triton.capture_arch, attention_triton.capture_sms = arch, sms
    try:
        with _capturing() as launches:
            o, lse = _forward(q, k, v, kpm, causal, scale)
            do = torch.empty(o.shape, dtype=dtype) if contiguous else torch.empty_like(o)
            _backward((q, k, v, o, lse), do, grads, kpm, causal, scale)
    finally:
        attention_triton.capture_arch, attention_triton.capture_sms = previous
    return launches


def _capture_inputs(batch: int, heads: int, sq: int, sk: int, dim: int, dtype: torch.dtype,
                    packed: bool, contiguous: bool) -> tuple:
    """Uninitialised q (B, H, Sq, D), k, v (B, H, Sk, D) and dq, dk, dv in a layout."""
    if packed:
        qkv = torch.empty(batch, sq, 3, heads, dim, dtype=dtype)  # (B, S, 3, H, D)
        q, k, v = _unpack(qkv)  # 3 x (B, H, S, D) views
        return q, k, v, _packed_grad(qkv)[1]
    if contiguous:
        q, k, v = (torch.empty(batch, heads, s, dim, dtype=dtype) for s in (sq, sk, sk))
    else:
        q = torch.empty(batch, sq, heads, dim, dtype=dtype).transpose(1, 2)  # (B, H, Sq, D)
        k, v = (torch.empty(batch, sk, heads, dim, dtype=dtype).transpose(1, 2)
                for _ in range(2))  # (B, H, Sk, D)
    return q, k, v, _grads_bhsd(q, k, v)  # as the backward makes them


def _specialise(launch: Launch, backend: Any) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) exactly as Triton's JIT builds them on a GPU,
    through the JIT's own binder and argument packing (`JITFunction.run` does the same with the
    options it adds first), so that a compile of this launch is stored under the cache key a
    GPU launch looks up (`kernels/precompile.py`)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn, kwargs = launch.fn, dict(launch.kwargs)
    if len(launch.args) + len(kwargs) < len(fn.params):
        raise ValueError(f"{launch.name}: launch arguments do not match the kernel's parameters")
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for name in _RUN_OPTIONS:  # what this Triton's run() adds (3.6: the first; 3.9: both)
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    return signature, constexprs, attrs, options.__dict__


_RUN_OPTIONS = ("instrumentation_mode", "fpsan_homomorphic_casts")


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        gpu = f"--gpu-name={sm_arch_from_capability(arch)}"
        res = subprocess.run([get_ptxas(arch).path, "-v", gpu, str(src), "-o",
                              str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    used, spill = _PTXAS_USE.search(log), _PTXAS_SPILL.search(log)
    if used is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return int(used.group(1)), int(spill.group(1)), int(spill.group(2))


def compile_kernel(launch: Launch, arch: int = 90) -> tuple[Any, dict, float]:
    """`triton.compile` one captured launch for compute capability `arch` with the arguments
    specialised as the JIT would: (compiled kernel, constexprs by index, seconds). The result
    lands in Triton's on-disk cache under the key a GPU launch of the same call looks up."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = _specialise(launch, make_backend(target))
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                            options=options)
    return kernel, constexprs, time.perf_counter() - start


def compile_launch(launch: Launch, arch: int = 90) -> KernelBuild:
    """Compile one captured launch for compute capability `arch` (90: Hopper, 80: Ampere)."""
    kernel, constexprs, seconds = compile_kernel(launch, arch)
    regs, stores, loads = _ptxas_usage(kernel.asm["ptx"], arch)
    names = {(i,): p.name for i, p in enumerate(launch.fn.params)}
    constants = {names[k]: v for k, v in constexprs.items() if names[k].isupper()}
    return KernelBuild(launch.name, arch, kernel.metadata.num_warps, kernel.metadata.num_stages,
                       constants, regs, stores, loads, kernel.metadata.shared,
                       "wgmma" in kernel.asm["ptx"], seconds,
                       kernel.asm["ptx"].count("mma.sync"))


def build_attention(batch: int, heads: int, sq: int, sk: int, dim: int, *, arch: int = 90,
                    dtype: torch.dtype = torch.bfloat16, causal: bool = False,
                    masked: bool = False, tiles: dict[str, Blocks | None] | None = None,
                    kernels: tuple[str, ...] = KERNELS) -> list[KernelBuild]:
    """Compile the launches of one attention call (under `tiles`, a `tile_override` kwargs
    dict; None: the heuristics) for `arch`; `kernels` selects which of KERNELS to compile."""
    with tile_override(**(tiles or {})):
        launches = capture_launches(batch, heads, sq, sk, dim, dtype=dtype, causal=causal,
                                    masked=masked, arch=arch)
    return [compile_launch(launch, arch) for launch in launches if launch.name in kernels]


def format_builds(rows: list[tuple[str, KernelBuild]]) -> str:
    """A table of (label, build) rows: registers, spills, shared memory, wgmma, mma.sync
    instructions, compile time."""
    lines = [f"{'config':<34} {'kernel':<15} {'arch':>4} {'warps':>5} {'stages':>6} "
             f"{'regs':>4} {'spill st/ld B':>13} {'smem KB':>7} {'wgmma':>5} {'mma.sync':>8} "
             f"{'s':>5}"]
    for label, b in rows:
        lines.append(f"{label:<34} {b.name:<15} {b.arch:>4} {b.warps:>5} {b.stages:>6} "
                     f"{b.registers:>4} {f'{b.spill_stores}/{b.spill_loads}':>13} "
                     f"{b.shared_bytes / 1024:>7.1f} {'yes' if b.wgmma else 'no':>5} "
                     f"{b.mma_sync:>8} {b.seconds:>5.1f}")
    return "\n".join(lines)


def aot_table(shape_names: list[str], arch: int = 90, dtype: torch.dtype = torch.bfloat16,
              sweep: bool = False) -> list[dict]:
    """Records for `bench attention --aot`: per benchmark shape (`bench.SHAPES`, captured at
    its batch, which picks the backward plan), the launches of the tile heuristics, or with
    `sweep` every candidate of the GPU tile sweep (forward alone; dK/dV + dQ pairs; fused
    backward tiles where the sequences are short enough for that plan)."""
    from dataclasses import asdict

    from mmpretrain.kernels.attention_triton import FUSED_MAX_SEQ, _next_pow2
    from mmpretrain.kernels.bench import SHAPES
    from mmpretrain.kernels.sweep import (_config, bwd_candidates, fused_candidates,
                                          fwd_candidates)

    unknown = [s for s in shape_names if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; shapes: {list(SHAPES)}")
    records = []
    for name in shape_names:
        batch, heads, sq, sk, dim, causal = SHAPES[name]
        block_d, elt = _next_pow2(dim), torch.finfo(dtype).bits // 8
        configs: list[dict] = [{}]
        if sweep:
            configs = [{"fwd": b} for b in fwd_candidates(sq, block_d, elt)]
            configs += [{"bwd_kv": kv, "bwd_q": q}
                        for kv, q in bwd_candidates(block_d, elt, arch)]
            if max(sq, sk) <= FUSED_MAX_SEQ:
                configs += [{"bwd_fused": b} for b in fused_candidates(block_d, elt, arch, sq)]
        for tiles in configs:
            kernels = KERNELS if not tiles else _SWEPT[next(iter(tiles))]
            for build in build_attention(batch, heads, sq, sk, dim, arch=arch, dtype=dtype,
                                         causal=causal, tiles=tiles, kernels=kernels):
                records.append({"shape": name, "config": _config(tiles) if tiles else None,
                                **asdict(build)})
    return records


def format_table(records: list[dict]) -> str:
    """`format_builds` of `aot_table` records, labelled by shape and tiles."""
    from mmpretrain.kernels.sweep import config_label

    rows = []
    for r in records:
        cfg = r["config"]
        kind = next((k for k in ("fwd", "bwd_fused") if cfg and cfg.get(k)), "bwd")
        label = r["shape"] + ("" if cfg is None else " " + config_label(
            {"kernel": kind, "config": cfg, "shape": r["shape"]}))
        fields = {k: v for k, v in r.items() if k not in ("shape", "config")}
        rows.append((label, KernelBuild(**fields)))
    return format_builds(rows)



def write_json(records: list[dict], path: str, arch: int) -> None:
    """Save `aot_table` records with the Triton version and target they were compiled for."""
    import json

    import triton

    meta = {"target": f"cuda sm_{arch}", "triton": triton.__version__,
            "torch": torch.__version__, "compiled_without_gpu": True}
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
