"""Triton masked attention backward (restore-Q) over kept tokens (the contract of the
Design page, ``docs/design.rst``).

Inputs are the dense causal forward (``q, k, v, out, lse``) and the output gradient of the kept
query rows only. Kept rows are read through ``index``, and the output gradient of filtered queries
is never touched. The steps:

1. ``delta_i = rowsum(dO_i * O_i)`` for kept rows and, with :data:`COMPACT_Q` (default), a
   compact copy of the kept queries and of their lse, so the dK/dV pass reads them row by row
   instead of through the index. Under the default ``"separate"`` strategy the dQ pass (3)
   computes them on its way and runs first; the ``"atomic"`` strategy runs
   ``_attn_bwd_preprocess`` first instead, which also zeroes the fp32 dQ accumulator, and runs its
   dQ pass last.
2. ``_attn_bwd_dkdv``: one program per (sequence, KV head, share of the group's query heads,
   block of kept keys); it loops over its query heads and the kept queries of the sequence from
   the key block on (kept queries at positions >= the keys'), accumulating dK, dV in fp32.
   Filtered keys never enter. With ``ATOMIC_DQ`` it also adds ``dS @ K`` of these kept keys into
   the fp32 dQ accumulator (one bulk TMA reduction per tile where the GPU has them, see
   :data:`TMA_DQ_FAILED`; element atomics elsewhere). When the heads are split over several programs
   (:func:`dkdv_split_for`), each writes fp32 partial sums and ``_attn_bwd_dkdv_reduce`` adds
   them in a fixed order.
3. ``_attn_bwd_dq``: one program per (sequence, query head, block of kept queries). Strategy
   ``"separate"`` loops over every key at positions ``0..max query position`` of the block;
   strategy ``"atomic"`` loops over the *filtered* keys only (kept keys already came in through
   the atomics) and finishes the accumulator. Either way dQ sums over all causally visible keys.

With a sliding window or document starts (``HAS_LO``), each kept row carries its first visible
key position; since these lower bounds never decrease along a sequence, the dK/dV pass stops at
the first query block that sees none of its keys and the dQ pass starts at the first key block
its queries see (the ``"atomic"`` strategy's filtered-key loop does not skip: it masks). Only
blocks that straddle a bound are masked.

Causality is by original positions. Among kept rows of one sequence (sorted), "query position >=
key position" is the same as "query row >= key row", so the dK/dV pass masks in row space and
needs no search. All arithmetic accumulates in fp32; probabilities and dS enter the matrix
products in the input dtype, as in FlashAttention. Under ``TRITON_INTERPRET=1`` loaded tiles are
cast to fp32 (the interpreter's bf16/fp16 arithmetic is not trustworthy) and one small fixed block
configuration runs; on the GPU the block shapes of bf16/fp16 launches are tuned per shape class
(:mod:`collider_kernels.tuning`), and fp32 runs one fixed configuration.

``"separate"`` is the default: on an H200 (B=8, T=2048) the fp32 reductions into dQ made the dK/dV
pass about twice as slow as the extra dQ products they save, with element atomics and with one bulk
TMA reduction per tile alike (benchmarks/results/attention_dq_strategies_h200.md).
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from collider_kernels import tuning
from collider_kernels._checks import check_into
from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.reference import key_lower_bound
from collider_kernels.triton import settings
from collider_kernels.triton.launch import Launcher
from collider_kernels.tuning import INTERPRET, register_candidates

# How dQ gets the kept keys' terms: "separate" (dQ pass over all visible keys) or "atomic"
# (the dK/dV pass adds them atomically; the dQ pass visits filtered keys only).
DQ_STRATEGY = os.environ.get("COLLIDER_ATTN_DQ_STRATEGY", "separate")
_STRATEGIES = ("separate", "atomic")

# Compact copies of the kept queries (and their lse) made by the preprocess launch, so the dK/dV
# pass reads query rows contiguously instead of through the index (on an H200 this cut the dK/dV
# pass by 20-35%: benchmarks/results/attention_h200.md).
COMPACT_Q = os.environ.get("COLLIDER_ATTN_COMPACT_Q", "1") == "1"
# The "atomic" strategy adds each dQ tile of the dK/dV pass with one bulk (TMA) reduction where the
# GPU has them (compute capability 9+, head dim a power of two >= 16), element atomics elsewhere. Set to
# why the bulk reduction was given up when it failed to compile (the element atomics then run).
TMA_DQ_FAILED: str | None = None

# dkdv_split_for splits a group's head loop while the longest dK/dV program is more than this many
# times the mean work per program slot.
DKDV_IMBALANCE = 1.3

# Block shapes under the interpreter (and when autotuning is off on the GPU).
INTERPRET_BLOCKS = {"dkdv": (32, 16), "dq": (16, 16)}  # (BLOCK_N, BLOCK_M), (BLOCK_M, BLOCK_N)
_FIXED_GPU_BLOCKS = {"dkdv": (128, 32, 4, 3), "dq": (128, 32, 4, 3)}  # + (num_warps, num_stages)
# fp32 inputs (tests, debugging) run one small fixed configuration on the GPU: no tuning.
_FP32_GPU_BLOCKS = {"dkdv": (64, 32, 4, 2), "dq": (64, 32, 4, 2)}


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _stash_row_stats(DELTA, QC, LSEC, h, rows, mrow, m2, d, o, do, q, lse2, n, NUM_HEADS,
                     HEAD_DIM: tl.constexpr, COMPACT_Q: tl.constexpr):
    # Kept rows `rows` (BM,) of head h: delta = rowsum(o * do) in fp32 into DELTA (Hq, n); with
    # COMPACT_Q also q into QC (n, Hq, HEAD_DIM) and lse2 (lse·log2(e)) into LSEC (Hq, n), the
    # copies the dK/dV pass reads row by row. Returns delta (BM,).
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + h.to(tl.int64) * n + rows, delta, mask=mrow)
    if COMPACT_Q:
        tl.store(QC + rows[:, None] * (NUM_HEADS * HEAD_DIM) + h * HEAD_DIM + d[None, :], q, mask=m2)
        tl.store(LSEC + h.to(tl.int64) * n + rows, lse2, mask=mrow)
    return delta


@Launcher
@triton.jit(do_not_specialize=["n", "T", "NUM_HEADS", "stride_lb", "stride_lh"])
def _attn_bwd_preprocess(
    O, DO, DELTA, DQ_ACC, INDEX, Q, LSE, QC, LSEC,
    n, T, NUM_HEADS,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_don, stride_doh, stride_dod,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_lb, stride_lh, stride_lt,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, COMPACT_Q: tl.constexpr,
):
    # grid (cdiv(n, BLOCK_M), Hq); DELTA (Hq, n) fp32; DQ_ACC (n, Hq, HEAD_DIM) fp32, zeroed;
    # with COMPACT_Q: QC (n, Hq, HEAD_DIM) the kept queries, LSEC (Hq, n) fp32 their lse·log2(e)
    h = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mrow = rows < n
    d = tl.arange(0, BLOCK_D)
    m2 = mrow[:, None] & (d < HEAD_DIM)[None, :]
    tok = tl.load(INDEX + rows, mask=mrow, other=0).to(tl.int64)
    b = tok // T
    t = tok - b * T
    o = tl.load(O + b[:, None] * stride_ob + t[:, None] * stride_ot + h * stride_oh
                + d[None, :] * stride_od, mask=m2, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_don + h * stride_doh + d[None, :] * stride_dod,
                 mask=m2, other=0.0)
    q = tl.load(Q + b[:, None] * stride_qb + t[:, None] * stride_qt + h * stride_qh
                + d[None, :] * stride_qd, mask=m2, other=0.0)  # stored only with COMPACT_Q
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + t * stride_lt, mask=mrow, other=0.0)
    _stash_row_stats(DELTA, QC, LSEC, h, rows, mrow, m2, d, o, do, q, lse * 1.4426950408889634, n, NUM_HEADS,
                     HEAD_DIM, COMPACT_Q)
    tl.store(DQ_ACC + rows[:, None] * (NUM_HEADS * HEAD_DIM) + h * HEAD_DIM + d[None, :],
             tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=m2)


@triton.jit
def _dkdv_step(
    dk, dv, k, v,
    q_base, do_base, lse_base, delta_base, dq_base, dq_desc, dq_col, INDEX, LO,
    tok0, start_m, e, rk, kpos, d, md, qk_scale, lse_in, delta_in,
    stride_qt, stride_qd, stride_don, stride_dod, stride_lt, stride_dqn,
    BLOCK_M: tl.constexpr, MASK: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA_DQ: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, COMPACT_Q: tl.constexpr, HAS_LO: tl.constexpr,
):
    # One block of BLOCK_M kept queries (rows start_m..) against the program's BLOCK_N kept keys.
    # With COMPACT_Q, lse_in/delta_in hold this block's lse and delta, and the step returns the
    # next block's, loaded before this block's products: the compiler pipelines only the tile loads
    # that feed the products, so loading these vectors for use in the same step would stall it.
    rq = start_m + tl.arange(0, BLOCK_M)  # (BM,) kept rows
    mq = rq < e
    rq64 = rq.to(tl.int64)
    mqd = mq[:, None] & md[None, :]
    # Rows past the sequence get lse = +inf, so their probabilities are exactly 0.
    if COMPACT_Q:  # q_base/lse_base point at the compact copies (kept rows, lse·log2(e))
        rn64 = rq64 + BLOCK_M
        lse_next = tl.load(lse_base + rn64, mask=rn64 < e, other=float("inf"))
        delta_next = tl.load(delta_base + rn64, mask=rn64 < e, other=0.0)
        q = tl.load(q_base + rq64[:, None] * stride_qt + d[None, :] * stride_qd, mask=mqd, other=0.0)
        lse = lse_in
    else:
        qpos = tl.load(INDEX + rq64, mask=mq, other=0).to(tl.int64) - tok0  # (BM,) positions
        q = tl.load(q_base + qpos[:, None] * stride_qt + d[None, :] * stride_qd, mask=mqd, other=0.0)
        lse = tl.load(lse_base + qpos * stride_lt, mask=mq, other=float("inf")) * 1.4426950408889634
    do = tl.load(do_base + rq64[:, None] * stride_don + d[None, :] * stride_dod, mask=mqd, other=0.0)
    if COMPACT_Q:
        delta = delta_in
    else:
        delta = tl.load(delta_base + rq64, mask=mq, other=0.0)
        lse_next = lse
        delta_next = delta
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    qkT = tl.dot(k, tl.trans(q), input_precision=PREC)  # (BN, BM)
    pT = tl.exp2(qkT * qk_scale - lse[None, :])
    if MASK:
        visible = rq[None, :] >= rk[:, None]  # causal, in row space
        if HAS_LO:  # keys before each query's window/document start
            qlo = tl.load(LO + rq64, mask=mq, other=0)  # (BM,) first visible key position
            visible = visible & (kpos[:, None] >= qlo[None, :])
        pT = tl.where(visible, pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)  # (BN, BM)
    dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
    dk += tl.dot(dsT, q, input_precision=PREC)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(dsT), k, input_precision=PREC)  # (BM, BD), unscaled
        if TMA_DQ:  # one bulk reduction of the tile; rows past the sequence add exact zeros
            dq_desc.atomic_add([start_m, dq_col], dq)
        else:
            tl.atomic_add(dq_base + rq64[:, None] * stride_dqn + d[None, :], dq, mask=mqd, sem="relaxed")
    return dk, dv, lse_next, delta_next


@Launcher
@triton.jit(do_not_specialize=["n", "T", "GROUP", "NUM_KV_HEADS", "stride_lb", "stride_lh"])
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, INDEX, OFFSETS, QC, LSEC, DK_PART, DV_PART, LO, KEND, DQ_DESC,
    qk_scale, scale, n, T, GROUP, NUM_KV_HEADS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_don, stride_doh, stride_dod,
    stride_lb, stride_lh, stride_lt,
    stride_dkn, stride_dkh, stride_dvn, stride_dvh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA_DQ: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, COMPACT_Q: tl.constexpr, SPLIT: tl.constexpr,
    HAS_LO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # grid (B * Hkv * SPLIT, cdiv(T, BLOCK_N)): the key-block axis is the slow one, so the programs
    # with the most work (first key blocks) start first. BLOCK_N % BLOCK_M == 0. With SPLIT > 1
    # the query heads of a group are dealt over SPLIT programs, each writing scaled fp32 partial
    # sums to DK_PART/DV_PART (SPLIT, n, Hkv, HEAD_DIM), which _attn_bwd_dkdv_reduce adds up.
    # HAS_LO (window / document starts): LO (n,) is each kept row's first visible key position,
    # KEND (n,) for each kept key row the end of the kept query rows that see it.
    pid_bh = tl.program_id(0) // SPLIT
    split = tl.program_id(0) % SPLIT
    b = pid_bh // NUM_KV_HEADS
    hkv = pid_bh % NUM_KV_HEADS
    s = tl.load(OFFSETS + b).to(tl.int32)
    e = tl.load(OFFSETS + b + 1).to(tl.int32)
    start_n = s + tl.program_id(1) * BLOCK_N
    if start_n < e:
        b64 = b.to(tl.int64)
        tok0 = b64 * T
        rk = start_n + tl.arange(0, BLOCK_N)  # (BN,) kept rows
        mk = rk < e
        rk64 = rk.to(tl.int64)
        kpos = tl.load(INDEX + rk64, mask=mk, other=0).to(tl.int64) - tok0
        d = tl.arange(0, BLOCK_D)
        md = d < HEAD_DIM
        mkd = mk[:, None] & md[None, :]
        k = tl.load(K + b64 * stride_kb + hkv * stride_kh + kpos[:, None] * stride_kt
                    + d[None, :] * stride_kd, mask=mkd, other=0.0)
        v = tl.load(V + b64 * stride_vb + hkv * stride_vh + kpos[:, None] * stride_vt
                    + d[None, :] * stride_vd, mask=mkd, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        end_diag = tl.minimum(start_n + BLOCK_N, e)
        m_full = e  # query rows [end_diag, m_full) see every key of the block
        m_end = e  # ... and rows [m_full, m_end) some of them; later rows none
        if HAS_LO:  # lower bounds never decrease along the rows: whole query blocks drop out
            kend_first = tl.load(KEND + start_n)
            m_full = end_diag + (tl.maximum(kend_first - end_diag, 0) // BLOCK_M) * BLOCK_M
            m_end = tl.maximum(tl.load(KEND + end_diag - 1), m_full)
        heads = GROUP // SPLIT
        stride_dqn = GROUP * NUM_KV_HEADS * HEAD_DIM
        for g in range(split * heads, split * heads + heads):
            h = hkv * GROUP + g
            if COMPACT_Q:
                q_base = QC + h * HEAD_DIM
                q_stride_t = stride_dqn
                q_stride_d = 1
                lse_base = LSEC + h.to(tl.int64) * n
            else:
                q_base = Q + b64 * stride_qb + h * stride_qh
                q_stride_t = stride_qt
                q_stride_d = stride_qd
                lse_base = LSE + b64 * stride_lb + h * stride_lh
            do_base = DO + h * stride_doh
            delta_base = DELTA + h.to(tl.int64) * n
            dq_base = DQ_ACC + h * HEAD_DIM
            # COMPACT_Q: the first block's lse and delta (each step then loads the next block's).
            r0 = (start_n + tl.arange(0, BLOCK_M)).to(tl.int64)
            lse_c = tl.zeros([BLOCK_M], tl.float32)
            delta_c = tl.zeros([BLOCK_M], tl.float32)
            if COMPACT_Q:
                lse_c = tl.load(lse_base + r0, mask=r0 < e, other=float("inf"))
                delta_c = tl.load(delta_base + r0, mask=r0 < e, other=0.0)
            # Queries in the key block's own rows: causal mask (row order = position order).
            for start_m in range(start_n, end_diag, BLOCK_M):
                dk, dv, lse_c, delta_c = _dkdv_step(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, DQ_DESC, h * HEAD_DIM, INDEX, LO,
                    tok0, start_m, e, rk, kpos, d, md, qk_scale, lse_c, delta_c,
                    q_stride_t, q_stride_d, stride_don, stride_dod, stride_lt, stride_dqn,
                    BLOCK_M, True, ATOMIC_DQ, TMA_DQ, UPCAST, PREC, COMPACT_Q, HAS_LO)
            # Later kept queries see every key of the block (up to m_full).
            for start_m in range(end_diag, m_full, BLOCK_M):
                dk, dv, lse_c, delta_c = _dkdv_step(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, DQ_DESC, h * HEAD_DIM, INDEX, LO,
                    tok0, start_m, e, rk, kpos, d, md, qk_scale, lse_c, delta_c,
                    q_stride_t, q_stride_d, stride_don, stride_dod, stride_lt, stride_dqn,
                    BLOCK_M, False, ATOMIC_DQ, TMA_DQ, UPCAST, PREC, COMPACT_Q, HAS_LO)
            if HAS_LO:  # queries whose window/document starts inside the key block
                for start_m in range(m_full, m_end, BLOCK_M):
                    dk, dv, lse_c, delta_c = _dkdv_step(
                        dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, DQ_DESC, h * HEAD_DIM, INDEX, LO,
                        tok0, start_m, e, rk, kpos, d, md, qk_scale, lse_c, delta_c,
                        q_stride_t, q_stride_d, stride_don, stride_dod, stride_lt, stride_dqn,
                        BLOCK_M, True, ATOMIC_DQ, TMA_DQ, UPCAST, PREC, COMPACT_Q, HAS_LO)
        dk = dk * scale
        if SPLIT == 1:
            tl.store(DK + rk64[:, None] * stride_dkn + hkv * stride_dkh + d[None, :],
                     dk.to(DK.dtype.element_ty), mask=mkd)
            tl.store(DV + rk64[:, None] * stride_dvn + hkv * stride_dvh + d[None, :],
                     dv.to(DV.dtype.element_ty), mask=mkd)
        else:
            part = (split.to(tl.int64) * n + rk64[:, None]) * (NUM_KV_HEADS * HEAD_DIM) \
                + hkv * HEAD_DIM + d[None, :]
            tl.store(DK_PART + part, dk, mask=mkd)
            tl.store(DV_PART + part, dv, mask=mkd)


@Launcher
@triton.jit(do_not_specialize=["rows", "NUM_KV_HEADS"])
def _attn_bwd_dkdv_reduce(
    DK_PART, DV_PART, DK, DV, rows, NUM_KV_HEADS,
    stride_dkn, stride_dkh, stride_dvn, stride_dvh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # grid (cdiv(n * Hkv, BLOCK_R),): dK/dV = sum of the SPLIT partials, in a fixed order.
    i = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (BR,) (row, head)
    d = tl.arange(0, BLOCK_D)
    m = (i < rows)[:, None] & (d < HEAD_DIM)[None, :]
    src = i[:, None] * HEAD_DIM + d[None, :]
    dk = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    part_stride = rows.to(tl.int64) * HEAD_DIM
    for sp in range(SPLIT):
        dk += tl.load(DK_PART + sp * part_stride + src, mask=m, other=0.0)
        dv += tl.load(DV_PART + sp * part_stride + src, mask=m, other=0.0)
    r = i // NUM_KV_HEADS
    h = i % NUM_KV_HEADS
    tl.store(DK + r[:, None] * stride_dkn + h[:, None] * stride_dkh + d[None, :], dk.to(DK.dtype.element_ty), mask=m)
    tl.store(DV + r[:, None] * stride_dvn + h[:, None] * stride_dvh + d[None, :], dv.to(DV.dtype.element_ty), mask=m)


@triton.jit
def _dq_step(
    dq, q, do, lse, delta, qpos, qlo,
    k_base, v_base, kpos, mk, d, md, qk_scale,
    stride_kt, stride_kd, stride_vt, stride_vd,
    MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, HAS_LO: tl.constexpr,
):
    # One block of BLOCK_N keys at positions kpos against the program's kept queries.
    mkd = mk[:, None] & md[None, :]
    k = tl.load(k_base + kpos[:, None] * stride_kt + d[None, :] * stride_kd, mask=mkd, other=0.0)
    v = tl.load(v_base + kpos[:, None] * stride_vt + d[None, :] * stride_vd, mask=mkd, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BM, BN)
    p = tl.exp2(qk * qk_scale - lse[:, None])
    if MASK:
        visible = (kpos[None, :] <= qpos[:, None]) & mk[None, :]
        if HAS_LO:
            visible = visible & (kpos[None, :] >= qlo[:, None])
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # (BM, BN)
    ds = (p * (dp - delta[:, None])).to(k.dtype)
    dq += tl.dot(ds, k, input_precision=PREC)
    return dq


@Launcher
@triton.jit(do_not_specialize=["n", "T", "GROUP", "NUM_HEADS", "stride_lb", "stride_lh"])
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, DQ_ACC, INDEX, OFFSETS, FPOS, LO, O, QC, LSEC,
    qk_scale, scale, n, T, GROUP, NUM_HEADS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_don, stride_doh, stride_dod,
    stride_lb, stride_lh, stride_lt,
    stride_dqn, stride_dqh,
    stride_ob, stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FILTERED_KEYS: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, HAS_LO: tl.constexpr, PREPROCESS: tl.constexpr,
    COMPACT_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid (B * Hq, cdiv(T, BLOCK_M)); query blocks run last-first (the later, the more keys).
    # HAS_LO: LO (n,) is each kept row's first visible key position (window / document start).
    # PREPROCESS (the dK/dV pass runs after this one): the program computes its rows' delta from O
    # (B, T, Hq, D) and dO and writes it to DELTA (Hq, n), as _attn_bwd_preprocess does, and with
    # COMPACT_Q also the compact copies QC (n, Hq, D) and LSEC (Hq, n) the dK/dV pass reads.
    pid_bh = tl.program_id(0)
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    hkv = h // GROUP
    s = tl.load(OFFSETS + b).to(tl.int32)
    e = tl.load(OFFSETS + b + 1).to(tl.int32)
    start_m = s + (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    if start_m < e:
        b64 = b.to(tl.int64)
        tok0 = b64 * T
        rq = start_m + tl.arange(0, BLOCK_M)
        mq = rq < e
        rq64 = rq.to(tl.int64)
        qpos = tl.load(INDEX + rq64, mask=mq, other=0).to(tl.int64) - tok0  # (BM,)
        r_last = tl.minimum(start_m + BLOCK_M, e) - 1
        qpos_min = (tl.load(INDEX + start_m) - tok0).to(tl.int32)
        qpos_max = (tl.load(INDEX + r_last) - tok0).to(tl.int32)
        if HAS_LO:
            qlo = tl.load(LO + rq64, mask=mq, other=0)  # (BM,)
        else:
            qlo = qpos  # unused
        d = tl.arange(0, BLOCK_D)
        md = d < HEAD_DIM
        mqd = mq[:, None] & md[None, :]
        q = tl.load(Q + b64 * stride_qb + h * stride_qh + qpos[:, None] * stride_qt
                    + d[None, :] * stride_qd, mask=mqd, other=0.0)
        do = tl.load(DO + rq64[:, None] * stride_don + h * stride_doh + d[None, :] * stride_dod,
                     mask=mqd, other=0.0)
        lse = tl.load(LSE + b64 * stride_lb + h * stride_lh + qpos * stride_lt, mask=mq,
                      other=float("inf")) * 1.4426950408889634
        if PREPROCESS:
            o = tl.load(O + b64 * stride_ob + h * stride_oh + qpos[:, None] * stride_ot
                        + d[None, :] * stride_od, mask=mqd, other=0.0)
            delta = _stash_row_stats(DELTA, QC, LSEC, h, rq64, mq, mqd, d, o, do, q, lse, n, NUM_HEADS,
                                     HEAD_DIM, COMPACT_Q)
        else:
            delta = tl.load(DELTA + h.to(tl.int64) * n + rq64, mask=mq, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        k_base = K + b64 * stride_kb + hkv * stride_kh
        v_base = V + b64 * stride_vb + hkv * stride_vh
        acc_ptrs = DQ_ACC + rq64[:, None] * (NUM_HEADS * HEAD_DIM) + h * HEAD_DIM + d[None, :]
        if FILTERED_KEYS:
            # Kept keys' terms are already in DQ_ACC; add the filtered keys (FPOS row b lists
            # the sequence's filtered positions first, increasing).
            dq = tl.load(acc_ptrs, mask=mqd, other=0.0)
            f_base = FPOS + b64 * T
            n_vis = qpos_max - (r_last - s)  # filtered keys at positions <= qpos_max
            n_full = ((qpos_min - (start_m - s)) // BLOCK_N) * BLOCK_N  # ... < qpos_min
            if HAS_LO:  # some filtered keys lie before a query's start: masked steps throughout
                n_full = n_full * 0
            for start_n in range(0, n_full, BLOCK_N):
                kr = start_n + tl.arange(0, BLOCK_N)
                kpos = tl.load(f_base + kr)
                dq = _dq_step(dq, q, do, lse, delta, qpos, qlo, k_base, v_base, kpos, kr >= 0, d, md,
                              qk_scale, stride_kt, stride_kd, stride_vt, stride_vd,
                              False, UPCAST, PREC, HAS_LO)
            for start_n in range(n_full, n_vis, BLOCK_N):
                kr = start_n + tl.arange(0, BLOCK_N)
                mk = kr < n_vis
                kpos = tl.load(f_base + kr, mask=mk, other=0)
                dq = _dq_step(dq, q, do, lse, delta, qpos, qlo, k_base, v_base, kpos, mk, d, md,
                              qk_scale, stride_kt, stride_kd, stride_vt, stride_vd,
                              True, UPCAST, PREC, HAS_LO)
        else:
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            n_full = ((qpos_min + 1) // BLOCK_N) * BLOCK_N  # keys up to here: visible causally to all
            k_full = 0  # keys from here on: past every query's window/document start
            if HAS_LO:
                # Key blocks [k_lo, k_full) hold some query's start: masked; earlier ones are skipped.
                lo_min = tl.load(LO + start_m)
                lo_max = tl.load(LO + r_last)
                k_lo = (lo_min // BLOCK_N) * BLOCK_N
                k_full = tl.minimum(tl.maximum(k_lo, tl.cdiv(lo_max, BLOCK_N) * BLOCK_N), n_full)
                for start_n in range(k_lo, k_full, BLOCK_N):
                    kpos = start_n + tl.arange(0, BLOCK_N)
                    dq = _dq_step(dq, q, do, lse, delta, qpos, qlo, k_base, v_base, kpos, kpos >= 0, d, md,
                                  qk_scale, stride_kt, stride_kd, stride_vt, stride_vd,
                                  True, UPCAST, PREC, HAS_LO)
            for start_n in range(k_full, n_full, BLOCK_N):
                kpos = start_n + tl.arange(0, BLOCK_N)
                dq = _dq_step(dq, q, do, lse, delta, qpos, qlo, k_base, v_base, kpos, kpos >= 0, d, md,
                              qk_scale, stride_kt, stride_kd, stride_vt, stride_vd,
                              False, UPCAST, PREC, HAS_LO)
            for start_n in range(n_full, qpos_max + 1, BLOCK_N):
                kpos = start_n + tl.arange(0, BLOCK_N)
                dq = _dq_step(dq, q, do, lse, delta, qpos, qlo, k_base, v_base, kpos, kpos <= qpos_max,
                              d, md, qk_scale, stride_kt, stride_kd, stride_vt, stride_vd,
                              True, UPCAST, PREC, HAS_LO)
        dq = dq * scale
        tl.store(DQ + rq64[:, None] * stride_dqn + h * stride_dqh + d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=mqd)


# ----------------------------------------------------------------------------------------------
# tuning
# ----------------------------------------------------------------------------------------------

# (BLOCK_N keys, BLOCK_M queries, num_warps, num_stages) for the dK/dV pass, per head-dim class.
# The first of each list (the one a CUDA-graph capture runs before tuning) measured fastest in a
# sweep of 15 (D=64) and 12 (D=128) configurations on an H200 (B=8, T=2048, keep 0.4/0.6/1.0) once
# each step loaded the next block's lse and delta ahead; the others were within 1-8% of the best
# on one of the three shapes or keeps (benchmarks/results/attention_h200.md).
_DKDV_CONFIGS = {
    64: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4), (128, 16, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3)],
    128: [(64, 32, 4, 3), (128, 32, 8, 3), (64, 32, 4, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 16, 4, 3)],
}
# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) for the dQ pass.
_DQ_CONFIGS = {
    64: [(128, 64, 4, 4), (128, 32, 4, 3), (128, 64, 8, 4), (128, 64, 8, 3), (64, 32, 4, 3), (128, 64, 4, 3),
         (64, 64, 4, 3)],
    128: [(64, 64, 4, 2), (128, 32, 8, 3), (128, 64, 8, 4), (64, 32, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2),
          (64, 32, 4, 3)],
}
_NAMES = {"dkdv": ("BLOCK_N", "BLOCK_M"), "dq": ("BLOCK_M", "BLOCK_N")}


def _meta(which: str, blocks: tuple) -> dict:
    """Launch keywords of a (block, block[, warps, stages]) tuple of pass ``which``."""
    meta = dict(zip(_NAMES[which], blocks[:2], strict=True))
    if len(blocks) == 4:
        meta.update(num_warps=blocks[2], num_stages=blocks[3])
    return meta


def _candidates(which: str, table: dict, head_dim: int) -> list[dict]:
    if INTERPRET:
        return [_meta(which, INTERPRET_BLOCKS[which])]
    return [_meta(which, t) for t in table[64 if max(16, settings.next_power_of_2(head_dim)) <= 64 else 128]]


@register_candidates("masked_attention_backward.dkdv")
def dkdv_candidates(head_dim: int) -> list[dict]:
    """Launch configurations (BLOCK_N, BLOCK_M, num_warps, num_stages) the dK/dV pass is tuned over
    for ``head_dim``. Cache key: ``(head_dim, group, atomic dQ, compact queries, split, masked, dtype)``."""
    return _candidates("dkdv", _DKDV_CONFIGS, head_dim)


@register_candidates("masked_attention_backward.dq")
def dq_candidates(head_dim: int) -> list[dict]:
    """Launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) the dQ pass is tuned over for
    ``head_dim``. Cache key: ``(head_dim, group, filtered keys only, masked, dtype)``."""
    return _candidates("dq", _DQ_CONFIGS, head_dim)


def _fixed_meta(which: str, fp32: bool = False) -> dict:
    """The untuned configuration: interpreter blocks, or the fixed GPU blocks (fp32: smaller)."""
    if INTERPRET:
        return _meta(which, INTERPRET_BLOCKS[which])
    return _meta(which, (_FP32_GPU_BLOCKS if fp32 else _FIXED_GPU_BLOCKS)[which])


def _pass_meta(kernel: str, which: str, key: tuple, head_dim: int, fp32: bool, run) -> dict:
    """Configuration of one pass: tuned for fp16/bf16 (``run(meta)`` launches it), else fixed."""
    if not tuning.ENABLED or fp32:
        return _fixed_meta(which, fp32)
    make = dkdv_candidates if which == "dkdv" else dq_candidates
    return tuning.configure(kernel, key, lambda: make(head_dim), run)


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


def dkdv_split_for(batch: int, kv_heads: int, group: int, kept: int, head_dim: int, sms: int) -> int:
    """How many programs share the query heads of a group in the dK/dV pass (a divisor of ``group``).

    The first key block of a sequence sees every later kept query, so with ``r`` key-block rows
    (``batch * kv_heads * kept_per_sequence / 128``) the longest program holds about
    ``2 * slots / r`` times the mean work per program slot (``slots`` = SMs, twice that for
    head dim <= 64, where two programs share an SM). Splitting the head loop by ``s`` divides the
    longest program by ``s`` at the cost of fp32 partial sums; the smallest ``s`` that brings the
    ratio to :data:`DKDV_IMBALANCE` is taken. This model matches the split that measured fastest
    for the TinyLlama and Qwen2.5 shapes at keep 1.0 and 0.6 (B=8, T=2048, H200).
    """
    slots = sms * (2 if head_dim <= 64 else 1)
    rows = batch * kv_heads * max(1.0, kept / max(batch, 1) / 128)
    for s in range(1, group + 1):
        if group % s == 0 and 2 * slots / (rows * s) <= DKDV_IMBALANCE:
            return s
    return group


def _bulk_reduce_ok(q: torch.Tensor, head_dim: int) -> bool:
    """Tiles of the dQ accumulator can be added with bulk (TMA) reductions: a CUDA GPU of compute
    capability 9+ (not the interpreter) and a power-of-two head dim of at least 16 (the tile's
    full width)."""
    if INTERPRET or not q.is_cuda or head_dim != max(16, settings.next_power_of_2(head_dim)):
        return False
    return torch.cuda.get_device_capability(q.device)[0] >= 9


def _filtered_positions(index: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(B, T) int64: row b lists sequence b's filtered positions first (increasing), then its kept."""
    kept = torch.zeros(B * T, dtype=torch.int8, device=index.device)
    kept[index] = 1
    return torch.argsort(kept.view(B, T), dim=1, stable=True)


def _mask_rows(index: torch.Tensor, B: int, T: int, window, key_start):
    """(LO, KEND) int32 (n,) of the kept rows: each row's first visible key position, and for each
    kept key row the end of the kept query rows that see it (lower bounds never decrease)."""
    lower = key_lower_bound(T, window, key_start, index.device).expand(B, T)  # (B, T)
    starts = torch.arange(B, device=index.device)[:, None] * T
    lo_flat = (lower + starts).reshape(-1).index_select(0, index)  # (n,) b*T + lower bound, sorted
    lo = (lo_flat - (index // T) * T).to(torch.int32)
    kend = torch.searchsorted(lo_flat, index, right=True).to(torch.int32)
    return lo, kend


def masked_attention_backward_triton(
    q, k, v, out, lse, grad_out, index, offsets, scale, window=None, key_start=None, *,
    dq_strategy: str | None = None, dkdv_split: int | None = None, compact_q: bool | None = None,
    dq=None, dk=None, dv=None, blocks: dict | None = None,
):
    """Launch the Triton backward; arguments as :func:`collider_kernels.masked_attention_backward`.

    ``dq_strategy`` overrides :data:`DQ_STRATEGY`; ``dkdv_split`` (a divisor of Hq/Hkv) deals the
    query heads of a group over that many dK/dV programs (default: :func:`dkdv_split_for`);
    ``compact_q`` overrides :data:`COMPACT_Q`; ``dq``/``dk``/``dv`` are optional preallocated
    outputs (n, Hq, D), (n, Hkv, D), (n, Hkv, D) (every row is overwritten); ``blocks`` maps
    ``"dkdv"``/``"dq"`` to a (block, block, num_warps, num_stages) tuple that replaces the tuned
    configuration of that pass (benchmark sweeps, tests).
    """
    strategy = DQ_STRATEGY if dq_strategy is None else dq_strategy
    if strategy not in _STRATEGIES:
        raise ValueError(f"dq_strategy must be one of {_STRATEGIES}, got {strategy!r}")
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    n = index.shape[0]
    if dkdv_split is None:
        split = dkdv_split_for(B, Hkv, group, n, D, settings.num_sms(q.device))
    else:
        split = int(dkdv_split)
    if split < 1 or group % split:
        raise ValueError(f"dkdv_split must divide Hq/Hkv = {group}, got {dkdv_split!r}")
    compact = COMPACT_Q if compact_q is None else bool(compact_q)
    if dq is None:
        dq = grad_out.new_empty((n, Hq, D))
    if dk is None:
        dk = grad_out.new_empty((n, Hkv, D))
    if dv is None:
        dv = grad_out.new_empty((n, Hkv, D))
    for name, t, h in (("dq", dq, Hq), ("dk", dk, Hkv), ("dv", dv, Hkv)):
        check_into(name, t, (n, h, D), grad_out.dtype, grad_out.device, {})
    if n == 0:
        return dq, dk, dv
    dev = q.device
    index = index.contiguous()
    offsets = offsets.to(device=dev, dtype=torch.int64).contiguous()
    if lse.dtype != torch.float32:
        lse = lse.float()
    atomic = strategy == "atomic"
    block_d = max(16, settings.next_power_of_2(D))
    upcast = INTERPRET and q.dtype != torch.float32
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    qk_scale = float(scale) * 1.4426950408889634

    delta = torch.empty((Hq, n), dtype=torch.float32, device=dev)
    dq_acc = torch.empty((n, Hq, D), dtype=torch.float32, device=dev) if atomic else delta
    fpos = _filtered_positions(index, B, T) if atomic and n < B * T else index
    q_c = torch.empty((n, Hq, D), dtype=q.dtype, device=dev) if compact else delta  # kept queries
    lse_c = torch.empty((Hq, n), dtype=torch.float32, device=dev) if compact else delta
    if split > 1:  # (split, n, Hkv, D) fp32 partial dK/dV
        dk_part = torch.empty((split, n, Hkv, D), dtype=torch.float32, device=dev)
        dv_part = torch.empty_like(dk_part)
    else:
        dk_part = dv_part = delta
    has_lo = window is not None or key_start is not None
    lo, kend = _mask_rows(index, B, T, window, key_start) if has_lo else (delta, delta)

    common = (
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(),
    )
    fp32 = q.dtype == torch.float32

    def dq_pass(meta):  # "separate": first, with the preprocess fused in; "atomic": last
        _attn_bwd_dq[(B * Hq, settings.cdiv(T, meta["BLOCK_M"]))](
            q, k, v, grad_out, lse, delta, dq, dq_acc, index, offsets, fpos, lo, out, q_c, lse_c,
            qk_scale, float(scale), n, T, group, Hq,
            *common,
            dq.stride(0), dq.stride(1), *out.stride(),
            HEAD_DIM=D, BLOCK_D=block_d, FILTERED_KEYS=atomic, UPCAST=upcast, PREC=prec, HAS_LO=has_lo,
            PREPROCESS=not atomic, COMPACT_Q=compact,
            **meta,
        )

    forced = {} if blocks is None else {which: _meta(which, tuple(b)) for which, b in blocks.items()}
    dq_key = (D, group, atomic, has_lo, q.dtype)

    def run_dq():
        dq_pass(forced.get("dq") or _pass_meta("masked_attention_backward.dq", "dq", dq_key, D, fp32, dq_pass))

    if atomic:  # delta and the compact queries first; the dK/dV pass adds into a zeroed accumulator
        pre_m = 32 if INTERPRET else 64
        _attn_bwd_preprocess[(settings.cdiv(n, pre_m), Hq)](
            out, grad_out, delta, dq_acc, index, q, lse, q_c, lse_c,
            n, T, Hq,
            *out.stride(), *grad_out.stride(), *q.stride(), *lse.stride(),
            HEAD_DIM=D, BLOCK_M=pre_m, BLOCK_D=block_d, COMPACT_Q=compact,
        )
    else:  # the dQ pass computes delta and the compact queries on its way
        run_dq()

    def dkdv_launch(meta, acc, tma):
        # tma: acc (n, Hq, D) fp32 is reduced into through a descriptor of (BLOCK_M, D) tiles
        desc = TensorDescriptor(acc, [n, Hq * D], [Hq * D, 1], [meta["BLOCK_M"], D]) if tma else delta
        _attn_bwd_dkdv[(B * Hkv * split, settings.cdiv(T, meta["BLOCK_N"]))](
            q, k, v, grad_out, lse, delta, dk, dv, acc, index, offsets, q_c, lse_c, dk_part, dv_part, lo, kend, desc,
            qk_scale, float(scale), n, T, group, Hkv,
            *common,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            HEAD_DIM=D, BLOCK_D=block_d, ATOMIC_DQ=atomic, TMA_DQ=tma, UPCAST=upcast, PREC=prec,
            COMPACT_Q=compact, SPLIT=split, HAS_LO=has_lo,
            **meta,
        )

    def dkdv(meta, acc):  # acc: the dQ accumulator the atomic strategy adds into
        global TMA_DQ_FAILED
        if not (atomic and TMA_DQ_FAILED is None and _bulk_reduce_ok(q, D)):
            return dkdv_launch(meta, acc, False)
        try:
            dkdv_launch(meta, acc, True)
        except Exception as exc:  # a compiler that cannot lower it: element atomics from then on
            TMA_DQ_FAILED = f"{type(exc).__name__}: {exc}"[:500]
            warnings.warn(f"masked attention backward: bulk dQ reduction unavailable, element atomics instead "
                          f"({TMA_DQ_FAILED})", RuntimeWarning, stacklevel=2)
            dkdv_launch(meta, acc, False)

    scratch = []

    def trial(meta):  # tuning trials of the atomic strategy add into a scratch accumulator
        if atomic and not scratch:
            scratch.append(dq_acc.clone())
        dkdv(meta, scratch[0] if atomic else dq_acc)

    key = (D, group, atomic, compact, split, has_lo, q.dtype)
    dkdv(forced.get("dkdv") or _pass_meta("masked_attention_backward.dkdv", "dkdv", key, D, fp32, trial), dq_acc)
    if split > 1:
        red_r = 16 if INTERPRET else 32
        _attn_bwd_dkdv_reduce[(settings.cdiv(n * Hkv, red_r),)](
            dk_part, dv_part, dk, dv, n * Hkv, Hkv,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            HEAD_DIM=D, BLOCK_D=block_d, SPLIT=split, BLOCK_R=red_r,
        )

    if atomic:
        run_dq()
    return dq, dk, dv


@register("masked_attention_backward", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES)
def _masked_attention_backward_triton(q, k, v, out, lse, grad_out, index, offsets, scale, window, key_start,
                                      into=None):
    dq, dk, dv = (None, None, None) if into is None else into
    return masked_attention_backward_triton(q, k, v, out, lse, grad_out, index, offsets, scale, window, key_start,
                                            dq=dq, dk=dk, dv=dv)
