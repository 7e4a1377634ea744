"""Contrastive image–text losses (CLIP InfoNCE, SigLIP) over the global batch of all ranks.

Both losses take L2-normalized features, (B, E) per rank, and the *exponentiated* logit scale
(as returned by `CLIP.forward`). With torch.distributed initialized and world size W > 1 they
gather the other ranks' features; every rank must pass the same local batch size B.

What equals what across ranks (W ranks, rank r holding rows r*B .. r*B+B-1 of a global batch
whose 1-rank loss is L):

* The mean over ranks of the per-rank losses equals L (for ClipLoss without local_loss each
  rank's loss *is* L).
* With ``gather_with_grad=True`` the gradient a rank gets for its *local* features is
  W * dL/d(its slice): the gather's backward sums the gradient contributions of all W ranks.
  DDP/DeepSpeed average parameter gradients over ranks, which divides that W back out, so the
  averaged parameter gradients are exactly dL/dθ.
* With ``gather_with_grad=False`` (ClipLoss, local_loss=False) each rank's local feature
  gradient is exactly dL/d(its slice) (other ranks' features are constants that equal the
  real ones), so averaged parameter gradients are dL/dθ / W. With local_loss=True or SigLIP, it
  drops the terms in which the local features act as other ranks' negatives (an approximation).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

from mmpretrain.config.schema import LossConfig
from mmpretrain.losses.fused import infonce, siglip


_ONE_PROCESS = [False]


@contextlib.contextmanager
def as_one_process() -> Iterator[None]:
    """Inside, the losses ignore the process group: no collectives, the local batch alone. For
    a forward that one rank runs by itself (the memory plan's measurement, `engine/memory.py`),
    where a gather would wait forever for ranks that never join it."""
    before = _ONE_PROCESS[0]
    _ONE_PROCESS[0] = True
    try:
        yield
    finally:
        _ONE_PROCESS[0] = before


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when not distributed (or
    inside `as_one_process`)."""
    if not _ONE_PROCESS[0] and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_tensor(x: torch.Tensor, gather_with_grad: bool) -> torch.Tensor:
    """All-gather (B, ...) from every rank into (W*B, ...), ordered by rank.

    With `gather_with_grad` the gather is differentiable (its backward sums the gradients from
    all ranks into each rank's slice); without, other ranks' slices are constants and the local
    tensor is put back in place so local gradients still flow.
    """
    rank, world = _world()
    if world == 1:
        return x
    if gather_with_grad:
        return torch.cat(dist_nn.all_gather(x), dim=0)  # (W*B, ...)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)  # (W*B, ...)


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    gather_with_grad: bool = True,
    local_loss: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather (B, E) image and text features of all ranks into (W*B, E) each, ordered by rank.

    `local_loss` does not change what is gathered (every rank needs all features as negatives);
    it is accepted for open_clip-compatible call sites.
    """
    del local_loss
    return (gather_tensor(image_features, gather_with_grad),
            gather_tensor(text_features, gather_with_grad))


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean of image→text and text→image cross-entropy over the global batch.

    ``local_loss=False``: every rank computes the full (W*B, W*B) logit matrix and the full
    loss. ``local_loss=True``: each rank computes only its own B rows against all W*B columns,
    in both directions, with labels offset by rank*B (less memory; mean over ranks = full loss).
    ``fused=True``: the same loss from `fused.infonce`, in row chunks of at most `chunk` rows
    with its own backward, never holding the whole logit matrix.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True,
                 fused: bool = False, chunk: int | None = None) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.fused = fused
        self.chunk = chunk

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None
                ) -> torch.Tensor:
        """image/text features (B, E), logit_scale () or (1,) -> scalar loss.

        A `logit_bias` is accepted for a uniform call signature and ignored: a constant added
        to every logit cancels in the softmax.
        """
        rank, world = _world()
        batch = image_features.shape[0]
        all_img, all_txt = gather_features(image_features, text_features,
                                           self.gather_with_grad, self.local_loss)  # (W*B, E)
        del logit_bias
        if self.fused and self.local_loss:
            offset = rank * batch
            return 0.5 * (infonce(image_features, all_txt, logit_scale, offset, chunk=self.chunk)
                          + infonce(text_features, all_img, logit_scale, offset,
                                    chunk=self.chunk))
        if self.fused:
            return infonce(all_img, all_txt, logit_scale, symmetric=True, chunk=self.chunk)
        if self.local_loss:
            logits_per_image = logit_scale * image_features @ all_txt.T  # (B, W*B)
            logits_per_text = logit_scale * text_features @ all_img.T  # (B, W*B)
            labels = torch.arange(batch, device=image_features.device) + rank * batch  # (B,)
        else:
            logits_per_image = logit_scale * all_img @ all_txt.T  # (W*B, W*B)
            logits_per_text = logits_per_image.T  # (W*B, W*B)
            labels = torch.arange(world * batch, device=image_features.device)  # (W*B,)
        return 0.5 * (F.cross_entropy(logits_per_image, labels)
                      + F.cross_entropy(logits_per_text, labels))


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP): -1/N * sum_ij logsigmoid(z_ij * (scale * x_i·y_j + bias)).

    z_ij = +1 for matching pairs (the diagonal of the global batch), -1 otherwise; N is the
    number of image rows. Across W ranks each rank gathers all text features and computes its
    own B image rows against all W*B texts, normalized by its B rows (as open_clip does), so the
    mean over ranks of the per-rank losses equals the 1-rank loss on the concatenated batch,
    which is normalized by its W*B rows. Image features are never gathered. ``fused=True``
    computes the same loss with `fused.siglip` (row chunks, its own backward).
    """

    def __init__(self, gather_with_grad: bool = True, fused: bool = False,
                 chunk: int | None = None) -> None:
        super().__init__()
        self.gather_with_grad = gather_with_grad
        self.fused = fused
        self.chunk = chunk

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None
                ) -> torch.Tensor:
        """image/text features (B, E), logit_scale and logit_bias () or (1,) -> scalar loss."""
        rank, _ = _world()
        batch = image_features.shape[0]
        all_txt = gather_tensor(text_features, self.gather_with_grad)  # (W*B, E)
        if self.fused:
            return siglip(image_features, all_txt, logit_scale, logit_bias, rank * batch,
                          chunk=self.chunk)
        logits = logit_scale * image_features @ all_txt.T  # (B, W*B)
        if logit_bias is not None:
            logits = logits + logit_bias  # (B, W*B)
        labels = -torch.ones_like(logits)  # (B, W*B)
        rows = torch.arange(batch, device=logits.device)  # (B,)
        labels[rows, rows + rank * batch] = 1.0
        return -F.logsigmoid(labels * logits).sum() / batch


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module named by ``loss.kind`` (`local_loss` applies to CLIP only)."""
    if cfg.kind == "clip":
        return ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                        fused=cfg.fused)
    if cfg.kind == "siglip":
        return SigLipLoss(gather_with_grad=cfg.gather_with_grad, fused=cfg.fused)
    raise ValueError(f"loss.kind must be 'clip' or 'siglip', got {cfg.kind!r}")
