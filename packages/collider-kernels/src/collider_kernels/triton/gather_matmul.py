"""Triton gather-GEMM ``Y = X[index] @ Wᵀ (+ bias)`` with the row gather inside the tile loads.

The descriptor kernel (fp16/bf16, 16-byte aligned weight rows) reads W through a tensor descriptor
(on Hopper the bulk tensor-copy engine) and the gathered rows of X through pointer loads, in a
persistent tile loop with grouped tile order; everything else takes the pointer-load kernel of
:mod:`~collider_kernels.triton.gemm`. No gathered copy of X is ever made; arithmetic accumulates
in fp32.

Tuning (:mod:`collider_kernels.tuning`, kernel ``"gather_matmul"``): the candidates of both
families are timed on first use of a key ``(path, N, K, rows_bucket(n), dtype, descriptor
applies, index is None, bias is None)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.triton import gemm, settings
from collider_kernels.triton.gemm import DESC_TILES, INTERPRET_CONFIG, tile_config, tile_coords
from collider_kernels.triton.launch import Launcher
from collider_kernels.tuning import INTERPRET, configure, register_candidates


@Launcher
@triton.jit
def gather_mm_desc_kernel(
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
        pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
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



def _desc_candidates(N: int) -> list[dict]:
    if INTERPRET:
        return [INTERPRET_CONFIG]
    tiles = [t for t in DESC_TILES if t[1] <= max(128, settings.next_power_of_2(N))]
    out = [tile_config(*t, PERSIST=p) for t in tiles for p in (True, False)]
    if N <= 256:  # few column tiles: favour more row tiles
        out.sort(key=lambda c: (c["BLOCK_M"] != 64, not c["PERSIST"]))
    return out


@register_candidates("gather_matmul")
def candidates(N: int, *, desc: bool = True, pointer: bool = True) -> list[dict]:
    """Configurations of a gather-GEMM with ``N`` output columns: descriptor-kernel tiles
    (``desc``) and pointer-kernel tiles (``pointer``), marked by ``DESC``. The first is the untuned
    default: descriptors first for N > 256 and under the interpreter, pointer tiles first else."""
    cands = [{**c, "DESC": True} for c in _desc_candidates(N)] if desc else []
    if pointer:
        ptr = [{**c, "DESC": False} for c in gemm.pointer_candidates()]
        cands = cands + ptr if N > 256 or INTERPRET else ptr + cands
    return cands


def launch_desc(x, index, weight, bias, y, cfg):
    """The descriptor kernel with ``cfg``: ``y (n, N) = x[index] @ weightᵀ (+ bias)``."""
    n, N = y.shape
    K = x.shape[1]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    units = settings.cdiv(n, bm) * settings.cdiv(N, bn)
    gather_mm_desc_kernel[(gemm.grid_size(units, cfg, x.device),)](
        x, y if index is None else index, gemm.tensor_desc(weight, [bn, bk]), y, y if bias is None else bias,
        n, N, K, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        HAS_INDEX=index is not None, HAS_BIAS=bias is not None, UPCAST=INTERPRET, EVEN_K=K % bk == 0,
        FLATTEN=cfg["PERSIST"] and not INTERPRET,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _run(x, index, weight, bias, y, cfg):
    if cfg["DESC"]:
        launch_desc(x, index, weight, bias, y, cfg)
    else:
        n, N = y.shape
        # B = weightᵀ (K, N): B[k, j] = weight[j, k].
        strides = (x.stride(0), x.stride(1), weight.stride(1), weight.stride(0), y.stride(0), y.stride(1))
        gemm.launch_pointer(x, weight, y, bias, index, None, n, N, x.shape[1], strides, cfg,
                            accumulate=False, atomic=False, split_k=1)


def gather_matmul_into(x, index, weight, bias, y, *, path: str = "auto", cfg: dict | None = None):
    """Write ``x[index] @ weightᵀ (+ bias)`` into ``y`` (n, N).

    ``path``: "desc" or "pointer" forces a kernel family; "auto" times both where the descriptor
    kernel applies. ``cfg``: run this configuration (a :func:`candidates` entry) untimed.
    """
    n, N = y.shape
    K = x.shape[1]
    use_desc = path != "pointer" and (path == "desc" or (gemm.desc_ok(weight) and x.dtype == weight.dtype))
    if cfg is None:
        key = (path, N, K, gemm.rows_bucket(n), x.dtype, use_desc, index is None, bias is None)
        cfg = configure("gather_matmul", key, lambda: candidates(N, desc=use_desc, pointer=path != "desc"),
                        lambda c: _run(x, index, weight, bias, y, c))
    _run(x, index, weight, bias, y, cfg)
    return y


@register("gather_matmul", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES)
def gather_matmul_triton(x, index, weight, bias):
    """``x[index] @ weightᵀ (+ bias)`` with the row gather fused into the A-tile loads."""
    index = gemm.contiguous_index(index)
    n = x.shape[0] if index is None else index.shape[0]
    N = weight.shape[0]
    y = settings.alloc_output((n, N), x.dtype, x.device)  # (n, N)
    if n == 0 or N == 0:
        return y
    return gather_matmul_into(x, index, weight, None if bias is None else bias.contiguous(), y)
