"""The CoCa captioning loss: next-token cross-entropy over the real (non-padding) tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain.model.text import PAD_ID


class CaptionLoss(nn.Module):
    """Mean next-token cross-entropy of a caption decoder's logits.

    Position t's logits predict token t + 1; targets equal to `pad_id` (the right padding) are
    ignored, the end-of-text token is a target, the start token never is. The mean is over the
    micro-batch's target tokens (as open_clip's CoCa loss). Computed in fp32.
    """

    def __init__(self, pad_id: int = PAD_ID) -> None:
        super().__init__()
        self.pad_id = pad_id

    def check(self, tokens: torch.Tensor) -> None:
        """Raise ValueError when every target token of `tokens` (B, S) is padding (the mean
        would be 0/0). Only for tokens in host memory: reading a GPU tensor's answer on the
        host waits for the device, so the trainer checks each batch before copying it."""
        if tokens.device.type == "cpu" and not (tokens[:, 1:] != self.pad_id).any():
            raise ValueError("caption loss: every target token is padding (empty captions?)")

    def forward(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """logits (B, S, V), tokens (B, S) -> 0-dim loss."""
        pred = logits[:, :-1].float()  # (B, S-1, V)
        target = tokens[:, 1:]  # (B, S-1)
        self.check(tokens)
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                               ignore_index=self.pad_id)
