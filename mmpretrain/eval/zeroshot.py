"""Zero-shot classification: class prompts through the text tower, images through the image tower.

Each rank scores its share of the held-out samples; counts are summed across ranks so every
sample is counted once.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmpretrain.eval import EvalSetupError

CLASSES_FILE_KEYS = ("classnames", "templates")


def _read_mapping(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"eval.zeroshot: classes file {path} does not exist (expected "
                                "digits, auto, none, or a JSON/YAML file)")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise EvalSetupError(f"classes file {path}: cannot parse it: {exc}") from exc
    if not isinstance(data, dict):
        raise EvalSetupError(f"classes file {path}: expected a mapping with keys "
                             f"{list(CLASSES_FILE_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(CLASSES_FILE_KEYS))
    if unknown:
        raise EvalSetupError(f"classes file {path}: unknown key(s) {unknown}; allowed: "
                             f"{list(CLASSES_FILE_KEYS)}")
    return data


def _string_list(data: dict[str, Any], key: str, path: Path) -> list[str]:
    items = data.get(key)
    if not isinstance(items, list) or not items:
        raise EvalSetupError(f"classes file {path}: `{key}` must be a non-empty list of "
                             f"strings, got {items!r:.100}")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise EvalSetupError(f"classes file {path}: `{key}[{i}]` must be a non-empty "
                                 f"string, got {item!r:.100}")
    return items


def _placeholders(template: str) -> list[str] | None:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:  # unbalanced braces
        return None


def load_classes_file(path: str | Path) -> tuple[list[str], list[str]]:
    """(classnames, templates) of a zero-shot classes file (JSON, or YAML for other suffixes).

    The file maps `classnames` to a list of distinct class names and `templates` to a list of
    prompts, each with exactly one `{}` (no other braces; `{{`/`}}` for literal ones). Errors
    name the file and the key."""
    path = Path(path)
    data = _read_mapping(path)
    classnames = _string_list(data, "classnames", path)
    templates = _string_list(data, "templates", path)
    seen: dict[str, int] = {}
    for i, name in enumerate(classnames):
        if name in seen:
            raise EvalSetupError(f"classes file {path}: `classnames[{i}]` {name!r} repeats "
                                 f"`classnames[{seen[name]}]`; class names must be distinct")
        seen[name] = i
    for i, template in enumerate(templates):
        if _placeholders(template) != [""]:
            raise EvalSetupError(f"classes file {path}: `templates[{i}]` {template!r} must "
                                 "contain exactly one {} and no other braces")
    return classnames, templates


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
