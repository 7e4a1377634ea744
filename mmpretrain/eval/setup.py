"""The evaluations a config asks for, run on every rank (training) or in one process (`eval`).

`run_evals` runs each function of `EVALUATIONS` on an `EvalContext` and merges their metrics.
An evaluation is a small function `ctx -> {prefix_metric: value}` that returns {} when the
config does not ask for it; every rank must take the same decision (they meet in collectives).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mmpretrain.config.schema import ExperimentConfig
from mmpretrain.eval import EvalSetupError
from mmpretrain.eval.retrieval import gather_features, recall_at_k, retrieval_features
from mmpretrain.eval.zeroshot import class_embeddings, load_classes_file, zeroshot_accuracy

ZEROSHOT_NAMES = ("auto", "digits", "none")


@dataclass
class InferenceTask:
    """A model with the image normalization of its run: what evaluations use of the training
    task (`ContrastiveTask` has the same two members)."""

    model: torch.nn.Module
    mean: list[float]
    std: list[float]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalized float in the model's parameter dtype."""
        from mmpretrain.data import normalize

        dtype = next(self.model.parameters()).dtype
        return normalize(images, self.mean, self.std, dtype)  # (B, 3, H, W)


@dataclass
class EvalContext:
    """Everything an evaluation function needs."""

    cfg: ExperimentConfig
    task: Any  # `.model` (encode_image / encode_text) and `.normalize`
    tokenizer: Any
    rank: int
    world_size: int
    device: torch.device

    @property
    def batch_size(self) -> int:
        """`eval.batch_size`, or `data.batch_size` when 0."""
        return self.cfg.eval.batch_size or self.cfg.data.batch_size

    def batches(self, pattern: str, classnames: list[str] | None = None) -> Iterator[dict]:
        """This rank's share of the held-out shards `pattern`, in eval batches.

        Ranks may hold different numbers of batches: evaluations make no collective call per
        batch (under ZeRO-3 the trainer evaluates a gathered, unpartitioned copy)."""
        from mmpretrain.data import eval_batches

        return iter(eval_batches(pattern, self.tokenizer, self.cfg, self.rank, self.world_size,
                                 self.batch_size, classnames=classnames))

    def need_tokenizer(self, what: str) -> None:
        """Raise when there is no tokenizer (synthetic data) but `what` needs one."""
        if self.tokenizer is None:
            raise EvalSetupError(f"{what} needs a tokenizer (none with data.source=synthetic "
                                 "and no data.tokenizer)")


@dataclass
class ZeroShotSet:
    """The classes and labelled shards a zero-shot evaluation scores."""

    name: str
    classnames: list[str]
    templates: list[str]
    pattern: str


def zeroshot_set(cfg: ExperimentConfig) -> ZeroShotSet | None:
    """What `eval.zeroshot` resolves to: the demo digits, a classes file, or None."""
    from mmpretrain.data import val_pattern
    from mmpretrain.data.demo import ensure_demo_shards

    choice = cfg.eval.zeroshot
    if choice == "auto":
        choice = "digits" if cfg.data.source == "demo" else "none"
    if choice == "none":
        return None
    if choice == "digits":
        demo = ensure_demo_shards(cfg.data.cache_dir or None, cfg.model.vision.image_size)
        return ZeroShotSet("digits", demo.classnames, demo.templates, demo.val_pattern)
    classnames, templates = load_classes_file(choice)
    pattern = cfg.eval.zeroshot_shards or val_pattern(cfg)
    if not pattern:
        raise EvalSetupError(f"eval.zeroshot is the classes file {choice} but both "
                             "eval.zeroshot_shards and data.val_shards are empty: set one to "
                             "the labelled shards to score")
    return ZeroShotSet(str(choice), classnames, templates, pattern)


def retrieval_pattern(cfg: ExperimentConfig) -> str:
    """The held-out shards retrieval runs on ('' when `eval.retrieval` is off or none)."""
    from mmpretrain.data import val_pattern

    return val_pattern(cfg) if cfg.eval.retrieval else ""


def eval_zeroshot(ctx: EvalContext) -> dict[str, Any]:
    """Zero-shot top-1/top-5 on the set `eval.zeroshot` names (`zeroshot_*`)."""
    zs = zeroshot_set(ctx.cfg)
    if zs is None:
        return {}
    ctx.need_tokenizer("zero-shot evaluation")
    model = ctx.task.model
    classifier = class_embeddings(model, ctx.tokenizer, zs.classnames, zs.templates,
                                  ctx.cfg.model.text.context_length, ctx.device)  # (C, E)
    batches = ctx.batches(zs.pattern, classnames=zs.classnames)
    return zeroshot_accuracy(model, classifier, batches, ctx.task.normalize, ctx.device)


def eval_retrieval(ctx: EvalContext) -> dict[str, Any]:
    """Image<->text recall@1/5/10 on the held-out shards (`retrieval_*`)."""
    pattern = retrieval_pattern(ctx.cfg)
    if not pattern:
        return {}
    ctx.need_tokenizer("retrieval evaluation")
    model = ctx.task.model
    local = retrieval_features(model, ctx.batches(pattern), ctx.tokenizer,
                               ctx.cfg.model.text.context_length, ctx.task.normalize,
                               ctx.device, ctx.cfg.model.embed_dim)
    images, texts, owners = gather_features(*local)  # (Ni, E), (Nt, E), (Nt,)
    if images.shape[0] == 0:
        raise RuntimeError(f"retrieval evaluation found no samples in {pattern}")
    return recall_at_k(images, texts, owners)


def eval_caption(ctx: EvalContext) -> dict[str, Any]:
    """Fusion models: greedy captions of `eval.caption_samples` held-out images, and the
    fraction naming the right class when the zero-shot set gives class names (`caption_*`)."""
    from mmpretrain.eval.captioning import caption_metrics

    cfg = ctx.cfg
    if not cfg.model.fusion.decoder or cfg.eval.caption_samples <= 0:
        return {}
    zs = zeroshot_set(cfg)
    pattern = zs.pattern if zs is not None else retrieval_pattern(cfg)
    if not pattern:
        return {}
    ctx.need_tokenizer("caption evaluation")
    classnames = zs.classnames if zs is not None else None
    return caption_metrics(ctx.task.model, ctx.batches(pattern, classnames=classnames),
                           ctx.task.normalize, ctx.tokenizer, ctx.device,
                           cfg.eval.caption_samples, ctx.world_size, classnames)


Evaluation = Callable[[EvalContext], dict[str, Any]]
# Run in this order.
EVALUATIONS: list[Evaluation] = [eval_zeroshot, eval_retrieval, eval_caption]


def run_evals(cfg: ExperimentConfig, task: Any, tokenizer: Any, rank: int, world_size: int,
              device: torch.device) -> dict[str, Any]:
    """Every evaluation of `EVALUATIONS` the config asks for; call on every rank (the metrics
    cover the whole held-out set and are the same on every rank)."""
    ctx = EvalContext(cfg, task, tokenizer, rank, world_size, device)
    metrics: dict[str, Any] = {}
    for evaluation in EVALUATIONS:
        metrics.update(evaluation(ctx))
    return metrics


def check_paths(cfg: ExperimentConfig) -> None:
    """Raise FileNotFoundError for a missing classes file or local held-out shard before any
    model work (shards are resolved the way the evaluations will resolve them)."""
    from mmpretrain.data.shardlist import resolve_shards

    if cfg.eval.zeroshot not in ZEROSHOT_NAMES and not Path(cfg.eval.zeroshot).is_file():
        raise FileNotFoundError(f"eval.zeroshot: classes file {cfg.eval.zeroshot} does not "
                                "exist")
    for pattern in (cfg.eval.zeroshot_shards, cfg.data.val_shards):
        if pattern:
            resolve_shards(pattern)
