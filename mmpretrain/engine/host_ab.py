"""`mmpretrain bench host-ab`: host work per step of several configs (and OpenCLIP), interleaved.

The host twin (`engine/host_twin.py`) makes a step's time the host's work for it, which a shared
CPU measures badly one run after another: its speed drifted by up to 2x within minutes, more
than most changes being judged. Here every variant (a list of config overrides, the real
`Trainer` on the host twin) and, with `compare_open_clip`, OpenCLIP's twin are built in one
process, warmed up, then timed in rounds: each round runs `steps` steps of each in turn, so a
slow minute slows every participant of that round alike. The report gives each participant's
median ms per step and, per participant, the median over rounds of its time divided by the
first variant's in the same round (and by OpenCLIP's) — the figures that drift divides out of.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mmpretrain.config.load import load_config
from mmpretrain.engine.bench import (BenchOptions, _device_pool, _timed, bench_overrides,
                                     open_clip_problem, open_clip_step, versions)
from mmpretrain.engine.dist import detect_env
from mmpretrain.logging.flops import device_name


@dataclass
class HostAbOptions:
    """What `mmpretrain bench host-ab` runs (its command-line options)."""

    model: str = "vit_b16"
    variants: list[list[str]] = field(default_factory=lambda: [["engine.compile=true"]])
    """Each a list of config overrides for ours; the first is the baseline of the ratios."""
    compare_open_clip: bool = False
    zero: int = 1
    precision: str = "bf16"
    rounds: int = 10
    steps: int = 10
    """Steps of each participant per round."""
    warmup: int = 5


def _ours(opts: HostAbOptions, overrides: list[str], tmp: str) -> tuple[Any, Callable]:
    """A `Trainer` on the host twin with `overrides`, and its `run(n)` over a device pool."""
    from mmpretrain.engine.trainer import Trainer

    bench = BenchOptions(opts.model, batch=2, zero=opts.zero, steps=opts.steps,
                         warmup=opts.warmup, precision=opts.precision,
                         overrides=list(overrides), host_twin=True)
    trainer = Trainer(load_config(None, bench_overrides(bench, tmp)))
    batches = _device_pool(trainer)
    return trainer, lambda n: trainer.run_steps(n, batches)


def host_ab(opts: HostAbOptions) -> dict[str, Any]:
    """Build every participant, warm each up, time `rounds` interleaved rounds; the report."""
    if not opts.variants:
        raise ValueError("host-ab needs at least one variant")
    if opts.rounds < 1 or opts.steps < 1 or opts.warmup < 0:
        raise ValueError(f"--rounds ({opts.rounds}) and --steps ({opts.steps}) must be >= 1, "
                         f"--warmup ({opts.warmup}) >= 0")
    env = detect_env()
    world = env.world_size
    if opts.compare_open_clip and world > 1:
        raise ValueError(f"--compare open_clip times OpenCLIP's one-process step; run it on one "
                         f"rank (this job has {world})")
    problem = open_clip_problem() if opts.compare_open_clip else None
    if problem:
        raise ValueError(problem)
    torch.set_num_threads(1)  # intra-op threads are not host work a GPU run would have
    runs: dict[str, Callable[[int], Any]] = {}
    tmps, device = [], torch.device("cpu")
    try:
        for overrides in opts.variants:  # each run(n) keeps its trainer alive
            tmps.append(tempfile.mkdtemp(prefix="mmpretrain-host-ab-"))
            trainer, run = _ours(opts, overrides, tmps[-1])
            device = trainer.device
            runs[" ".join(overrides) or "(defaults)"] = run
        if opts.compare_open_clip:
            runs["open_clip"] = open_clip_step(
                BenchOptions(opts.model, batch=2, host_twin=True), device).run
        times, kernels = _rounds(opts, device, runs)
    finally:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
    report = _report(opts, times, kernels, device)
    return {**report, "world_size": world, "rank": env.rank}


def _rounds(opts: HostAbOptions, device: torch.device, runs: dict[str, Callable[[int], Any]]
            ) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Warm up every participant, then ms per step of each, round by round; also how many
    kernels Inductor generated for each (its compiled graphs' fused kernels, cache hits
    included: Inductor replays a cached graph's counts)."""
    from torch._inductor import metrics

    kernels = dict.fromkeys(runs, 0)

    def counted(name: str, fn: Callable[[], Any]) -> Any:
        before = metrics.generated_kernel_count
        try:
            return fn()
        finally:
            kernels[name] += metrics.generated_kernel_count - before

    for name, run in runs.items():
        counted(name, lambda: run(opts.warmup))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(opts.rounds):
        for name, run in runs.items():
            seconds = counted(name, lambda: _timed(device, lambda: run(opts.steps))[0])
            times[name].append(1000 * seconds / opts.steps)
    return times, kernels


def _report(opts: HostAbOptions, times: dict[str, list[float]], kernels: dict[str, int],
            device: torch.device) -> dict[str, Any]:
    base = next(iter(times))

    def ratio(name: str, to: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times[to]))

    rows = [{"name": name, "median_ms": statistics.median(ms), "rounds_ms": ms,
             "vs_first": ratio(name, base),
             "vs_open_clip": ratio(name, "open_clip") if "open_clip" in times else None,
             "inductor_kernels": kernels[name]}
            for name, ms in times.items()]
    return {"model": opts.model, "zero": opts.zero, "precision": opts.precision,
            "rounds": opts.rounds, "steps": opts.steps, "warmup": opts.warmup,
            "participants": rows, "device": device_name(device), "versions": versions()}


def format_host_ab(report: dict[str, Any]) -> str:
    """The report as a table: median ms per step and the per-round ratios."""
    ranks = report.get("world_size", 1)
    lines = [f"host twin of {report['model']}, ZeRO {report['zero']}, {report['precision']}, "
             f"{ranks} rank{'s' if ranks > 1 else ''} (times of rank 0), "
             f"{report['rounds']} rounds of {report['steps']} steps each "
             f"({report['device']}; torch {report['versions']['torch']})",
             f"{'ms/step':>8}  {'/ first':>7}  {'/ OpenCLIP':>10}  {'kernels':>7}  participant"]
    for row in report["participants"]:
        theirs = f"{row['vs_open_clip']:.2f}x" if row["vs_open_clip"] is not None else "-"
        lines.append(f"{row['median_ms']:8.1f}  {row['vs_first']:6.2f}x  {theirs:>10}  "
                     f"{row['inductor_kernels']:>7}  {row['name']}")
    lines.append("ratios: the median over rounds of this participant's time / the other's in "
                 "the same round; kernels: generated by Inductor for the participant's "
                 "compiled graphs, forward and backward (a graph run several times a step, "
                 "as each block's with compile_scope=blocks, counts once)")
    return "\n".join(lines)
