"""Triton gather-GEMM, gathered weight-gradient GEMM and row scatter-add kernels.

gather-GEMM ``Y = X[index] @ Wᵀ`` and weight gradient ``dW = dYᵀ @ X[index]`` read the gathered
operand (X) through the index inside the tile loads, so no gathered copy is ever made. Two kernel
families serve them:

* descriptor kernels (fp16/bf16, 16-byte aligned rows): the operand that is not gathered (W in the
  forward, dY in the weight gradient) is read through a tensor descriptor (on Hopper the bulk
  tensor-copy engine), the gathered one through pointer loads; a persistent tile loop with grouped
  tile order. The weight gradient reduces over kept rows; small outputs split that reduction over
  programs, which either write fp32 partial tiles that the last program to finish a tile adds in a
  fixed order (deterministic) or add into an fp32 buffer atomically; a stream-K schedule shares the
  tiles of a partial last wave block-wise over all programs (partial tiles, added the same way).
* one pointer-load kernel for everything else (fp32, unaligned strides):
  ``C[m, n] (+)= sum_k A[ra(m), k] B[rb(k), n]`` with optional row indexes ``ra``/``rb``.

All arithmetic accumulates in fp32. On the GPU the tile configuration is chosen per problem shape by
timing a few candidates on first use (``COLLIDER_TRITON_AUTOTUNE=0``: a fixed heuristic instead);
under ``TRITON_INTERPRET=1`` small fixed tiles run.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from collider_kernels.backends import register
from collider_kernels.gather_matmul import _gather_matmul_torch
from collider_kernels.gathered_weight_grad import _gathered_weight_grad_torch
from collider_kernels.scatter_add_rows import _scatter_add_rows_torch, segment_plan
from collider_kernels.triton import AUTOTUNE, DEVICES, INTERPRET, KERNEL_DTYPES, num_sms
from collider_kernels.triton import alloc_output as _alloc
from collider_kernels.triton.launch import Launcher
from collider_kernels.triton.timing import graph_time_ms


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row-tiles in a row share their column tiles in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % num_pid_in_group) % group_size_m
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _store_tile(c_ptrs, acc, mask_c, ACCUMULATE: tl.constexpr, ATOMIC: tl.constexpr):
    # fp32 tile acc into C: atomically added (split reduction), added to C, or stored.
    if ATOMIC:
        tl.atomic_add(c_ptrs, acc, mask=mask_c)
    else:
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=mask_c, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(c_ptrs.dtype.element_ty), mask=mask_c)


@Launcher
@triton.jit
def _gather_mm_desc_kernel(
    x_ptr, index_ptr, w_desc, y_ptr, bias_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_ym, stride_yn,
    HAS_INDEX: tl.constexpr,  # row m of A is x row index[m] (else row m)
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # cast loaded tiles to fp32 before the dot (interpreter)
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K: no mask on the reduction
    FLATTEN: tl.constexpr,  # let the compiler pipeline across tiles of the persistent loop
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``Y (M, N) = X[index] (M, K) @ Wᵀ`` (+ bias); W (N, K) is read through ``w_desc``."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        # Rows past M read row 0 (always valid, never stored), so the A loads need no row mask.
        if HAS_INDEX:
            rows = tl.load(index_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        else:
            rows = tl.where(mask_m, offs_m, 0).to(tl.int64)
        a_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            if EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=offs_k[None, :] < K - ki * BLOCK_K, other=0.0)
            b = w_desc.load([off_n, ki * BLOCK_K])  # (BLOCK_N, BLOCK_K); zero past the edges
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b.T, acc)
            a_ptrs += BLOCK_K * stride_xk
        offs_n = off_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _index_block(index_ptr, rr, r_stop, HAS_INDEX: tl.constexpr):
    # Gathered rows for reduction rows rr (row 0 from r_stop on, where the loads are masked anyway).
    if HAS_INDEX:
        return tl.load(index_ptr + rr, mask=rr < r_stop, other=0).to(tl.int64)
    else:
        return tl.where(rr < r_stop, rr, 0).to(tl.int64)


@triton.jit
def _wgrad_tile(
    g_desc, x_ptr, index_ptr, N, r_start, r_stop, off_m, offs_n, stride_xm, stride_xn,
    HAS_INDEX: tl.constexpr, UPCAST: tl.constexpr, EVEN_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 (BLOCK_M, BLOCK_N) tile of ``Gᵀ @ X[index]`` over reduction rows [r_start, r_stop)."""
    offs_r = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    x_cols = x_ptr + offs_n[None, :] * stride_xn  # (1, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The index block of the next step is loaded one step ahead, off the B loads' critical path.
    rows_next = _index_block(index_ptr, r_start + offs_r, r_stop, HAS_INDEX)
    for r0 in range(r_start, r_stop, BLOCK_K):
        rr = r0 + offs_r
        if EVEN_R:
            mask_r = tl.full((BLOCK_K,), 1, tl.int1)
        else:
            mask_r = rr < r_stop
        rows = rows_next
        rows_next = _index_block(index_ptr, rr + BLOCK_K, r_stop, HAS_INDEX)
        # Rows past this range are zero in B, so A's rows there (another range's) add 0.
        b = tl.load(x_cols + rows[:, None] * stride_xm, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        a = g_desc.load([r0, off_m])  # (BLOCK_K, BLOCK_M); zero past the edges
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a.T, b, acc)
    return acc


@triton.jit
def _stream_k_range(program, programs, total):
    # Stream-K: reduction blocks [start, stop) of the `total` shared ones that `program` runs.
    return program * total // programs, (program + 1) * total // programs


@triton.jit
def _stream_k_owner(it, programs, total):
    # The program whose stream-K run holds reduction block `it` (the last p with start(p) <= it).
    return ((it + 1) * programs + total - 1) // total - 1


@triton.jit
def _arrive(lock_ptr, arrivals):
    # After this program stored its partial tile: true for the last of `arrivals` programs to arrive.
    # The barrier orders every thread's stores before the release; the acquire orders the last
    # arrival's reads of the other partials after it.
    tl.debug_barrier()
    return tl.atomic_add(lock_ptr, 1, sem="acq_rel", scope="gpu") == arrivals - 1


@triton.jit
def _store_split(acc, ws_ptrs, slice_size, split, lock_ptr, c_ptrs, mask_c,
                 SPLIT_K: tl.constexpr, ACCUMULATE: tl.constexpr):
    # Split `split` of a C tile: its fp32 partial goes to ws_ptrs + split·slice_size; the last split
    # to arrive at the tile's lock adds all SPLIT_K partials in split order and stores C.
    tl.store(ws_ptrs + split.to(tl.int64) * slice_size, acc, mask=mask_c)
    if _arrive(lock_ptr, SPLIT_K):
        acc = tl.zeros_like(acc)
        for _ in range(SPLIT_K):
            acc += tl.load(ws_ptrs, mask=mask_c, other=0.0, cache_modifier=".cg")
            ws_ptrs += slice_size
        _store_tile(c_ptrs, acc, mask_c, ACCUMULATE, False)


@Launcher
@triton.jit
def _wgrad_desc_kernel(
    g_desc, x_ptr, index_ptr, c_ptr, ws_ptr, lock_ptr,
    M, N, R, SK_TILES, SK_SLOTS,
    stride_xm, stride_xn, stride_cm, stride_cn,
    HAS_INDEX: tl.constexpr,  # reduction row r of X is x row index[r] (else row r)
    ACCUMULATE: tl.constexpr,  # C += ... instead of C = ...
    ATOMIC: tl.constexpr,  # splits add into fp32 C with atomics (else partial tiles in the workspace)
    SPLIT_K: tl.constexpr,  # programs sharing the reduction of one C tile
    STREAM_K: tl.constexpr,  # the last SK_TILES tiles are shared block-wise by all programs
    UPCAST: tl.constexpr,
    EVEN_R: tl.constexpr,  # every reduction block is full: no masks on the reduction
    FLATTEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``C (M, N) (+)= Gᵀ @ X[index]``: G (R, M) is read through ``g_desc``, the reduction runs over R.

    A reduction split without atomics writes split s's fp32 partial tile to ``ws[s]`` (ws: (SPLIT_K,
    M, N)); a stream-K run (``STREAM_K``: the last ``SK_TILES`` tiles cut into runs of reduction
    blocks, an equal share per program) writes its partial tile to workspace slot ``program ·
    SK_SLOTS + j`` (j-th tile the program touches). The program that arrives last at a tile's lock
    (``lock_ptr``: zeroed int32, one per tile) adds the tile's partials in a fixed order (split, or
    program) and stores C, so the result does not depend on timing."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    unit_tiles = num_pid_m * num_pid_n - SK_TILES  # tiles computed whole (or split SPLIT_K ways)
    r_per_split = tl.cdiv(tl.cdiv(R, SPLIT_K), BLOCK_K) * BLOCK_K
    for unit in tl.range(tl.program_id(0), unit_tiles * SPLIT_K, tl.num_programs(0), flatten=FLATTEN):
        tile = unit % unit_tiles
        split = unit // unit_tiles
        r_start = split * r_per_split
        r_stop = min(R, r_start + r_per_split)
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _wgrad_tile(g_desc, x_ptr, index_ptr, N, r_start, r_stop, off_m, offs_n, stride_xm, stride_xn,
                          HAS_INDEX, UPCAST, EVEN_R, BLOCK_M, BLOCK_N, BLOCK_K)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        mask_c = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        if (SPLIT_K > 1) and (not ATOMIC):
            ws_ptrs = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]  # in slice 0 of ws
            _store_split(acc, ws_ptrs, M * N, split, lock_ptr + tile, c_ptrs, mask_c, SPLIT_K, ACCUMULATE)
        else:
            _store_tile(c_ptrs, acc, mask_c, ACCUMULATE, ATOMIC)
    if STREAM_K:
        k_blocks = tl.cdiv(R, BLOCK_K)
        programs = tl.num_programs(0)
        program = tl.program_id(0)
        total = SK_TILES * k_blocks  # at least `programs`: every run is non-empty
        it, it_end = _stream_k_range(program, programs, total)
        first = it // k_blocks
        offs_ws = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        while it < it_end:
            t = it // k_blocks  # stream-K tile, 0 .. SK_TILES-1
            k0 = it - t * k_blocks
            k1 = min(k_blocks, k0 + it_end - it)
            pid_m, pid_n = _tile_coords(unit_tiles + t, num_pid_m, num_pid_n, GROUP_M)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = _wgrad_tile(g_desc, x_ptr, index_ptr, N, k0 * BLOCK_K, min(R, k1 * BLOCK_K), pid_m * BLOCK_M,
                              offs_n, stride_xm, stride_xn, HAS_INDEX, UPCAST, EVEN_R, BLOCK_M, BLOCK_N, BLOCK_K)
            slot = (program * SK_SLOTS + t - first).to(tl.int64)
            tl.store(ws_ptr + slot * (BLOCK_M * BLOCK_N) + offs_ws, acc)
            # The programs whose runs cover part of tile t: q_lo .. q_hi, each with one partial.
            q_lo = _stream_k_owner(t * k_blocks, programs, total)
            q_hi = _stream_k_owner(t * k_blocks + k_blocks - 1, programs, total)
            if _arrive(lock_ptr + t, q_hi - q_lo + 1):
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for q in range(q_lo, q_hi + 1):
                    q_start, _ = _stream_k_range(q, programs, total)
                    q_slot = (q * SK_SLOTS + t - q_start // k_blocks).to(tl.int64)
                    acc += tl.load(ws_ptr + q_slot * (BLOCK_M * BLOCK_N) + offs_ws, cache_modifier=".cg")
                mask_c = (offs_m < M)[:, None] & (offs_n < N)[None, :]
                c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
                _store_tile(c_ptrs, acc, mask_c, ACCUMULATE, False)
            it += k1 - k0


@Launcher
@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, a_index_ptr, b_index_ptr, ws_ptr, lock_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    GATHER_A_ROWS: tl.constexpr,  # A row m is a_ptr row a_index[m]
    GATHER_B_ROWS: tl.constexpr,  # B row k is b_ptr row b_index[k]
    HAS_BIAS: tl.constexpr,  # add bias[n] to every row of C
    ACCUMULATE: tl.constexpr,  # C += A @ B instead of C = A @ B
    ATOMIC: tl.constexpr,  # splits add into fp32 C with atomics (else partial tiles in ws_ptr)
    SPLIT_K: tl.constexpr,  # programs sharing the reduction of one C tile
    UPCAST: tl.constexpr,  # cast loaded tiles to fp32 before the dot
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K: no mask on the reduction
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Pointer-load GEMM for any dtype and strides: ``C (+)= A[a_index] @ B[b_index]``. Reduction
    split k (``program_id(1)``) without atomics writes its fp32 partial tile to ``ws[k]`` (ws: (SPLIT_K,
    M, N)); the last split to finish a tile (``lock_ptr``: zeroed int32 per tile) adds them in order."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Gathered rows beyond M read row 0 (always valid, never stored), so they need no mask. Other
    # edges are masked; masks keep the address arithmetic contiguous, so loads stay vectorized.
    if GATHER_A_ROWS:
        rows_a = tl.load(a_index_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        mask_a = tl.full((BLOCK_M,), 1, tl.int1)
    else:
        rows_a = offs_m.to(tl.int64)
        mask_a = mask_m
    a_rows_ptr = a_ptr + rows_a[:, None] * stride_am  # (BLOCK_M, 1)
    b_cols_ptr = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn  # (1, BLOCK_N)

    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_stop = min(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            mask_k = tl.full((BLOCK_K,), 1, tl.int1)
        else:
            mask_k = offs_k < k_stop
        if GATHER_B_ROWS:
            rows_b = tl.load(b_index_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
        else:
            rows_b = offs_k.to(tl.int64)
        a = tl.load(
            a_rows_ptr + offs_k.to(tl.int64)[None, :] * stride_ak,  # int64: n·N may pass 2^31
            mask=mask_a[:, None] & mask_k[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        b = tl.load(
            b_cols_ptr + rows_b[:, None] * stride_bk, mask=mask_k[:, None] & mask_n[None, :], other=0.0
        )  # (BLOCK_K, BLOCK_N)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    mask_c = mask_m[:, None] & mask_n[None, :]
    if (SPLIT_K > 1) and (not ATOMIC):
        ws_ptrs = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]  # in slice 0 of ws
        _store_split(acc, ws_ptrs, M * N, pid_k, lock_ptr + tl.program_id(0), c_ptrs, mask_c, SPLIT_K, ACCUMULATE)
    else:
        _store_tile(c_ptrs, acc, mask_c, ACCUMULATE, ATOMIC)


# ------------------------------------------------------------------------------------- configuration


def _cfg(bm, bn, bk, stages, warps, **extra):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
            "num_stages": stages, "num_warps": warps, **extra}


_INTERPRET_CFG = {**_cfg(32, 32, 16, 1, 4), "GROUP_M": 2, "PERSIST": True, "SPLIT_K": 1}
# Candidates per kernel family, timed on first use of a shape (the first is the untuned default).
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). 256x128 with 4 stages (192 KB of shared memory) was added
# after a profile showed cuBLAS's weight-gradient tile using 221 KB against our 3-stage 147 KB.
_FWD_TILES = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 256, 64, 4, 8), (64, 256, 64, 4, 4),
              (128, 128, 64, 4, 4), (64, 128, 64, 5, 4), (256, 128, 64, 3, 8), (256, 128, 64, 4, 8)]
_WGRAD_TILES = _FWD_TILES
_POINTER_TILES = [(128, 128, 64, 3, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4),
                  (128, 64, 64, 4, 4), (64, 64, 32, 4, 4), (32, 32, 32, 2, 4)]


def _fill(units: int, sms: int) -> float:
    """Share of ``sms`` busy over the waves that ``units`` programs take."""
    return units / (triton.cdiv(units, sms) * sms)


def _split_for(tiles: int, R: int, block_k: int, sms: int) -> int:
    """Reduction split that best fills whole waves of ``sms`` programs (1 when tiles already do)."""
    best = 1
    for s in range(2, 17):
        if R < s * 8 * block_k:  # keep at least 8 reduction blocks per program
            break
        if _fill(tiles * s, sms) > 1.15 * _fill(tiles * best, sms):  # the fp32 buffer and atomics must pay
            best = s
    return best


def _split_k(M: int, N: int, K: int, device: torch.device) -> int:
    """Reduction split of the pointer kernel's weight gradient (128x128 tiles)."""
    return _split_for(triton.cdiv(M, 128) * triton.cdiv(N, 128), K, 64, num_sms(device))


_CHOICE: dict[tuple, dict] = {}


def _tuning_bench(fn) -> float:
    return graph_time_ms(fn, calls=10, replays=3)  # device time: host cost would rank narrow shapes


def _tune(key: tuple, cands: list[dict], run) -> dict:
    """The fastest of ``cands`` (``run(cfg)`` does one call), remembered in ``_CHOICE[key]``; callers
    look the key up first, so repeated calls pay no candidate bookkeeping on the host."""
    cfg = cands[0]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return cfg  # no timing inside a caller's graph capture; tuned on a later eager call
    if AUTOTUNE and len(cands) > 1:
        best, failures = float("inf"), []
        for c in cands:
            try:
                t = _tuning_bench(lambda c=c: run(c))
            except triton.runtime.errors.OutOfResources:  # tile does not fit this dtype
                continue
            except Exception as e:  # a candidate that fails to build is skipped, and said so
                failures.append(e)
                warnings.warn(f"collider: GEMM candidate {c} failed and is skipped: {type(e).__name__}: {e}",
                              RuntimeWarning, stacklevel=2)
                continue
            if t < best:
                best, cfg = t, c
        if best == float("inf") and failures:
            raise RuntimeError(f"every GEMM candidate for {key} failed") from failures[-1]
    _CHOICE[key] = cfg
    return cfg


def _desc_ok(t: torch.Tensor) -> bool:
    """Tensor descriptors need 2-byte elements here, unit inner stride and 16-byte aligned rows."""
    return (
        t.dtype in (torch.float16, torch.bfloat16) and t.stride(1) == 1 and t.stride(0) % 8 == 0
        and t.data_ptr() % 16 == 0 and t.shape[0] > 0 and t.shape[1] > 0
    )


def _desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def _grid_size(units: int, cfg: dict, device: torch.device) -> int:
    return min(units, num_sms(device)) if cfg["PERSIST"] else units


def _bucket(n: int) -> int:
    return n.bit_length()  # configs are shared by row counts within a factor of two


# ------------------------------------------------------------------------------------- forward


def _fwd_candidates(N: int) -> list[dict]:
    if INTERPRET:
        return [_INTERPRET_CFG]
    tiles = [t for t in _FWD_TILES if t[1] <= max(128, triton.next_power_of_2(N))]
    out = [_cfg(*t, PERSIST=p) for t in tiles for p in (True, False)]
    if N <= 256:  # few column tiles: favour more row tiles
        out.sort(key=lambda c: (c["BLOCK_M"] != 64, not c["PERSIST"]))
    return out


def _launch_fwd_desc(x, index, weight, bias, y, cfg):
    n, N = y.shape
    K = x.shape[1]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    units = triton.cdiv(n, bm) * triton.cdiv(N, bn)
    _gather_mm_desc_kernel[(_grid_size(units, cfg, x.device),)](
        x, y if index is None else index, _desc(weight, [bn, bk]), y, y if bias is None else bias,
        n, N, K, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        HAS_INDEX=index is not None, HAS_BIAS=bias is not None, UPCAST=INTERPRET, EVEN_K=K % bk == 0,
        FLATTEN=cfg["PERSIST"] and not INTERPRET,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # match torch's fp32 matmul unless the user opted into TF32
    return "tf32"


def _pointer_candidates() -> list[dict]:
    if INTERPRET:
        return [_INTERPRET_CFG]
    return [_cfg(*t) for t in _POINTER_TILES]


def _launch_pointer(a, b, c, bias, a_index, b_index, M, N, K, strides, cfg, *, accumulate, atomic, split_k,
                    ws=None, locks=None):
    """Pointer kernel: C (M, N) (+)= A[a_index] (M, K) @ B[b_index] (K, N); ``strides`` in the
    kernel's order (A m, k; B k, n; C m, n); a split without atomics needs ``ws`` and ``locks``."""
    dummy = c  # stands in for absent optional pointers (never dereferenced)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split_k)
    _gemm_kernel[grid](
        a, b, c,
        dummy if bias is None else bias,
        dummy if a_index is None else a_index,
        dummy if b_index is None else b_index,
        dummy if ws is None else ws,
        dummy if locks is None else locks,
        M, N, K, *strides,
        GATHER_A_ROWS=a_index is not None, GATHER_B_ROWS=b_index is not None, HAS_BIAS=bias is not None,
        ACCUMULATE=accumulate, ATOMIC=atomic, SPLIT_K=split_k,
        UPCAST=INTERPRET or a.dtype == torch.float32, DOT_PRECISION=_dot_precision(a.dtype),
        EVEN_K=K % cfg["BLOCK_K"] == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _index(index: torch.Tensor | None) -> torch.Tensor | None:
    return None if index is None else index.contiguous()


def gather_matmul_into(x, index, weight, bias, y, *, path: str = "auto", cfg: dict | None = None):
    """Write ``x[index] @ weightᵀ (+ bias)`` into ``y`` (n, N).

    ``path``: "desc" or "pointer" forces a kernel family; "auto" times both where the descriptor
    kernel applies (the untuned default: descriptors for N > 256 and under the interpreter).
    """
    n, N = y.shape
    K = x.shape[1]
    desc_ok = path != "pointer" and (path == "desc" or (_desc_ok(weight) and x.dtype == weight.dtype))
    if cfg is None:
        key = ("fwd", path, N, K, _bucket(n), x.dtype, desc_ok, index is None, bias is None)
        cfg = _CHOICE.get(key)
        if cfg is None:
            cands = [{**c, "DESC": True} for c in _fwd_candidates(N)] if desc_ok else []
            if path != "desc":
                pointer = [{**c, "DESC": False} for c in _pointer_candidates()]
                cands = cands + pointer if N > 256 or INTERPRET else pointer + cands
            cfg = _tune(key, cands, lambda c: _fwd_run(x, index, weight, bias, y, c))
    _fwd_run(x, index, weight, bias, y, cfg)
    return y


def _fwd_run(x, index, weight, bias, y, cfg):
    if cfg["DESC"]:
        _launch_fwd_desc(x, index, weight, bias, y, cfg)
    else:
        n, N = y.shape
        # B = weightᵀ (K, N): B[k, j] = weight[j, k].
        strides = (x.stride(0), x.stride(1), weight.stride(1), weight.stride(0), y.stride(0), y.stride(1))
        _launch_pointer(x, weight, y, bias, index, None, n, N, x.shape[1], strides, cfg,
                        accumulate=False, atomic=False, split_k=1)


@register("gather_matmul", "triton", DEVICES)
def gather_matmul_triton(x, index, weight, bias):
    """``x[index] @ weightᵀ (+ bias)`` with the row gather fused into the A-tile loads."""
    if x.dtype not in KERNEL_DTYPES:
        return _gather_matmul_torch(x, index, weight, bias)
    index = _index(index)
    n = x.shape[0] if index is None else index.shape[0]
    N = weight.shape[0]
    y = _alloc((n, N), x.dtype, x.device)  # (n, N)
    if n == 0 or N == 0:
        return y
    return gather_matmul_into(x, index, weight, None if bias is None else bias.contiguous(), y)


# ------------------------------------------------------------------------------------- weight gradient


def _wgrad_candidates(N: int, K: int, n: int, sms: int, *, deterministic: bool = True) -> list[dict]:
    """Descriptor-kernel candidates: whole tiles; split reductions (partial tiles added in order, and
    fp32 atomics unless ``deterministic``); stream-K for a partial last wave (partial tiles added in
    order)."""
    if INTERPRET:
        split = _split_for(triton.cdiv(N, 32) * triton.cdiv(K, 32), n, 16, sms)
        return [{**_INTERPRET_CFG, "SPLIT_K": split, "SPLIT_MODE": "partial"}]
    modes = ("partial",) if deterministic else ("partial", "atomic")
    out = []
    for t in _WGRAD_TILES:
        tiles = triton.cdiv(N, t[0]) * triton.cdiv(K, t[1])
        for s in sorted({1, _split_for(tiles, n, t[2], sms)}):
            for mode in modes if s > 1 else ("partial",):
                out.append(_cfg(*t, PERSIST=True, SPLIT_K=s, SPLIT_MODE=mode))
        if tiles % sms:  # a partial last wave: share its tiles' reduction blocks over all programs
            out.append(_cfg(*t, PERSIST=True, SPLIT_K=1, STREAM_K=True))
    # Untuned default: the first candidate whose tiles (with their split) fill the GPU best.
    out.sort(key=lambda c: -_fill(triton.cdiv(N, c["BLOCK_M"]) * triton.cdiv(K, c["BLOCK_N"]) * c["SPLIT_K"], sms))
    return out


def _stream_k_plan(N: int, K: int, n: int, cfg: dict, sms: int) -> tuple[int, int, int]:
    """(tiles shared stream-K, workspace slots per program, programs) of ``cfg`` on ``sms`` SMs."""
    tiles = triton.cdiv(N, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"])
    sk_tiles = tiles % sms
    k_blocks = triton.cdiv(n, cfg["BLOCK_K"])
    programs = max(1, min(sms, sk_tiles * k_blocks))  # every stream-K run holds at least one block
    # A program's run of ceil(total / programs) blocks touches at most this many tiles.
    slots = triton.cdiv(triton.cdiv(sk_tiles * k_blocks, programs), k_blocks) + 1
    return sk_tiles, slots, programs


def _launch_wgrad_desc(g, x, index, c, cfg, *, accumulate, atomic, ws=None, locks=None, sk=(0, 0, 0)):
    n, N = g.shape
    K = x.shape[1]
    bm, bn, bk, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    units = triton.cdiv(N, bm) * triton.cdiv(K, bn) * split
    grid = sk[2] if cfg.get("STREAM_K") else _grid_size(units, cfg, g.device)
    _wgrad_desc_kernel[(grid,)](
        _desc(g, [bk, bm]), x, c if index is None else index, c, c if ws is None else ws,
        c if locks is None else locks,
        N, K, n, sk[0], sk[1], x.stride(0), x.stride(1), c.stride(0), c.stride(1),
        HAS_INDEX=index is not None, ACCUMULATE=accumulate, ATOMIC=atomic, SPLIT_K=split,
        STREAM_K=bool(cfg.get("STREAM_K")), UPCAST=INTERPRET, EVEN_R=n % bk == 0,
        FLATTEN=cfg["PERSIST"] and not INTERPRET,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _wgrad_run(g, x, index, result, accumulate, use_desc, cfg):
    """One weight-gradient call into ``result`` with ``cfg``. A split reduction (SPLIT_K > 1) either
    writes fp32 partial tiles that the last split to finish a tile adds in split order (SPLIT_MODE
    "partial", deterministic) or adds into an fp32 buffer with atomics ("atomic"). STREAM_K
    (descriptor kernel): whole tiles first, then the partial last wave's tiles shared block-wise by
    every program, their partial tiles added in program order by the last program to finish each."""
    n, N = g.shape
    K = x.shape[1]
    split = cfg["SPLIT_K"]
    atomic = split > 1 and cfg.get("SPLIT_MODE") == "atomic"
    stream_k = use_desc and bool(cfg.get("STREAM_K"))
    ws = locks = None
    sk = (0, 0, 0)
    if stream_k:
        sk = _stream_k_plan(N, K, n, cfg, num_sms(x.device))
        ws = _alloc((sk[1] * sk[2], cfg["BLOCK_M"], cfg["BLOCK_N"]), torch.float32, x.device)  # partial tiles
    elif split > 1 and not atomic:
        ws = _alloc((split, N, K), torch.float32, x.device)  # every split writes all of its slice
    if ws is not None:  # one arrival counter per output tile
        locks = torch.zeros(triton.cdiv(N, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"]), dtype=torch.int32,
                            device=x.device)
    if not atomic:
        target = result
    elif result.dtype == torch.float32:
        target = result
        if not accumulate:
            target.zero_()
    else:
        target = torch.zeros((N, K), dtype=torch.float32, device=x.device)
    into_c = accumulate and not atomic
    if use_desc:
        _launch_wgrad_desc(g, x, index, target, cfg, accumulate=into_c, atomic=atomic, ws=ws, locks=locks, sk=sk)
    else:
        # A = grad_outᵀ (N, n): A[i, r] = grad_out[r, i]; B = x[index] (n, K).
        strides = (g.stride(1), g.stride(0), x.stride(0), x.stride(1), target.stride(0), target.stride(1))
        _launch_pointer(g, x, target, None, None, index, N, K, n, strides, cfg,
                        accumulate=into_c, atomic=atomic, split_k=split, ws=ws, locks=locks)
    if target is not result:
        if accumulate:
            result.add_(target)
        else:
            result.copy_(target)


def gathered_weight_grad_into(g, x, index, result, accumulate, *, path: str = "auto", cfg: dict | None = None):
    """``result (+)= gᵀ @ x[index]`` (N, K).

    ``path``: "desc" or "pointer" forces a kernel family; "auto" times both where the descriptor
    kernel applies (the untuned default: descriptors). Split reductions through fp32 atomics (not
    bitwise reproducible) are candidates only while ``torch.are_deterministic_algorithms_enabled()``
    is false.
    """
    n, N = g.shape
    K = x.shape[1]
    desc_ok = path != "pointer" and (path == "desc" or (_desc_ok(g) and x.dtype == g.dtype))
    if cfg is None:
        det = torch.are_deterministic_algorithms_enabled()
        key = ("wgrad", path, N, K, _bucket(n), x.dtype, desc_ok, index is None, accumulate, result.dtype, det)
        cfg = _CHOICE.get(key)
        if cfg is None:
            sms = num_sms(x.device)
            cands = [{**c, "DESC": True} for c in _wgrad_candidates(N, K, n, sms, deterministic=det)] if desc_ok else []
            if path != "desc":
                split = _split_k(N, K, n, x.device)
                cands += [{**c, "SPLIT_K": split, "SPLIT_MODE": "partial", "DESC": False}
                          for c in _pointer_candidates()]
            scratch = result.clone()  # tuning trials write here, so ``result`` is touched once
            cfg = _tune(key, cands, lambda c: _wgrad_run(g, x, index, scratch, accumulate, c["DESC"], c))
    _wgrad_run(g, x, index, result, accumulate, cfg["DESC"], cfg)
    return result


@register("gathered_weight_grad", "triton", DEVICES)
def gathered_weight_grad_triton(grad_out, x, index, out):
    """``grad_outᵀ @ x[index]`` (N, K), reducing over the kept rows; adds into ``out`` when given."""
    if grad_out.dtype not in KERNEL_DTYPES or (out is not None and out.dtype not in KERNEL_DTYPES):
        return _gathered_weight_grad_torch(grad_out, x, index, out)
    index = _index(index)
    N = grad_out.shape[1]
    K = x.shape[1]
    if out is None:
        result = _alloc((N, K), x.dtype, x.device)  # (N, K)
        accumulate = False
    else:
        result, accumulate = out, True
    if N == 0 or K == 0:
        return result
    if grad_out.shape[0] == 0:
        return result if accumulate else result.zero_()
    return gathered_weight_grad_into(grad_out, x, index, result, accumulate)


@Launcher
@triton.jit
def _segment_sum_kernel(
    src_ptr, order_ptr, seg_start_ptr, seg_row_ptr, out_ptr,
    F, stride_src, stride_out,
    BLOCK_F: tl.constexpr,
):
    """One program per (segment of equal destination rows, column block): sum in sorted order."""
    seg = tl.program_id(0)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    start = tl.load(seg_start_ptr + seg)
    stop = tl.load(seg_start_ptr + seg + 1)
    row = tl.load(seg_row_ptr + seg).to(tl.int64)
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for i in range(start, stop):
        r = tl.load(order_ptr + i).to(tl.int64)
        acc += tl.load(src_ptr + r * stride_src + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    o = out_ptr + row * stride_out + offs_f
    acc += tl.load(o, mask=mask_f, other=0.0).to(tl.float32)
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask_f)


@Launcher
@triton.jit
def _atomic_scatter_kernel(
    src_ptr, index_ptr, out_ptr, n, F, stride_src, stride_out,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """``out[index[i]] += src[i]`` with fp32 atomics (summation order not fixed)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_r = offs_r < n
    mask = mask_r[:, None] & (offs_f < F)[None, :]
    rows = tl.load(index_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
    vals = tl.load(src_ptr + offs_r.to(tl.int64)[:, None] * stride_src + offs_f[None, :], mask=mask, other=0.0)
    tl.atomic_add(out_ptr + rows[:, None] * stride_out + offs_f[None, :], vals.to(tl.float32), mask=mask)


@register("scatter_add_rows", "triton", DEVICES)
def scatter_add_rows_triton(src, index, out, deterministic):
    """``out[index[i]] += src[i]``; deterministic (sorted segments) unless fp32 ``out`` allows atomics."""
    if src.dtype not in KERNEL_DTYPES or out.dtype not in KERNEL_DTYPES:
        return _scatter_add_rows_torch(src, index, out, deterministic)
    n, F = src.shape
    if n == 0 or F == 0:
        return out
    if src.stride(1) != 1:
        src = src.contiguous()
    target = out if out.stride(1) == 1 else out.contiguous()
    index = index.contiguous()
    block_f = 64 if INTERPRET else min(1024, triton.next_power_of_2(F))
    if not deterministic and target.dtype == torch.float32:
        block_r = 16
        grid = (triton.cdiv(n, block_r), triton.cdiv(F, block_f))
        _atomic_scatter_kernel[grid](
            src, index, target, n, F, src.stride(0), target.stride(0), BLOCK_R=block_r, BLOCK_F=block_f
        )
    else:
        order, seg_start, seg_row = segment_plan(index)
        grid = (seg_row.shape[0], triton.cdiv(F, block_f))
        _segment_sum_kernel[grid](
            src, order, seg_start, seg_row, target, F, src.stride(0), target.stride(0), BLOCK_F=block_f
        )
    if target is not out:
        out.copy_(target)
    return out
