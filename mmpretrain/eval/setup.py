"""Builds the evaluations a config asks for and runs them on every rank."""
from __future__ import annotations

from typing import Any

import torch

from mmpretrain.config.schema import ExperimentConfig
from mmpretrain.eval.zeroshot import class_embeddings, zeroshot_accuracy


def zeroshot_set(cfg: ExperimentConfig) -> str:
    """The zero-shot set `eval.zeroshot` resolves to (`digits` or `none`)."""
    if cfg.eval.zeroshot == "auto":
        return "digits" if cfg.data.source == "demo" else "none"
    return cfg.eval.zeroshot


def run_zeroshot(cfg: ExperimentConfig, task: Any, tokenizer: Any, rank: int, world_size: int,
                 device: torch.device) -> dict[str, Any]:
    """Zero-shot top-1/top-5 on `eval.zeroshot` (`digits`: the demo's held-out digits)."""
    from mmpretrain.data import eval_batches
    from mmpretrain.data.demo import ensure_demo_shards

    if zeroshot_set(cfg) != "digits":
        return {}
    if tokenizer is None:
        raise ValueError("zero-shot evaluation needs a tokenizer (not available with "
                         "data.source=synthetic)")
    demo = ensure_demo_shards(cfg.data.cache_dir or None, cfg.model.vision.image_size)
    model = task.model
    classifier = class_embeddings(model, tokenizer, demo.classnames, demo.templates,
                                  cfg.model.text.context_length, device)
    batches = eval_batches(demo.val_pattern, tokenizer, cfg, rank, world_size)
    return zeroshot_accuracy(model, classifier, batches, task.normalize, device)
