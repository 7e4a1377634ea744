"""Training objectives: contrastive image–text losses and CoCa's captioning loss."""
from __future__ import annotations

from mmpretrain.losses.caption import CaptionLoss
from mmpretrain.losses.contrastive import (ClipLoss, SigLipLoss, build_loss, gather_features,
                                           gather_tensor)

__all__ = ["CaptionLoss", "ClipLoss", "SigLipLoss", "build_loss", "gather_features", "gather_tensor"]
