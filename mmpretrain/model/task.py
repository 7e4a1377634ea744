"""The training task: model + loss in one module, so DeepSpeed wraps the forward and the loss.

Images arrive as uint8 (B, 3, H, W) and are normalized here, on the training device, in the
model's dtype (the data workers never touch floats). With gradient accumulation the contrastive
loss must see the negatives of the whole accumulated batch: the trainer first computes every
micro-batch's features without grad (`features_only=True`), then recomputes one micro-batch at a
time with grad and splices it into the cached features (`cache`, `index`) before the loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class FeatureCache:
    """Per-micro-batch features of one accumulated step (computed without grad)."""

    image: list[torch.Tensor] = field(default_factory=list)
    text: list[torch.Tensor] = field(default_factory=list)


class ContrastiveTask(nn.Module):
    """Normalizes images, runs the two-tower model and returns the contrastive loss."""

    def __init__(self, model: nn.Module, loss: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.loss = loss
        # Plain tensors, not buffers: they are constants, not checkpoint state.
        self._mean = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std).view(1, 3, 1, 1) * 255.0

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalized float in the model's parameter dtype."""
        dtype = next(self.model.parameters()).dtype
        mean = self._mean.to(images.device, torch.float32)
        std = self._std.to(images.device, torch.float32)
        return ((images.float() - mean) / std).to(dtype)  # (B, 3, H, W)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, *, features_only: bool = False,
                cache: FeatureCache | None = None, index: int = 0) -> dict[str, torch.Tensor]:
        """Return {'loss', 'image_features', 'text_features', 'logit_scale'} (no loss when
        `features_only`). With `cache`, micro-batch `index` is replaced by this forward's
        features and the loss covers all cached micro-batches."""
        out = self.model(self.normalize(images), tokens)
        img = out["image_features"].float()  # (B, E)
        txt = out["text_features"].float()  # (B, E)
        result = {"image_features": img, "text_features": txt,
                  "logit_scale": out["logit_scale"].float().reshape(())}
        if features_only:
            return result
        if cache is not None:
            img = torch.cat([*cache.image[:index], img, *cache.image[index + 1:]])
            txt = torch.cat([*cache.text[:index], txt, *cache.text[index + 1:]])
        scale, bias = result["logit_scale"], out.get("logit_bias")
        bias = None if bias is None else bias.float().reshape(())
        if cache is not None and index != 0:
            # Every micro-batch's loss depends on the scale/bias directly: let only the first
            # carry their gradient, or the accumulated gradient would count it `accum` times.
            scale, bias = scale.detach(), None if bias is None else bias.detach()
        args = (img, txt, scale) + (() if bias is None else (bias,))
        result["loss"] = self.loss(*args)
        return result
