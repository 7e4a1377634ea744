"""Training objectives: contrastive image–text losses (and, later, captioning)."""
from __future__ import annotations

from mmpretrain.losses.contrastive import (ClipLoss, SigLipLoss, build_loss, gather_features,
                                           gather_tensor)

__all__ = ["ClipLoss", "SigLipLoss", "build_loss", "gather_features", "gather_tensor"]
