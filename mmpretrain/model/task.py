"""The training task: model + loss in one module, so DeepSpeed wraps the forward and the loss.

Images arrive as uint8 (B, 3, H, W) and are normalized here, on the training device, in the
model's dtype (the data workers never touch floats). With gradient accumulation the contrastive
loss must see the negatives of the whole accumulated batch: the trainer first computes every
micro-batch's features without grad (`features_only=True`), then recomputes one micro-batch at a
time with grad and splices it into the cached features (`cache`, `index`) before the loss.
A CoCa model's captioning loss is per sample, so it needs no cache: each micro-batch's share is
its own loss divided by the number of micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class FeatureCache:
    """Per-micro-batch features of one accumulated step (computed without grad)."""

    image: list[torch.Tensor] = field(default_factory=list)
    text: list[torch.Tensor] = field(default_factory=list)


class ContrastiveTask(nn.Module):
    """Normalizes images, runs the model and returns its loss.

    The loss is ``contrastive_weight * contrastive + caption_weight * caption``; the caption
    term exists when `caption_loss` is given (a CoCa model, whose forward returns
    ``caption_logits``).
    """

    def __init__(self, model: nn.Module, loss: nn.Module, mean: list[float], std: list[float],
                 caption_loss: nn.Module | None = None, contrastive_weight: float = 1.0,
                 caption_weight: float = 2.0):
        super().__init__()
        self.model = model
        self.loss = loss
        self.caption_loss = caption_loss
        self.contrastive_weight = contrastive_weight
        self.caption_weight = caption_weight
        # Plain fp32 tensors, not buffers: constants, not checkpoint state, and out of reach of
        # DeepSpeed's bf16 cast of the module's buffers.
        self._mean = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std).view(1, 3, 1, 1) * 255.0
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) * 255 as fp32 (1, 3, 1, 1) on `device`, copied there once: a copy from
        pageable host memory waits for the device (`cudaStreamSynchronize`), which in every
        forward would stop the host from queueing work ahead of the GPU."""
        if device not in self._on_device:
            self._on_device[device] = (self._mean.to(device, torch.float32),
                                       self._std.to(device, torch.float32))
        return self._on_device[device]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalized float in the model's parameter dtype."""
        dtype = next(self.model.parameters()).dtype
        mean, std = self.stats(images.device)
        return ((images.float() - mean) / std).to(dtype)  # (B, 3, H, W)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, *, features_only: bool = False,
                cache: FeatureCache | None = None, index: int = 0) -> dict[str, torch.Tensor]:
        """Return {'loss', 'contrastive_loss', ['caption_loss'], 'image_features',
        'text_features', 'logit_scale'} (features and scale only when `features_only`). With
        `cache`, micro-batch `index` is replaced by this forward's features and the
        contrastive loss covers all cached micro-batches."""
        with_caption = self.caption_loss is not None and not features_only
        out = self.model(self.normalize(images), tokens, with_caption=with_caption)
        img = out["image_features"].float()  # (B, E)
        txt = out["text_features"].float()  # (B, E)
        result = {"image_features": img, "text_features": txt,
                  "logit_scale": out["logit_scale"].float().reshape(())}
        if features_only:
            return result
        contrastive = self._contrastive(img, txt, result["logit_scale"], out.get("logit_bias"),
                                        cache, index)
        loss = self.contrastive_weight * contrastive
        result["contrastive_loss"] = contrastive.detach()
        if with_caption:
            caption = self.caption_loss(out["caption_logits"], tokens)  # ()
            result["caption_loss"] = caption.detach()
            share = 1.0 / len(cache.image) if cache is not None else 1.0
            loss = loss + self.caption_weight * share * caption
        result["loss"] = loss
        return result

    def _contrastive(self, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None, cache: FeatureCache | None,
                     index: int) -> torch.Tensor:
        if cache is not None:
            img = torch.cat([*cache.image[:index], img, *cache.image[index + 1:]])
            txt = torch.cat([*cache.text[:index], txt, *cache.text[index + 1:]])
        bias = None if bias is None else bias.float().reshape(())
        if cache is not None and index != 0:
            # Every micro-batch's loss depends on the scale/bias directly: let only the first
            # carry their gradient, or the accumulated gradient would count it `accum` times.
            scale, bias = scale.detach(), None if bias is None else bias.detach()
        args = (img, txt, scale) + (() if bias is None else (bias,))
        return self.loss(*args)


def build_task(cfg: Any, model: nn.Module) -> ContrastiveTask:
    """The task of an `ExperimentConfig`: its contrastive loss, plus the captioning loss when
    `model.fusion.decoder` is on, weighted by `loss.contrastive_weight`/`caption_weight`."""
    from mmpretrain.losses import CaptionLoss, build_loss

    caption = CaptionLoss() if cfg.model.fusion.decoder else None
    return ContrastiveTask(model, build_loss(cfg.loss), cfg.data.mean, cfg.data.std, caption,
                           cfg.loss.contrastive_weight, cfg.loss.caption_weight)
