"""`mmpretrain plot`: one PNG of training curves from the metrics.jsonl of one or more runs.

Panels, against the optimizer step, runs overlaid (one colour per run): the loss (with its
`contrastive_loss`/`caption_loss` components where they differ from it), the learning rate,
samples/s, MFU (model TFLOP/s per rank where no run logged an MFU), the data-wait fraction, and
the evaluation metrics (`zeroshot_*`, `retrieval_*`, `caption_*` fractions). A panel with no data
in any run says so. Rendered headless with matplotlib's Agg canvas (no pyplot, no display).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FIGSIZE = (15.0, 8.0)
"""Figure size in inches; the PNG is FIGSIZE x dpi pixels."""
EVAL_PREFIXES = ("zeroshot_", "retrieval_", "caption_")
LOSS_PARTS = (("contrastive_loss", "--"), ("caption_loss", ":"))
EVAL_STYLES = ("-o", "--s", ":^", "-.v", "-D", "--P", ":X", "-.*")

Series = tuple[list[int], list[float]]


class Run:
    """The records of one run directory's metrics.jsonl, split into training and eval."""

    def __init__(self, run_dir: str | os.PathLike, label: str) -> None:
        path = Path(run_dir) / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: no metrics.jsonl in this run directory")
        self.label = label
        records = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # blank, or torn by a crash while appending
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                records.append(record)
        records.sort(key=lambda r: r["step"])
        self.train = [r for r in records if "loss" in r]
        self.evals = [r for r in records if "loss" not in r]

    def series(self, key: str, evals: bool = False) -> Series:
        """(steps, values) of `key` where it is a finite number."""
        steps, values = [], []
        for r in self.evals if evals else self.train:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                steps.append(int(r["step"]))
                values.append(float(v))
        return steps, values

    def eval_keys(self) -> list[str]:
        """Evaluation metrics that are fractions (accuracy, recall@K; not counts or losses)."""
        keys = sorted({k for r in self.evals for k in r if k.startswith(EVAL_PREFIXES)
                       and not k.endswith("_loss")})
        return [k for k in keys if self.series(k, evals=True)[1]
                and all(0.0 <= v <= 1.0 for v in self.series(k, evals=True)[1])]


def _labels(run_dirs: list[Path]) -> list[str]:
    """Run names for the legend: the directory name, or the path where names repeat."""
    names = [p.resolve().name or str(p) for p in run_dirs]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(run_dirs, names)]


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in these runs", ha="center", va="center",
            transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_key(ax: Axes, runs: list[Run], colors: list[str], key: str, title: str,
              scale: float = 1.0) -> None:
    """One training metric, one line per run."""
    ax.set_title(title)
    drawn = False
    for run, color in zip(runs, colors):
        steps, values = run.series(key)
        if steps:
            ax.plot(steps, [v * scale for v in values], color=color, label=run.label)
            drawn = True
    if not drawn:
        _no_data(ax, title)


def _plot_loss(ax: Axes, runs: list[Run], colors: list[str]) -> None:
    """The total loss per run, and each component that is not identical to it."""
    ax.set_title("loss")
    if not any(run.series("loss")[0] for run in runs):
        return _no_data(ax, "loss")
    for run, color in zip(runs, colors):
        total = run.series("loss")
        ax.plot(*total, color=color, label=run.label)
        for key, style in LOSS_PARTS:
            part = run.series(key)
            if part[0] and part != total:
                ax.plot(*part, style, color=color, label=f"{run.label}: {key}")


def _plot_evals(ax: Axes, runs: list[Run], colors: list[str]) -> None:
    """Every fractional eval metric of every run (marker/line style per metric)."""
    ax.set_title("evaluation")
    keys = sorted({k for run in runs for k in run.eval_keys()})
    if not keys:
        return _no_data(ax, "evaluation metrics")
    for run, color in zip(runs, colors):
        for i, key in enumerate(keys):
            steps, values = run.series(key, evals=True)
            if steps:
                ax.plot(steps, values, EVAL_STYLES[i % len(EVAL_STYLES)], color=color,
                        label=f"{run.label}: {key}", markersize=4)
    ax.set_ylim(-0.02, 1.02)


def plot_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike | None = None,
              dpi: int = 100) -> Path:
    """Render the runs' curves to one PNG (default `<first run dir>/metrics.png`); returns it.

    FileNotFoundError names a run directory without metrics.jsonl."""
    if not run_dirs:
        raise ValueError("plot: give at least one run directory")
    if dpi <= 0:
        raise ValueError(f"--dpi must be positive, got {dpi}")
    dirs = [Path(d) for d in run_dirs]
    runs = [Run(d, label) for d, label in zip(dirs, _labels(dirs))]
    out_path = Path(out) if out else dirs[0] / "metrics.png"
    fig = Figure(figsize=FIGSIZE, dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    _plot_loss(axes[0], runs, colors)
    _plot_key(axes[1], runs, colors, "lr", "learning rate")
    _plot_key(axes[2], runs, colors, "samples_per_s", "samples/s")
    if any(run.series("mfu")[0] for run in runs):
        _plot_key(axes[3], runs, colors, "mfu", "MFU (%)", scale=100.0)
    else:
        _plot_key(axes[3], runs, colors, "tflops_per_s", "model TFLOP/s per rank")
    _plot_key(axes[4], runs, colors, "data_wait_frac", "data-wait fraction")
    _plot_evals(axes[5], runs, colors)
    for ax in axes:
        if ax.lines:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=dpi)
    return out_path


def describe(path: Path) -> dict[str, Any]:
    """Width and height in pixels of a PNG (from its IHDR chunk)."""
    data = Path(path).read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError(f"{path}: not a PNG file")
    return {"width": int.from_bytes(data[16:20], "big"),
            "height": int.from_bytes(data[20:24], "big")}
