"""Caption evaluation of fusion (CoCa) models: generate captions for held-out images and check
that they name the image's class.

Every rank captions up to ceil(`eval.caption_samples` / world_size) images of its own share of
the held-out shards (greedy decoding). With class names known (the zero-shot set) a caption
"matches" when it names the image's class and no other class (whole words, any case); counts
are summed across ranks.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Callable, Iterable

import torch

from mmpretrain.eval.zeroshot import _all_reduce_sum
from mmpretrain.model.generate import Special, generate

log = logging.getLogger("mmpretrain.eval")


def names_class(caption: str, classnames: list[str], label: int) -> bool:
    """True when `caption` names class `label` and no other class (whole words, any case)."""
    found = {i for i, name in enumerate(classnames)
             if re.search(rf"\b{re.escape(name.lower())}\b", caption.lower())}
    return found == {label}


def special_ids(tokenizer: Any) -> Special:
    """The start/end/padding ids of an mmpretrain `Tokenizer`."""
    return Special(sot=tokenizer.sot_id, eot=tokenizer.eot_id, pad=tokenizer.pad_id)


@torch.no_grad()
def caption_batches(model: Any, batches: Iterable[dict], normalize: Callable, tokenizer: Any,
                    device: torch.device, limit: int, beam_width: int = 1
                    ) -> list[tuple[str, int, str]]:
    """(key, label, caption) of up to `limit` images of `batches`, in order."""
    out: list[tuple[str, int, str]] = []
    special = special_ids(tokenizer)
    for batch in batches:
        take = min(limit - len(out), batch["image"].shape[0])
        if take <= 0:
            break
        images = normalize(batch["image"][:take].to(device))  # (b, 3, S, S)
        ids = generate(model, images, special, beam_width=beam_width)
        labels = batch["labels"][:take].tolist()
        out += [(key, int(lab), tokenizer.decode(seq))
                for key, lab, seq in zip(batch["keys"][:take], labels, ids)]
    return out


def caption_metrics(model: Any, batches: Iterable[dict], normalize: Callable, tokenizer: Any,
                    device: torch.device, total: int, world_size: int,
                    classnames: list[str] | None) -> dict[str, Any]:
    """`caption_samples` and, with `classnames`, `caption_class_match` over all ranks."""
    per_rank = math.ceil(total / max(world_size, 1))
    captions = caption_batches(model, batches, normalize, tokenizer, device, per_rank)
    for key, label, text in captions[:3]:
        log.info("caption %s (label %s): %r", key, classnames[label] if classnames and
                 0 <= label < len(classnames) else label, text)
    hits = sum(1 for _, label, text in captions
               if classnames and 0 <= label < len(classnames)
               and names_class(text, classnames, label))
    labelled = sum(1 for _, label, _ in captions if classnames and 0 <= label < len(classnames))
    seen, hits, labelled = _all_reduce_sum([len(captions), hits, labelled], device)
    if seen == 0:
        raise RuntimeError("caption evaluation saw no held-out images")
    metrics: dict[str, Any] = {"caption_samples": int(seen)}
    if classnames and labelled:
        metrics["caption_class_match"] = hits / labelled
    return metrics
