"""`mmpretrain eval`: the training-time evaluations on a saved model, in one process.

    mmpretrain eval --checkpoint runs/demo_digits [--data SHARDS] [--zeroshot FILE|digits]
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from mmpretrain.eval.retrieval import KS


@dataclasses.dataclass
class EvalOptions:
    """What `mmpretrain eval` may change in the run's config (empty/None: the run's own)."""

    data: str = ""
    """Held-out shards for retrieval (`data.val_shards`)."""
    zeroshot: str = ""
    """`eval.zeroshot`: digits, none, auto or a classes file."""
    zeroshot_data: str = ""
    """`eval.zeroshot_shards`."""
    batch_size: int = 0
    """`eval.batch_size`."""
    workers: int | None = None
    """`data.num_workers`."""
    device: str = "auto"
    """cpu, cuda or auto (CUDA when available)."""


def apply_options(cfg: Any, opts: EvalOptions) -> Any:
    """A copy of the run's config with the options' overrides applied."""
    data = dataclasses.replace(cfg.data, val_shards=opts.data or cfg.data.val_shards,
                               num_workers=cfg.data.num_workers if opts.workers is None
                               else opts.workers)
    evals = dataclasses.replace(cfg.eval, zeroshot=opts.zeroshot or cfg.eval.zeroshot,
                                zeroshot_shards=opts.zeroshot_data or cfg.eval.zeroshot_shards,
                                batch_size=opts.batch_size or cfg.eval.batch_size)
    return dataclasses.replace(cfg, data=data, eval=evals)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate_checkpoint(path: str | os.PathLike, opts: EvalOptions | None = None,
                        trust_checkpoint: bool = False) -> dict[str, Any]:
    """Load `path` (run, checkpoint or export directory) and run the configured evaluations.

    Returns a record: `checkpoint` (the weights' path), `kind`, `step` (None if unknown),
    `time`, and the metrics (`zeroshot_*`, `retrieval_*`, ...). Missing paths raise
    FileNotFoundError before the model is loaded."""
    from mmpretrain.checkpoint.load import load_for_inference, locate
    from mmpretrain.eval.setup import InferenceTask, check_paths, run_evals

    opts = opts or EvalOptions()
    source = locate(path)
    if opts.zeroshot or opts.data or opts.zeroshot_data:
        from mmpretrain.config.schema import ExperimentConfig

        check_paths(apply_options(ExperimentConfig(), opts))  # the given paths, early
    device = _device(opts.device)
    cfg, model, tokenizer = load_for_inference(source, device, trust_checkpoint)
    cfg = apply_options(cfg, opts)
    check_paths(cfg)
    task = InferenceTask(model, list(cfg.data.mean), list(cfg.data.std))
    with torch.no_grad():
        metrics = run_evals(cfg, task, tokenizer, 0, 1, device)
    return {"checkpoint": str(source.path), "kind": source.kind, "step": source.step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **metrics}


def append_record(file: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append `record` as one JSON line to `file` (created with its folder if needed)."""
    path = Path(file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def zeroshot_line(metrics: dict[str, Any]) -> str:
    """One line: zero-shot top-1 (and top-5) accuracy and the number of samples."""
    top = sorted((k for k in metrics if k.startswith("zeroshot_top") and k != "zeroshot_top1"))
    extra = "".join(f", {k.removeprefix('zeroshot_')} {_pct(metrics[k])}" for k in top)
    return (f"zero-shot top-1 accuracy on {metrics['zeroshot_samples']} held-out samples: "
            f"{_pct(metrics['zeroshot_top1'])}{extra}")


def retrieval_line(metrics: dict[str, Any]) -> str:
    """One line: image->text and text->image recall@1/5/10 and the set's size."""
    i2t = " ".join(f"R@{k} {_pct(metrics[f'retrieval_i2t_r{k}'])}" for k in KS)
    t2i = " ".join(f"R@{k} {_pct(metrics[f'retrieval_t2i_r{k}'])}" for k in KS)
    return (f"retrieval on {metrics['retrieval_images']} images / {metrics['retrieval_texts']} "
            f"captions: image->text {i2t} | text->image {t2i}")


def format_summary(record: dict[str, Any]) -> str:
    """The readable summary `mmpretrain eval` prints."""
    step = "" if record.get("step") is None else f" (step {record['step']})"
    lines = [f"{record['kind']} {record['checkpoint']}{step}"]
    if "zeroshot_top1" in record:
        lines.append(zeroshot_line(record))
    if "retrieval_i2t_r1" in record:
        lines.append(retrieval_line(record))
    header, shown = ("checkpoint", "kind", "step", "time"), ("zeroshot_", "retrieval_")
    lines += [f"{k}: {v}" for k, v in record.items()
              if k not in header and not k.startswith(shown)]
    if len(lines) == 1:
        lines.append("no evaluation configured (no zero-shot set, no held-out shards)")
    return "\n".join(lines)
