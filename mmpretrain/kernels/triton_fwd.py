"""Forward Triton kernel of the fused attention (FlashAttention-2 style online softmax).

Private to `kernels/attention_triton.py`, which launches it. Every tensor is addressed through
explicit (batch, head, seq, dim) strides, so strided views (e.g. q = qkv[:, :, 0] of a packed
(B, S, 3, H, D) projection) are read without copies. The head dim D is padded to BLOCK_D (the
next power of two) with masked loads; ragged sequence tails are masked too.

Masking (see `kernels/reference.py`): query i may attend key j iff j < Sk, the key is kept by
the key-padding mask, and (causal) j <= i + (Sk - Sq). Fully masked rows give O = 0 and a
finite, very negative LSE, so the backward produces exact zero gradients for them.

Masks are applied only where they can matter (FlashAttention's even-block specialisation):
without a padding mask, whole key blocks that every row of the query block sees run a loop
with no per-score compare and select; the causal band and the ragged last block run the
masked loop. The dQ kernel (`triton_bwd.py`) walks keys the same way.
"""
from __future__ import annotations

import triton
import triton.language as tl

# log2(e): scores are kept in the log2 domain so that exp2 can be used.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Running-max start value: finite so that a block with every key masked gives
# exp2(m_old - m_new) = 1 and exp2(-inf - m_new) = 0 instead of NaN.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _keep_mask(rows, cols, b, KPM, smb, smn, SEQ_Q, SEQ_K,
               CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: query rows[i] may attend key cols[j]."""
    keep = (rows[:, None] < SEQ_Q) & (cols[None, :] < SEQ_K)  # (BM, BN)
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + (SEQ_K - SEQ_Q))
    if HAS_KPM:
        kp = tl.load(KPM + b * smb + cols * smn, mask=cols < SEQ_K, other=0)  # (BN,)
        keep = keep & (kp != 0)[None, :]
    return keep


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, KPM, b, rows, offs_d, d_ok,
               sks, skd, svs, svd, smb, smn, qk_scale, SEQ_Q, SEQ_K, lo, hi,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_KPM: tl.constexpr, STAGES: tl.constexpr = None):
    """Online-softmax update of (acc, l_i, m_i) over the key blocks of BLOCK_N in [lo, hi).

    MASKED applies the sequence-end, causal and padding masks; without it every key of these
    blocks must exist and be visible to every row that is stored (the caller's split).
    """
    offs_n = tl.arange(0, BLOCK_N)  # (BN,)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        cols = start_n + offs_n  # (BN,)
        kt_mask = d_ok[:, None]  # (BD, 1)
        v_mask = d_ok[None, :]  # (1, BD)
        if MASKED:
            kt_mask = kt_mask & (cols < SEQ_K)[None, :]  # (BD, BN)
            v_mask = v_mask & (cols < SEQ_K)[:, None]  # (BN, BD)
        kt = tl.load(k_base + cols[None, :] * sks + offs_d[:, None] * skd,
                     mask=kt_mask, other=0.0)  # (BD, BN)
        s = tl.dot(q, kt) * qk_scale  # (BM, BN) fp32, log2 domain
        if MASKED:
            keep = _keep_mask(rows, cols, b, KPM, smb, smn, SEQ_Q, SEQ_K, CAUSAL, HAS_KPM)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BM,)
        alpha = tl.exp2(m_i - m_new)  # (BM,)
        p = tl.exp2(s - m_new[:, None])  # (BM, BN), 0 where masked
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :] * svd,
                    mask=v_mask, other=0.0)  # (BN, BD)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # (BM, BD)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _unmasked_end(first_row, SEQ_Q, SEQ_K, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """Keys [0, end) form whole BLOCK_N blocks that every row of the query block starting at
    `first_row` sees: no sequence end inside, and (causal) all left of its first row's
    diagonal. 0 with a padding mask. Also used by the dQ kernel, which walks the keys the same
    way."""
    end = (SEQ_K // BLOCK_N) * BLOCK_N
    if CAUSAL:
        seen = tl.maximum(first_row + (SEQ_K - SEQ_Q) + 1, 0)  # keys the first row sees
        end = tl.minimum(end, (seen // BLOCK_N) * BLOCK_N)
    if HAS_KPM:
        end = 0
    return end


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, KPM,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sob, soh, sos, sod,
    smb, smn,
    sm_scale, H, SEQ_Q, SEQ_K, ROW0,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    TAIL_N: tl.constexpr,
):
    """One program = one (batch*head, query block); the blocks start at query row ROW0.
    Grid: (query blocks, B * H): cdiv(Sq, BLOCK_M) from row 0, or (a ragged query tail,
    `_forward`) the whole blocks, then one more launch for the tail rows in a smaller block.

    Writes O (B, H, Sq, D) and LSE (B, H, Sq) fp32 (natural-log log-sum-exp of scaled scores).
    Interior key blocks run without masks; the causal band and the ragged tail with them.
    Without causality or padding the ragged tail is one block of TAIL_N keys (`tail_block`);
    causal and padded calls keep BLOCK_N there (TAIL_N is ignored): extra loops pushed the
    masked backward kernels into register spills (sm_90, `bench attention --aot`).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets of large tensors pass 2**31
    h = pid_bh % H
    first = ROW0 + pid_m * BLOCK_M  # this block's first query row
    rows = first + tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, BLOCK_D)  # (BD,)
    d_ok = offs_d < HEAD_D
    row_ok = rows < SEQ_Q
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BM, BD)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    qk_scale = sm_scale * LOG2E
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + NEG_BIG  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # (BM, BD)
    hi = SEQ_K
    if CAUSAL:
        # Key blocks past the last key visible to this query block are skipped entirely.
        hi = tl.minimum(SEQ_K, first + BLOCK_M + (SEQ_K - SEQ_Q))
    mid = _unmasked_end(first, SEQ_Q, SEQ_K, BLOCK_N, CAUSAL, HAS_KPM)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, KPM, b, rows, offs_d,
                               d_ok, sks, skd, svs, svd, smb, smn, qk_scale, SEQ_Q, SEQ_K,
                               0, mid, BLOCK_N, False, CAUSAL, HAS_KPM)
    if CAUSAL or HAS_KPM:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, KPM, b, rows, offs_d,
                                   d_ok, sks, skd, svs, svd, smb, smn, qk_scale, SEQ_Q, SEQ_K,
                                   mid, hi, BLOCK_N, True, CAUSAL, HAS_KPM)
    else:  # what is left is the ragged tail, Sk % BLOCK_N keys: one TAIL_N block
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, KPM, b, rows, offs_d,
                                   d_ok, sks, skd, svs, svd, smb, smn, qk_scale, SEQ_Q, SEQ_K,
                                   mid, hi, TAIL_N, True, CAUSAL, HAS_KPM, 1)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # fully masked rows: acc = 0 -> O = 0
    out = acc / l_safe[:, None]  # (BM, BD)
    tl.store(O + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_safe)) * LN2  # (BM,) natural log
    tl.store(LSE + pid_bh * SEQ_Q + rows, lse, mask=row_ok)
