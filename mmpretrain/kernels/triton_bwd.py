"""Backward Triton kernels of the fused attention (FlashAttention-2 style, atomic-free).

Private to `kernels/attention_triton.py`. Three plans; split and fused after

* `_attn_bwd_preprocess`: delta = rowsum(dO * O), (B, H, Sq) fp32.

Split (any length): `_attn_bwd_dkdv`, one program per key block iterating over query blocks,
recomputes P = exp(S - LSE) from the forward's LSE and accumulates dK and dV in fp32
registers; `_attn_bwd_dq`, one program per query block iterating over key blocks, recomputes P
and dP again and accumulates dQ. Fused (short sequences, many heads): `_attn_bwd_fused`, one
program per (batch, head), computes P and dP once per block pair and accumulates dQ in an fp32
buffer it alone owns. Resident (the fused plan when one query block holds every row, Sq <=
256): `_attn_bwd_resident`, one program per (batch, head) with Q, dO and dQ held for the whole
pass, one step per key block, delta computed in the kernel.

With dS = P * (dP - delta) and dP = dO V^T: dV = P^T dO, dK = scale * dS^T Q, dQ = scale * dS K.
Strides and masking follow `triton_fwd.py` (fully masked rows have P = 0, hence zero grads).
"""
from __future__ import annotations

import triton
import triton.language as tl

from mmpretrain.kernels.triton_fwd import LOG2E, _keep_mask, _unmasked_end


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    sob, soh, sos, sod,
    sdob, sdoh, sdos, sdod,
    H, SEQ_Q,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d]. Grid: (cdiv(Sq, BM), B * H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets of large tensors pass 2**31
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, BLOCK_D)  # (BD,)
    mask = (rows[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_D)  # (BM, BD)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)  # (BM, BD)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdos + offs_d[None, :] * sdod,
                 mask=mask, other=0.0).to(tl.float32)  # (BM, BD)
    tl.store(DELTA + pid_bh * SEQ_Q + rows, tl.sum(o * do, 1), mask=rows < SEQ_Q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE, DELTA, KPM, b, pid_bh, cols,
                offs_d, d_ok, sqs, sqd, sdos, sdod, smb, smn, qk_scale, SEQ_Q, SEQ_K, lo, hi,
                acc_base, start_n, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                ACC_DQ: tl.constexpr, STAGES: tl.constexpr = None):
    """Accumulate dK, dV (BN, BD) of one key block over the query blocks of BLOCK_M rows in
    [lo, hi).

    Without MASKED the scores are not masked: rows past Sq load q = dO = 0 and add nothing,
    keys past Sk only reach their own dK/dV rows, which are never stored.
    With ACC_DQ (the fused backward) dS K is also added into the fp32 dQ rows (BM, BD) at
    `acc_base` (read-modify-write; the first key block, `start_n` 0, writes instead). dQ sums
    over keys, so there a key past Sk (loaded as 0, P = exp(-lse) possibly inf) must be masked.
    """
    offs_m = tl.arange(0, BLOCK_M)  # (BM,)
    for start_m in tl.range(lo, hi, BLOCK_M, num_stages=STAGES):
        rows = start_m + offs_m  # (BM,)
        q_mask = (rows[:, None] < SEQ_Q) & d_ok[None, :]  # (BM, BD)
        q = tl.load(q_base + rows[:, None] * sqs + offs_d[None, :] * sqd,
                    mask=q_mask, other=0.0)  # (BM, BD)
        do = tl.load(do_base + rows[:, None] * sdos + offs_d[None, :] * sdod,
                     mask=q_mask, other=0.0)  # (BM, BD)
        lse = tl.load(LSE + pid_bh * SEQ_Q + rows, mask=rows < SEQ_Q, other=0.0)  # (BM,)
        delta = tl.load(DELTA + pid_bh * SEQ_Q + rows, mask=rows < SEQ_Q, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale - (lse * LOG2E)[:, None]  # (BM, BN)
        if MASKED:
            keep = _keep_mask(rows, cols, b, KPM, smb, smn, SEQ_Q, SEQ_K, CAUSAL, HAS_KPM)
            s = tl.where(keep, s, float("-inf"))
        p = tl.exp2(s)  # (BM, BN)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)  # (BN, BD)
        dp = tl.dot(do, tl.trans(v))  # (BM, BN)
        ds = (p * (dp - delta[:, None])).to(q.dtype)  # (BM, BN)
        dk = tl.dot(tl.trans(ds), q, dk)  # (BN, BD)
        if ACC_DQ:
            acc_ptrs = acc_base + rows[:, None] * BLOCK_D + offs_d[None, :]  # (BM, BD)
            row_ok = (rows < SEQ_Q)[:, None]
            dq = tl.load(acc_ptrs, mask=row_ok & (start_n > 0), other=0.0)  # (BM, BD) fp32
            tl.store(acc_ptrs, tl.dot(ds, k, dq), mask=row_ok)
    return dk, dv


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, KPM, b, rows, offs_d, d_ok,
              sks, skd, svs, svd, smb, smn, qk_scale, SEQ_Q, SEQ_K, lo, hi,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_KPM: tl.constexpr, STAGES: tl.constexpr = None):
    """Accumulate dQ (BM, BD) of one query block over the key blocks of BLOCK_N in [lo, hi);
    without MASKED every key there must exist and be visible (`_unmasked_end`)."""
    offs_n = tl.arange(0, BLOCK_N)  # (BN,)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        cols = start_n + offs_n  # (BN,)
        kv_mask = d_ok[None, :]  # (1, BD)
        if MASKED:
            kv_mask = kv_mask & (cols < SEQ_K)[:, None]  # (BN, BD)
        k = tl.load(k_base + cols[:, None] * sks + offs_d[None, :] * skd,
                    mask=kv_mask, other=0.0)  # (BN, BD)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :] * svd,
                    mask=kv_mask, other=0.0)  # (BN, BD)
        s = tl.dot(q, tl.trans(k)) * qk_scale - (lse * LOG2E)[:, None]  # (BM, BN)
        if MASKED:
            keep = _keep_mask(rows, cols, b, KPM, smb, smn, SEQ_Q, SEQ_K, CAUSAL, HAS_KPM)
            s = tl.where(keep, s, float("-inf"))
        p = tl.exp2(s)  # (BM, BN)
        dp = tl.dot(do, tl.trans(v))  # (BM, BN)
        ds = p * (dp - delta[:, None])  # (BM, BN)
        dq = tl.dot(ds.to(k.dtype), k, dq)  # (BM, BD)
    return dq


@triton.jit
def _dkdv_block(start_n, K, V, DK, DV, q_base, do_base, acc_base, LSE, DELTA, KPM, b, h,
                pid_bh, offs_d, d_ok, skb, skh, sks, skd, svb, svh, svs, svd,
                sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd, sqs, sqd, sdos, sdod, smb, smn,
                sm_scale, SEQ_Q, SEQ_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_KPM: tl.constexpr, ACC_DQ: tl.constexpr, STAGES: tl.constexpr = None):
    """Key block [start_n, start_n + BN): dK, dV over the query rows that see it, stored;
    with ACC_DQ (fused backward) dQ rows are accumulated at `acc_base` too (`STAGES`: the
    software pipelining of the loop over query blocks; None: the launch's)."""
    cols = start_n + tl.arange(0, BLOCK_N)  # (BN,)
    kv_mask = (cols[:, None] < SEQ_K) & d_ok[None, :]  # (BN, BD)
    k = tl.load(K + b * skb + h * skh + cols[:, None] * sks + offs_d[None, :] * skd,
                mask=kv_mask, other=0.0)  # (BN, BD)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svs + offs_d[None, :] * svd,
                mask=kv_mask, other=0.0)  # (BN, BD)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        # Query rows before the first one that sees this key block contribute nothing.
        lo = tl.maximum(0, start_n - (SEQ_K - SEQ_Q))
        lo = (lo // BLOCK_M) * BLOCK_M
        if ACC_DQ:  # the first key block visits every row: it writes all of the dQ buffer
            lo = tl.where(start_n == 0, 0, lo)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE, DELTA, KPM, b, pid_bh, cols,
                         offs_d, d_ok, sqs, sqd, sdos, sdod, smb, smn,
                         sm_scale * LOG2E, SEQ_Q, SEQ_K, lo, SEQ_Q, acc_base, start_n,
                         BLOCK_M, BLOCK_D, MASKED, CAUSAL, HAS_KPM, ACC_DQ, STAGES)
    tl.store(DK + b * sdkb + h * sdkh + cols[:, None] * sdks + offs_d[None, :] * sdkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + h * sdvh + cols[:, None] * sdvs + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)
    if ACC_DQ:
        # The next key block reads back dQ rows other threads of this program wrote.
        tl.debug_barrier()


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sdob, sdoh, sdos, sdod,
    sdkb, sdkh, sdks, sdkd,
    sdvb, sdvh, sdvs, sdvd,
    smb, smn,
    sm_scale, H, SEQ_Q, SEQ_K,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
):
    """dK, dV for one key block of one (batch, head). Grid: (cdiv(Sk, BLOCK_N), B * H).

    Masks matter only to causal or padded attention: rows past Sq and keys past Sk add
    nothing to the dK/dV that are stored (`_dkdv_inner`). One loop either way: splitting the
    causal band off, as the forward does, made ptxas spill ~100 bytes (sm_90).
    """
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets of large tensors pass 2**31
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)  # (BD,)
    _dkdv_block(tl.program_id(0) * BLOCK_N, K, V, DK, DV, Q + b * sqb + h * sqh,
                DO + b * sdob + h * sdoh, DELTA, LSE, DELTA, KPM, b, h, pid_bh,
                offs_d, offs_d < HEAD_D, skb, skh,
                sks, skd, svb, svh, svs, svd, sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd,
                sqs, sqd, sdos, sdod, smb, smn, sm_scale, SEQ_Q, SEQ_K, BLOCK_M, BLOCK_N,
                BLOCK_D, CAUSAL or HAS_KPM, CAUSAL, HAS_KPM, False)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, KPM,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sdob, sdoh, sdos, sdod,
    sdqb, sdqh, sdqs, sdqd,
    smb, smn,
    sm_scale, H, SEQ_Q, SEQ_K,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    TAIL_N: tl.constexpr,
):
    """dQ for one query block of one (batch, head). Grid: (cdiv(Sq, BLOCK_M), B * H).
    Keys after the last whole BLOCK_N block run in blocks of TAIL_N, as in the forward."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets of large tensors pass 2**31
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, BLOCK_D)  # (BD,)
    d_ok = offs_d < HEAD_D
    q_mask = (rows[:, None] < SEQ_Q) & d_ok[None, :]  # (BM, BD)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :] * sqd,
                mask=q_mask, other=0.0)  # (BM, BD)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdos + offs_d[None, :] * sdod,
                 mask=q_mask, other=0.0)  # (BM, BD)
    lse = tl.load(LSE + pid_bh * SEQ_Q + rows, mask=rows < SEQ_Q, other=0.0)  # (BM,)
    delta = tl.load(DELTA + pid_bh * SEQ_Q + rows, mask=rows < SEQ_Q, other=0.0)  # (BM,)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    qk_scale = sm_scale * LOG2E
    hi = SEQ_K
    if CAUSAL:
        hi = tl.minimum(SEQ_K, (pid_m + 1) * BLOCK_M + (SEQ_K - SEQ_Q))
    mid = _unmasked_end(pid_m * BLOCK_M, SEQ_Q, SEQ_K, BLOCK_N, CAUSAL, HAS_KPM)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, KPM, b, rows, offs_d, d_ok,
                   sks, skd, svs, svd, smb, smn, qk_scale, SEQ_Q, SEQ_K, 0, mid,
                   BLOCK_N, False, CAUSAL, HAS_KPM)
    if CAUSAL or HAS_KPM:
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, KPM, b, rows, offs_d, d_ok,
                       sks, skd, svs, svd, smb, smn, qk_scale, SEQ_Q, SEQ_K, mid, hi,
                       BLOCK_N, True, CAUSAL, HAS_KPM)
    else:  # the ragged tail, Sk % BLOCK_N keys: one TAIL_N block
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, KPM, b, rows, offs_d, d_ok,
                       sks, skd, svs, svd, smb, smn, qk_scale, SEQ_Q, SEQ_K, mid, hi,
                       TAIL_N, True, CAUSAL, HAS_KPM, 1)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqs + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _attn_bwd_fused(
    Q, K, V, DO, DQ, DK, DV, DQ_ACC, LSE, DELTA, KPM,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sdob, sdoh, sdos, sdod,
    sdqb, sdqh, sdqs, sdqd,
    sdkb, sdkh, sdks, sdkd,
    sdvb, sdvh, sdvs, sdvd,
    smb, smn,
    sm_scale, H, SEQ_Q, SEQ_K,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    TAIL_N: tl.constexpr,
):
    """dQ, dK, dV of one whole (batch, head) in one pass. Grid: (B * H,).

    For short sequences (the towers' 77-577 tokens) with many (batch, head) pairs: P and dP
    are computed once per (query block, key block) instead of once in each of the dK/dV and
    dQ kernels (5 matmuls and one exp2 per score instead of 7 and two). dQ is summed over key
    blocks in DQ_ACC (B * H, Sq, BLOCK_D) fp32, owned by this program (no atomics), then
    scaled and cast into DQ.
    """
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets of large tensors pass 2**31
    h = pid_bh % H
    offs_m = tl.arange(0, BLOCK_M)  # (BM,)
    offs_d = tl.arange(0, BLOCK_D)  # (BD,)
    d_ok = offs_d < HEAD_D
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    acc_base = DQ_ACC + pid_bh.to(tl.int64) * SEQ_Q * BLOCK_D
    # Causal or padded: every key block runs with masks. Otherwise whole key blocks run
    # unmasked and the ragged key tail as one masked block of TAIL_N keys (its query loop not
    # software-pipelined). A query tail in smaller blocks as well spilled ~200 bytes per thread
    # under Triton 3.6 (sm_90), so every key block walks the queries in whole BLOCK_M blocks.
    if CAUSAL or HAS_KPM:
        for start_n in range(0, SEQ_K, BLOCK_N):
            _dkdv_block(start_n, K, V, DK, DV, q_base, do_base, acc_base, LSE, DELTA, KPM, b,
                        h, pid_bh, offs_d, d_ok, skb, skh, sks, skd, svb, svh, svs,
                        svd, sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd, sqs, sqd, sdos,
                        sdod, smb, smn, sm_scale, SEQ_Q, SEQ_K, BLOCK_M, BLOCK_N, BLOCK_D, True,
                        CAUSAL, HAS_KPM, True)
    else:
        whole = (SEQ_K // BLOCK_N) * BLOCK_N
        for start_n in range(0, whole, BLOCK_N):
            _dkdv_block(start_n, K, V, DK, DV, q_base, do_base, acc_base, LSE, DELTA, KPM, b,
                        h, pid_bh, offs_d, d_ok, skb, skh, sks, skd, svb, svh, svs,
                        svd, sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd, sqs, sqd, sdos,
                        sdod, smb, smn, sm_scale, SEQ_Q, SEQ_K, BLOCK_M, BLOCK_N, BLOCK_D, False,
                        CAUSAL, HAS_KPM, True)
        for start_n in range(whole, SEQ_K, TAIL_N):
            _dkdv_block(start_n, K, V, DK, DV, q_base, do_base, acc_base, LSE, DELTA, KPM, b,
                        h, pid_bh, offs_d, d_ok, skb, skh, sks, skd, svb, svh, svs,
                        svd, sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd, sqs, sqd, sdos,
                        sdod, smb, smn, sm_scale, SEQ_Q, SEQ_K, BLOCK_M, TAIL_N, BLOCK_D, True,
                        CAUSAL, HAS_KPM, True, 1)
    for start_m in range(0, SEQ_Q, BLOCK_M):
        rows = start_m + offs_m  # (BM,)
        row_ok = rows < SEQ_Q
        dq = tl.load(acc_base + rows[:, None] * BLOCK_D + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)  # (BM, BD) fp32
        tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqs + offs_d[None, :] * sdqd,
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _resident_block(dq, q, do, lse2, delta, start_n, K, V, DK, DV, KPM, b, h, rows, offs_d,
                    d_ok, skb, skh, sks, skd, svb, svh, svs, svd, sdkb, sdkh, sdks, sdkd,
                    sdvb, sdvh, sdvs, sdvd, smb, smn, sm_scale, SEQ_Q, SEQ_K,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_KPM: tl.constexpr, DV_T: tl.constexpr, DK_T: tl.constexpr):
    """Key block [start_n, start_n + BN) against every query row at once: its dK and dV are
    complete after this one step and stored; dS K is added to the dQ (BM, BD) it returns.

    Without MASKED (whole key blocks of unpadded, non-causal calls) nothing is masked: rows
    past Sq load q = dO = 0 and delta = 0, so they add nothing to dK, dV, and are not stored.
    With DV_T (DK_T) dV (dK) is computed transposed, dOᵀ P (Qᵀ dS): (BD, BN) with the head
    dim as the matmul's M, which Hopper's wgmma takes (M >= 64); P dO with BN = 16-32 keys as
    M runs on the older mma.sync. Each product is stored as soon as it is made, which keeps
    fewer values live (that alone took ViT-B/16's 256 x 32 tile from 255 to 196 registers,
    ptxas for sm_90).
    """
    cols = start_n + tl.arange(0, BLOCK_N)  # (BN,)
    kv_mask = d_ok[None, :]  # (1, BD): a whole block's keys all exist
    if MASKED:
        kv_mask = kv_mask & (cols < SEQ_K)[:, None]  # (BN, BD)
    k = tl.load(K + b * skb + h * skh + cols[:, None] * sks + offs_d[None, :] * skd,
                mask=kv_mask, other=0.0)  # (BN, BD)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svs + offs_d[None, :] * svd,
                mask=kv_mask, other=0.0)  # (BN, BD)
    s = tl.dot(q, tl.trans(k)) * (sm_scale * LOG2E) - lse2[:, None]  # (BM, BN) log2 domain
    if MASKED:
        keep = _keep_mask(rows, cols, b, KPM, smb, smn, SEQ_Q, SEQ_K, CAUSAL, HAS_KPM)
        s = tl.where(keep, s, float("-inf"))
    p = tl.exp2(s)  # (BM, BN)
    dv_ptrs = DV + b * sdvb + h * sdvh + cols[:, None] * sdvs + offs_d[None, :] * sdvd
    if DV_T:
        dvt = tl.dot(tl.trans(do), p.to(do.dtype))  # (BD, BN)
        tl.store(tl.trans(dv_ptrs), dvt.to(DV.dtype.element_ty), mask=tl.trans(kv_mask))
    else:
        dv = tl.dot(tl.trans(p.to(do.dtype)), do)  # (BN, BD)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)
    dp = tl.dot(do, tl.trans(v))  # (BM, BN)
    ds = (p * (dp - delta[:, None])).to(q.dtype)  # (BM, BN)
    dk_ptrs = DK + b * sdkb + h * sdkh + cols[:, None] * sdks + offs_d[None, :] * sdkd
    if DK_T:
        dkt = tl.dot(tl.trans(q), ds)  # (BD, BN)
        tl.store(tl.trans(dk_ptrs), (dkt * sm_scale).to(DK.dtype.element_ty),
                 mask=tl.trans(kv_mask))
    else:
        dk = tl.dot(tl.trans(ds), q)  # (BN, BD)
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    return tl.dot(ds, k, dq)  # (BM, BD) fp32


@triton.jit
def _attn_bwd_resident(
    Q, K, V, O, DO, DQ, DK, DV, LSE, KPM,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sob, soh, sos, sod,
    sdob, sdoh, sdos, sdod,
    sdqb, sdqh, sdqs, sdqd,
    sdkb, sdkh, sdks, sdkd,
    sdvb, sdvh, sdvs, sdvd,
    smb, smn,
    sm_scale, H, SEQ_Q, SEQ_K, ROW0, CHUNK0, s_chunk,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    TAIL_N: tl.constexpr, DV_T: tl.constexpr, DK_T: tl.constexpr,
):
    """dQ, dK, dV of one (batch, head) whose query rows fit one block (BLOCK_M >= Sq), or,
    chunked, dQ of one chunk of BLOCK_M query rows and that chunk's share of dK, dV.
    Grid: (B * H, chunks of this launch); the chunks start at row ROW0 and are numbered from
    CHUNK0. The fused backward's plan for short queries (ViT-B/16's 197 in 256 rows, text's
    77 in 128); the chunked plan for longer ones.

    Q, dO and the log-sum-exp are loaded once and stay; delta = rowsum(dO * O) is computed
    here (no preprocess launch); dQ stays in fp32 registers over all key blocks, so there is
    no dQ buffer in memory to read and write back per block pair; and each key block's dK, dV
    (over these rows) are complete after one step (5 matmuls over BM x BN scores) and stored
    at once: into DK, DV, or, chunked, into fp32 partial buffers at DK + chunk * s_chunk,
    which `_attn_bwd_sum_chunks` adds up. Key blocks as in the forward: unmasked whole blocks
    and one TAIL_N block for the ragged keys of unpadded, non-causal calls; every block masked
    otherwise.
    """
    pid_bh = tl.program_id(0)
    chunk = CHUNK0 + tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets of large tensors pass 2**31
    h = pid_bh % H
    rows = ROW0 + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    DK = DK + chunk.to(tl.int64) * s_chunk  # this chunk's partial dK, dV (s_chunk 0: final)
    DV = DV + chunk.to(tl.int64) * s_chunk
    offs_d = tl.arange(0, BLOCK_D)  # (BD,)
    d_ok = offs_d < HEAD_D
    row_ok = rows < SEQ_Q
    q_mask = row_ok[:, None] & d_ok[None, :]  # (BM, BD)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :] * sqd,
                mask=q_mask, other=0.0)  # (BM, BD)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdos + offs_d[None, :] * sdod,
                 mask=q_mask, other=0.0)  # (BM, BD)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :] * sod,
                mask=q_mask, other=0.0)  # (BM, BD)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BM,)
    lse2 = tl.load(LSE + pid_bh * SEQ_Q + rows, mask=row_ok, other=0.0) * LOG2E  # (BM,)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL or HAS_KPM:
        for start_n in tl.range(0, SEQ_K, BLOCK_N):
            dq = _resident_block(dq, q, do, lse2, delta, start_n, K, V, DK, DV, KPM, b, h,
                                 rows, offs_d, d_ok, skb, skh, sks, skd, svb, svh, svs, svd,
                                 sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd, smb, smn,
                                 sm_scale, SEQ_Q, SEQ_K, BLOCK_N, True, CAUSAL, HAS_KPM,
                                 DV_T, DK_T)
    else:
        whole = (SEQ_K // BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, whole, BLOCK_N):
            dq = _resident_block(dq, q, do, lse2, delta, start_n, K, V, DK, DV, KPM, b, h,
                                 rows, offs_d, d_ok, skb, skh, sks, skd, svb, svh, svs, svd,
                                 sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd, smb, smn,
                                 sm_scale, SEQ_Q, SEQ_K, BLOCK_N, False, CAUSAL, HAS_KPM,
                                 DV_T, DK_T)
        for start_n in tl.range(whole, SEQ_K, TAIL_N, num_stages=1):
            dq = _resident_block(dq, q, do, lse2, delta, start_n, K, V, DK, DV, KPM, b, h,
                                 rows, offs_d, d_ok, skb, skh, sks, skd, svb, svh, svs, svd,
                                 sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd, smb, smn,
                                 sm_scale, SEQ_Q, SEQ_K, TAIL_N, True, CAUSAL, HAS_KPM,
                                 DV_T, DK_T)
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqs + offs_d[None, :] * sdqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _attn_bwd_sum_chunks(
    DKP, DVP, DK, DV,
    sdkb, sdkh, sdks, sdkd,
    sdvb, sdvh, sdvs, sdvd,
    s_chunk, CHUNKS, H, SEQ_K,
    HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV = the sums of the chunked resident kernel's fp32 partials (CHUNKS, B, H, Sk,
    BLOCK_D), in a fixed order (bitwise repeatable). Grid: (cdiv(Sk, BLOCK_N), B * H)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_d = tl.arange(0, BLOCK_D)  # (BD,)
    part = pid_bh.to(tl.int64) * SEQ_K * BLOCK_D + cols[:, None] * BLOCK_D + offs_d[None, :]
    in_seq = cols[:, None] < SEQ_K
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for c in range(CHUNKS):
        dk += tl.load(DKP + c * s_chunk + part, mask=in_seq, other=0.0)  # (BN, BD)
        dv += tl.load(DVP + c * s_chunk + part, mask=in_seq, other=0.0)
    mask = in_seq & (offs_d < HEAD_D)[None, :]  # (BN, BD)
    tl.store(DK + b * sdkb + h * sdkh + cols[:, None] * sdks + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + b * sdvb + h * sdvh + cols[:, None] * sdvs + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=mask)
