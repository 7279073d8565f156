"""Triton gathered weight-gradient GEMM ``dW (+)= dYᵀ @ X[index]``, reducing over kept rows only.

The descriptor kernel (fp16/bf16, 16-byte aligned rows of dY) reads dY through a tensor descriptor
and the gathered rows of X through pointer loads, in a persistent tile loop with grouped tile
order. Small outputs split the reduction over programs (partial tiles added in a fixed order, or
fp32 atomics), and a stream-K schedule shares the tiles of a partial last wave block-wise over all
programs (machinery in :mod:`~collider_kernels.triton.gemm`); everything else takes the
pointer-load kernel. Arithmetic accumulates in fp32.

Tuning (:mod:`collider_kernels.tuning`, kernel ``"gathered_weight_grad"``): the candidates are
timed into a scratch copy of the result on first use of a key ``(path, N, K, rows_bucket(n),
dtype, descriptor applies, index is None, accumulate, result dtype, deterministic mode)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.triton import gemm, settings
from collider_kernels.triton.gemm import (
    DESC_TILES,
    INTERPRET_CONFIG,
    arrive,
    fill,
    split_for,
    store_split,
    store_tile,
    stream_k_owner,
    stream_k_range,
    tile_config,
    tile_coords,
)
from collider_kernels.triton.launch import Launcher
from collider_kernels.tuning import INTERPRET, configure, register_candidates


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



@Launcher
@triton.jit
def wgrad_desc_kernel(
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
        pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _wgrad_tile(g_desc, x_ptr, index_ptr, N, r_start, r_stop, off_m, offs_n, stride_xm, stride_xn,
                          HAS_INDEX, UPCAST, EVEN_R, BLOCK_M, BLOCK_N, BLOCK_K)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        mask_c = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        if (SPLIT_K > 1) and (not ATOMIC):
            ws_ptrs = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]  # in slice 0 of ws
            store_split(acc, ws_ptrs, M * N, split, lock_ptr + tile, c_ptrs, mask_c, SPLIT_K, ACCUMULATE)
        else:
            store_tile(c_ptrs, acc, mask_c, ACCUMULATE, ATOMIC)
    if STREAM_K:
        k_blocks = tl.cdiv(R, BLOCK_K)
        programs = tl.num_programs(0)
        program = tl.program_id(0)
        total = SK_TILES * k_blocks  # at least `programs`: every run is non-empty
        it, it_end = stream_k_range(program, programs, total)
        first = it // k_blocks
        offs_ws = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        while it < it_end:
            t = it // k_blocks  # stream-K tile, 0 .. SK_TILES-1
            k0 = it - t * k_blocks
            k1 = min(k_blocks, k0 + it_end - it)
            pid_m, pid_n = tile_coords(unit_tiles + t, num_pid_m, num_pid_n, GROUP_M)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = _wgrad_tile(g_desc, x_ptr, index_ptr, N, k0 * BLOCK_K, min(R, k1 * BLOCK_K), pid_m * BLOCK_M,
                              offs_n, stride_xm, stride_xn, HAS_INDEX, UPCAST, EVEN_R, BLOCK_M, BLOCK_N, BLOCK_K)
            slot = (program * SK_SLOTS + t - first).to(tl.int64)
            tl.store(ws_ptr + slot * (BLOCK_M * BLOCK_N) + offs_ws, acc)
            # The programs whose runs cover part of tile t: q_lo .. q_hi, each with one partial.
            q_lo = stream_k_owner(t * k_blocks, programs, total)
            q_hi = stream_k_owner(t * k_blocks + k_blocks - 1, programs, total)
            if arrive(lock_ptr + t, q_hi - q_lo + 1):
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for q in range(q_lo, q_hi + 1):
                    q_start, _ = stream_k_range(q, programs, total)
                    q_slot = (q * SK_SLOTS + t - q_start // k_blocks).to(tl.int64)
                    acc += tl.load(ws_ptr + q_slot * (BLOCK_M * BLOCK_N) + offs_ws, cache_modifier=".cg")
                mask_c = (offs_m < M)[:, None] & (offs_n < N)[None, :]
                c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
                store_tile(c_ptrs, acc, mask_c, ACCUMULATE, False)
            it += k1 - k0



def _desc_candidates(N: int, K: int, n: int, sms: int, deterministic: bool) -> list[dict]:
    """Descriptor-kernel candidates: whole tiles; split reductions (partial tiles added in order, and
    fp32 atomics unless ``deterministic``); stream-K for a partial last wave (partial tiles added in
    order)."""
    if INTERPRET:
        split = split_for(settings.cdiv(N, 32) * settings.cdiv(K, 32), n, 16, sms)
        return [{**INTERPRET_CONFIG, "SPLIT_K": split, "SPLIT_MODE": "partial"}]
    modes = ("partial",) if deterministic else ("partial", "atomic")
    out = []
    for t in DESC_TILES:
        tiles = settings.cdiv(N, t[0]) * settings.cdiv(K, t[1])
        for s in sorted({1, split_for(tiles, n, t[2], sms)}):
            for mode in modes if s > 1 else ("partial",):
                out.append(tile_config(*t, PERSIST=True, SPLIT_K=s, SPLIT_MODE=mode))
        if tiles % sms:  # a partial last wave: share its tiles' reduction blocks over all programs
            out.append(tile_config(*t, PERSIST=True, SPLIT_K=1, STREAM_K=True))
    # Untuned default: the first candidate whose tiles (with their split) fill the GPU best.
    out.sort(key=lambda c: -fill(settings.cdiv(N, c["BLOCK_M"]) * settings.cdiv(K, c["BLOCK_N"]) * c["SPLIT_K"], sms))
    return out


@register_candidates("gathered_weight_grad")
def candidates(N: int, K: int, n: int, sms: int, *, desc: bool = True, pointer: bool = True,
               deterministic: bool = True) -> list[dict]:
    """Configurations of an (N, K) weight gradient over ``n`` rows on ``sms`` SMs: descriptor-kernel
    tiles (``desc``: whole tiles, split reductions, stream-K; fp32-atomic splits unless
    ``deterministic``) then pointer-kernel tiles (``pointer``), marked by ``DESC``. The first is the
    untuned default."""
    cands = [{**c, "DESC": True} for c in _desc_candidates(N, K, n, sms, deterministic)] if desc else []
    if pointer:
        split = gemm.pointer_split(N, K, n, sms)
        cands += [{**c, "SPLIT_K": split, "SPLIT_MODE": "partial", "DESC": False} for c in gemm.pointer_candidates()]
    return cands


def launch_desc(g, x, index, c, cfg, *, accumulate, atomic, ws=None, locks=None, sk=(0, 0, 0)):
    """The descriptor kernel with ``cfg``: ``c (N, K) (+)= gᵀ @ x[index]`` (``sk``: the
    :func:`~collider_kernels.triton.gemm.stream_k_plan` of a stream-K config)."""
    n, N = g.shape
    K = x.shape[1]
    bm, bn, bk, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    units = settings.cdiv(N, bm) * settings.cdiv(K, bn) * split
    grid = sk[2] if cfg.get("STREAM_K") else gemm.grid_size(units, cfg, g.device)
    wgrad_desc_kernel[(grid,)](
        gemm.tensor_desc(g, [bk, bm]), x, c if index is None else index, c, c if ws is None else ws,
        c if locks is None else locks,
        N, K, n, sk[0], sk[1], x.stride(0), x.stride(1), c.stride(0), c.stride(1),
        HAS_INDEX=index is not None, ACCUMULATE=accumulate, ATOMIC=atomic, SPLIT_K=split,
        STREAM_K=bool(cfg.get("STREAM_K")), UPCAST=INTERPRET, EVEN_R=n % bk == 0,
        FLATTEN=cfg["PERSIST"] and not INTERPRET,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _run(g, x, index, result, accumulate, cfg):
    """One weight-gradient call into ``result`` with ``cfg``. A split reduction (SPLIT_K > 1) either
    writes fp32 partial tiles that the last split to finish a tile adds in split order (SPLIT_MODE
    "partial", deterministic) or adds into an fp32 buffer with atomics ("atomic"). STREAM_K
    (descriptor kernel): whole tiles first, then the partial last wave's tiles shared block-wise by
    every program, their partial tiles added in program order by the last program to finish each."""
    n, N = g.shape
    K = x.shape[1]
    use_desc = cfg["DESC"]
    split = cfg["SPLIT_K"]
    atomic = split > 1 and cfg.get("SPLIT_MODE") == "atomic"
    stream_k = use_desc and bool(cfg.get("STREAM_K"))
    ws = locks = None
    sk = (0, 0, 0)
    if stream_k:
        sk = gemm.stream_k_plan(N, K, n, cfg, settings.num_sms(x.device))
        ws = settings.alloc_output((sk[1] * sk[2], cfg["BLOCK_M"], cfg["BLOCK_N"]), torch.float32, x.device)
    elif split > 1 and not atomic:
        ws = settings.alloc_output((split, N, K), torch.float32, x.device)  # every split writes all of its slice
    if ws is not None:  # one arrival counter per output tile
        locks = torch.zeros(settings.cdiv(N, cfg["BLOCK_M"]) * settings.cdiv(K, cfg["BLOCK_N"]), dtype=torch.int32,
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
        launch_desc(g, x, index, target, cfg, accumulate=into_c, atomic=atomic, ws=ws, locks=locks, sk=sk)
    else:
        # A = grad_outᵀ (N, n): A[i, r] = grad_out[r, i]; B = x[index] (n, K).
        strides = (g.stride(1), g.stride(0), x.stride(0), x.stride(1), target.stride(0), target.stride(1))
        gemm.launch_pointer(g, x, target, None, None, index, N, K, n, strides, cfg,
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
    is false. ``cfg``: run this configuration (a :func:`candidates` entry) untimed.
    """
    n, N = g.shape
    K = x.shape[1]
    use_desc = path != "pointer" and (path == "desc" or (gemm.desc_ok(g) and x.dtype == g.dtype))
    if cfg is None:
        det = torch.are_deterministic_algorithms_enabled()
        key = (path, N, K, gemm.rows_bucket(n), x.dtype, use_desc, index is None, accumulate, result.dtype, det)
        scratch = []

        def trial(c):  # tuning trials write into a copy, so ``result`` is touched once
            if not scratch:
                scratch.append(result.clone())
            _run(g, x, index, scratch[0], accumulate, c)

        cfg = configure("gathered_weight_grad", key, lambda: candidates(
            N, K, n, settings.num_sms(x.device), desc=use_desc, pointer=path != "desc", deterministic=det), trial)
    _run(g, x, index, result, accumulate, cfg)
    return result


@register("gathered_weight_grad", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES)
def gathered_weight_grad_triton(grad_out, x, index, out):
    """``grad_outᵀ @ x[index]`` (N, K), reducing over the kept rows; adds into ``out`` when given."""
    index = gemm.contiguous_index(index)
    N = grad_out.shape[1]
    K = x.shape[1]
    if out is None:
        result = settings.alloc_output((N, K), x.dtype, x.device)  # (N, K)
        accumulate = False
    else:
        result, accumulate = out, True
    if N == 0 or K == 0:
        return result
    if grad_out.shape[0] == 0:
        return result if accumulate else result.zero_()
    return gathered_weight_grad_into(grad_out, x, index, result, accumulate)
