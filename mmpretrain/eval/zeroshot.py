"""Zero-shot classification: class prompts through the text tower, images through the image tower.

Each rank scores its share of the held-out samples; counts are summed across ranks so every
sample is counted once.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def class_embeddings(model: Any, tokenizer: Any, classnames: list[str], templates: list[str],
                     context_length: int, device: torch.device) -> torch.Tensor:
    """(C, E) unit-norm class embeddings: the mean over templates of each class's prompts."""
    rows = []
    for name in classnames:
        tokens = tokenizer.encode([t.format(name) for t in templates], context_length)
        emb = model.encode_text(tokens.to(device), normalize=True).float()  # (T, E)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)  # (C, E)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def zeroshot_accuracy(model: Any, classifier: torch.Tensor, batches: Iterable[dict],
                      normalize: Callable[[torch.Tensor], torch.Tensor],
                      device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 accuracy of `classifier` (C, E) over labelled batches, across ranks."""
    correct1 = correct5 = seen = 0.0
    k = min(5, classifier.shape[0])
    for batch in batches:
        images = normalize(batch["image"].to(device, non_blocking=True))
        labels = batch["labels"].to(device)
        feats = model.encode_image(images, normalize=True).float()  # (B, E)
        top = (feats @ classifier.T).topk(k, dim=-1).indices  # (B, k)
        hit = top == labels[:, None]
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=-1).sum().item()
        seen += labels.numel()
    correct1, correct5, seen = _all_reduce_sum([correct1, correct5, seen], device)
    if seen == 0:
        raise RuntimeError("zero-shot evaluation saw no samples")
    return {"zeroshot_top1": correct1 / seen, f"zeroshot_top{k}": correct5 / seen,
            "zeroshot_samples": int(seen)}
