"""Fused contrastive losses: InfoNCE and SigLIP computed in row chunks with their own backward.

The plain losses (`contrastive.py`) build the whole logit matrix and let autograd keep what
each op needs: for CLIP over N = global-batch samples that is one (N, N) log-softmax per
direction, 8·N² bytes in fp32 (measured with saved-tensor hooks) — 8 GiB on every rank at
N = 32,768, held from the end of the forward until the backward — plus (N, N) gradients and
temporaries in the backward; SigLIP keeps 12 bytes per logit of its (B, N) rows. Here each
loss is an `autograd.Function` that walks `chunk` rows of the matrix at a time:

* forward: each row chunk's logits (c, C) give the rows' log-sum-exp and, merged across chunks
  with `logaddexp`, the columns' log-sum-exp; the positives come from a row-wise dot product.
  It saves only the features, the scale and the two (N,) log-sum-exp vectors.
* backward: each chunk's logits are recomputed (one more matmul) and turned straight into
  the logits' gradient, softmax(rows) + softmax(columns) − 2·I, scaled, then into the
  features' and the scale's gradients.

Peak memory of the loss is then O(c·C) instead of O(N²) and no (N, N) tensor outlives the
forward. The values are those of the plain losses (the same math, rounded differently).
Gathering other ranks' features stays with the caller, so the cross-rank semantics of
`contrastive.py` hold unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMS = 1 << 24
"""Logit elements per chunk (64 MiB in fp32): batches up to 4,096 run as a single chunk."""


def chunk_rows(cols: int, chunk_elems: int = CHUNK_ELEMS) -> int:
    """Rows per chunk so that one chunk of logits holds at most `chunk_elems` elements."""
    return max(1, chunk_elems // max(1, cols))


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _raw(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(c, E) x (C, E) -> (c, C) unscaled similarities in the accumulation dtype."""
    return (a @ b.T).to(_acc(a))


def _positive_index(rows: int, start: int, offset: int, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) indices of the matching pairs of chunk rows start .. start+rows-1."""
    i = torch.arange(rows, device=device)  # (c,)
    return i, i + offset + start


def _feature_grads(ctx, g: torch.Tensor, a_c: torch.Tensor, b: torch.Tensor,
                   scale: torch.Tensor, db: torch.Tensor | None) -> torch.Tensor | None:
    """From the logits' gradient g (c, C) of one chunk: accumulate dL/db, return dL/da_c (the
    scale multiplies the (·, E) products rather than the (c, C) matrix)."""
    g = g.to(a_c.dtype)
    if db is not None:
        db += (g.T @ a_c).to(db.dtype) * scale  # (C, E)
    return (g @ b) * scale.to(a_c.dtype) if ctx.needs_input_grad[0] else None  # (c, E)


class InfoNCE(torch.autograd.Function):
    """Mean cross-entropy of `scale·a·bᵀ` rows (and columns) with positives at (i, offset+i).

    a (R, E), b (C, E), scale () -> loss (). `symmetric` (R == C, offset 0) averages the row
    (a→b) and the column (b→a) cross-entropy, CLIP's loss over the full matrix; otherwise it is
    the row direction only (one half of CLIP's `local_loss`).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int,
                symmetric: bool, chunk: int) -> torch.Tensor:
        rows, acc = a.shape[0], _acc(a)
        if symmetric and (rows != b.shape[0] or offset != 0):
            raise ValueError("a symmetric InfoNCE needs a square matrix without offset")
        s = scale.reshape(()).to(acc)
        row_lse = torch.empty(rows, dtype=acc, device=a.device)  # (R,)
        col_lse = None
        for start in range(0, rows, chunk):
            logits = _raw(a[start:start + chunk], b).mul_(s)  # (c, C)
            row_lse[start:start + chunk] = torch.logsumexp(logits, dim=1)
            if symmetric:
                part = torch.logsumexp(logits, dim=0)  # (C,)
                col_lse = part if col_lse is None else torch.logaddexp(col_lse, part)
        pos = s * (a.to(acc) * b[offset:offset + rows].to(acc)).sum(dim=1)  # (R,)
        loss = (row_lse - pos).mean()
        if symmetric:
            loss = 0.5 * (loss + (col_lse - pos).mean())
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        ctx.offset, ctx.chunk = offset, chunk
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        rows, cols, acc = a.shape[0], b.shape[0], row_lse.dtype
        s = scale.reshape(()).to(acc)
        w = grad.to(acc) * (0.5 if col_lse is not None else 1.0)
        w_row, w_col = w / rows, w / cols
        w_pos = w_row + (w_col if col_lse is not None else 0.0)
        da = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        db = torch.zeros(b.shape, dtype=acc, device=b.device) if ctx.needs_input_grad[1] else None
        dscale = torch.zeros((), dtype=acc, device=a.device)
        for start in range(0, rows, ctx.chunk):
            a_c = a[start:start + ctx.chunk]
            raw = _raw(a_c, b)  # (c, C)
            # softmax over the row (and over the column) times its weight, in place
            g = raw.mul(s).sub_(row_lse[start:start + ctx.chunk, None]).exp_().mul_(w_row)
            if col_lse is not None:
                g += raw.mul(s).sub_(col_lse[None, :]).exp_().mul_(w_col)
            g[_positive_index(a_c.shape[0], start, ctx.offset, a.device)] -= w_pos
            if ctx.needs_input_grad[2]:
                dscale += torch.dot(g.view(-1), raw.view(-1))
            d = _feature_grads(ctx, g, a_c, b, s, db)
            if da is not None:
                da[start:start + ctx.chunk] = d
        return (da, None if db is None else db.to(b.dtype),
                dscale.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None,
                None, None, None)


class SigLip(torch.autograd.Function):
    """SigLIP's pairwise sigmoid loss of `scale·a·bᵀ + bias`, positives at (i, offset+i):
    -1/R · Σ_ij log σ(z_ij·l_ij), z = +1 on positives and −1 elsewhere.

    a (R, E), b (C, E), scale (), bias () or None -> loss ().
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, offset: int, chunk: int) -> torch.Tensor:
        rows, acc = a.shape[0], _acc(a)
        s = scale.reshape(()).to(acc)
        c0 = (bias.reshape(()).to(acc) if bias is not None
              else torch.zeros((), dtype=acc, device=a.device))
        total = torch.zeros((), dtype=acc, device=a.device)
        for start in range(0, rows, chunk):
            logits = _raw(a[start:start + chunk], b).mul_(s).add_(c0)  # (c, C)
            total += -F.logsigmoid(-logits).sum()  # every pair as a negative
            lp = logits[_positive_index(logits.shape[0], start, offset, a.device)]  # (c,)
            total += (F.logsigmoid(-lp) - F.logsigmoid(lp)).sum()  # positives: z = +1
        ctx.save_for_backward(a, b, scale, bias)
        ctx.offset, ctx.chunk = offset, chunk
        return total / rows

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b, scale, bias = ctx.saved_tensors
        rows, acc = a.shape[0], _acc(a)
        s = scale.reshape(()).to(acc)
        c0 = (bias.reshape(()).to(acc) if bias is not None
              else torch.zeros((), dtype=acc, device=a.device))
        w = grad.to(acc) / rows
        da = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        db = torch.zeros(b.shape, dtype=acc, device=b.device) if ctx.needs_input_grad[1] else None
        dscale = torch.zeros((), dtype=acc, device=a.device)
        dbias = torch.zeros((), dtype=acc, device=a.device)
        for start in range(0, rows, ctx.chunk):
            a_c = a[start:start + ctx.chunk]
            raw = _raw(a_c, b)  # (c, C)
            g = raw.mul(s).add_(c0)  # the logits, then in place their gradient
            pos = _positive_index(a_c.shape[0], start, ctx.offset, a.device)
            lp = g[pos]  # (c,) a copy
            g.sigmoid_().mul_(w)  # d softplus(l) / dl for the negatives
            g[pos] = -torch.sigmoid(-lp) * w  # d softplus(-l) / dl for the positives
            if ctx.needs_input_grad[2]:
                dscale += torch.dot(g.view(-1), raw.view(-1))
            if bias is not None and ctx.needs_input_grad[3]:
                dbias += g.sum()
            d = _feature_grads(ctx, g, a_c, b, s, db)
            if da is not None:
                da[start:start + ctx.chunk] = d
        dscale = dscale.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        dbias = (dbias.to(bias.dtype).reshape(bias.shape)
                 if bias is not None and ctx.needs_input_grad[3] else None)
        return da, None if db is None else db.to(b.dtype), dscale, dbias, None, None


def infonce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int = 0,
            symmetric: bool = False, chunk: int | None = None) -> torch.Tensor:
    """`InfoNCE` with `chunk` rows per step (default: `chunk_rows` of b's length)."""
    return InfoNCE.apply(a, b, scale, offset, symmetric, chunk or chunk_rows(b.shape[0]))


def siglip(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
           bias: torch.Tensor | None = None, offset: int = 0,
           chunk: int | None = None) -> torch.Tensor:
    """`SigLip` with `chunk` rows per step (default: `chunk_rows` of b's length)."""
    return SigLip.apply(a, b, scale, bias, offset, chunk or chunk_rows(b.shape[0]))
