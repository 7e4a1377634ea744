"""The table of `mmpretrain bench train` (`engine/bench.py`'s report) and its notes."""
from __future__ import annotations

import sys
from typing import Any


def _cell(key: str, result: dict[str, Any] | None) -> str:
    if result is None:
        return "-"
    value = result.get(key)
    if key == "mfu":
        return "n/a (unknown peak)" if value is None else f"{100 * value:.1f}%"
    if value is None:
        return "-"
    formats = {"samples_per_s": "{:,.1f}" if value >= 10 else "{:.3g}",
               "step_time_s": "{:.1f}", "tflops_per_s": "{:.3g}", "data_wait_frac": "{:.3f}",
               "params": "{:.2f}"}
    scale = {"step_time_s": 1e3, "params": 1e-6}.get(key, 1)
    return formats.get(key, "{:.2f}").format(value * scale)


ROWS = (("samples/s", "samples_per_s"), ("step time (ms)", "step_time_s"),
        ("model TFLOP/s per rank", "tflops_per_s"), ("MFU", "mfu"),
        ("peak memory (GiB)", "peak_mem_gb"), ("  predicted (bench memory)", "predicted_peak_gb"),
        ("  reserved by the allocator", "peak_reserved_gb"),
        ("host peak RSS (GiB)", "host_peak_gb"), ("data-wait fraction", "data_wait_frac"),
        ("parameters (M)", "params"))


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table of a `bench_report`."""
    ours, theirs = report["mmpretrain"], report["open_clip"]
    if ours.get("oom"):
        limit = ours.get("gpu_memory_limit_gb")
        return (f"mmpretrain bench train: {ours['model']}, batch {ours['batch_per_rank']}, ZeRO "
                f"{ours['zero_stage']}" + "".join(f", {o}" for o in ours["overrides"])
                + f": out of device memory on {ours['device']}"
                + (f" limited to {limit:g} GiB" if limit else "")
                + (f" (peak reserved {ours['peak_reserved_gb']:.2f} GiB)"
                   if ours["peak_reserved_gb"] is not None else "") + f": {ours['error']}")
    peak = ours["peak_tflops"]
    lines = [
        f"mmpretrain bench train: {ours['model']}, batch {ours['batch_per_rank']} per rank x "
        f"{ours['world_size']} rank(s), data {ours['data']}, ZeRO {ours['zero_stage']}, "
        f"{ours['precision']}; {ours['steps']} timed steps after {ours['warmup']} warm-up"
        + "".join(f", {o}" for o in ours.get("overrides", []))
        + (", device synced before each step" if ours.get("sync_each_step") else "")
        + (", HOST TWIN (widths 32: the step time is the host's work per step)"
           if report.get("options", {}).get("host_twin") else ""),
        f"device: {ours['device']} (peak "
        + (f"{peak:g} TFLOP/s dense bf16)" if peak else "unknown: set MMPRETRAIN_PEAK_TFLOPS)"),
        "versions: " + ", ".join(f"{k} {v}" for k, v in
                                 {**ours["versions"], **(theirs or {}).get("versions", {})}
                                 .items()),
    ]
    if theirs:
        lines.append(f"open_clip: {theirs['model']}, {theirs['precision']}"
                     f"{', torch.compile' if theirs['compiled'] else ', eager'}")
    header = ["", "mmpretrain"] + (["open_clip"] if theirs else [])
    rows = [[label, _cell(key, ours)] + ([_cell(key, theirs)] if theirs else [])
            for label, key in ROWS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    if report["ratio_samples_per_s"] is not None:
        lines.append(f"samples/s ours / open_clip: {report['ratio_samples_per_s']:.2f}x")
    return "\n".join(lines)


def print_notes(report: dict[str, Any]) -> None:
    """Print the report's notes (skipped parts) to standard error."""
    for note in report["notes"]:
        print(f"mmpretrain bench train: {note}", file=sys.stderr)
