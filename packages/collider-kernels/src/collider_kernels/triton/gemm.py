"""Shared GEMM machinery of the Triton gather-GEMM and weight-gradient ops.

* Tiles: grouped tile order (:func:`tile_coords`), tile stores that add, accumulate or write
  (:func:`store_tile`), the tile configurations (:func:`tile_config`, :data:`DESC_TILES`,
  :data:`POINTER_TILES`) and how many programs fill the GPU (:func:`fill`, :func:`grid_size`).
* Split reductions: a reduction shared by ``SPLIT_K`` programs writes fp32 partial tiles that the
  last program to arrive at a tile's lock adds in a fixed order (:func:`store_split`,
  :func:`arrive`, :func:`split_for`), so results are bitwise reproducible.
* Stream-K: the tiles of a partial last wave cut into runs of reduction blocks shared evenly by
  all programs (:func:`stream_k_range`, :func:`stream_k_owner`, :func:`stream_k_plan`).
* The pointer-load kernel for everything the descriptor kernels do not take (fp32, unaligned
  strides): ``C[m, n] (+)= sum_k A[ra(m), k] B[rb(k), n]`` with optional row indexes
  ``ra``/``rb`` (:func:`gemm_kernel`, :func:`launch_pointer`).

The descriptor kernels of each op live in :mod:`~collider_kernels.triton.gather_matmul` and
:mod:`~collider_kernels.triton.gathered_weight_grad`. All arithmetic accumulates in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from collider_kernels.triton import settings
from collider_kernels.triton.launch import Launcher
from collider_kernels.tuning import INTERPRET


@triton.jit
def tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row-tiles in a row share their column tiles in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % num_pid_in_group) % group_size_m
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def store_tile(c_ptrs, acc, mask_c, ACCUMULATE: tl.constexpr, ATOMIC: tl.constexpr):
    # fp32 tile acc into C: atomically added (split reduction), added to C, or stored.
    if ATOMIC:
        tl.atomic_add(c_ptrs, acc, mask=mask_c)
    else:
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=mask_c, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(c_ptrs.dtype.element_ty), mask=mask_c)



@triton.jit
def stream_k_range(program, programs, total):
    # Stream-K: reduction blocks [start, stop) of the `total` shared ones that `program` runs.
    return program * total // programs, (program + 1) * total // programs


@triton.jit
def stream_k_owner(it, programs, total):
    # The program whose stream-K run holds reduction block `it` (the last p with start(p) <= it).
    return ((it + 1) * programs + total - 1) // total - 1


@triton.jit
def arrive(lock_ptr, arrivals):
    # After this program stored its partial tile: true for the last of `arrivals` programs to arrive.
    # The barrier orders every thread's stores before the release; the acquire orders the last
    # arrival's reads of the other partials after it.
    tl.debug_barrier()
    return tl.atomic_add(lock_ptr, 1, sem="acq_rel", scope="gpu") == arrivals - 1


@triton.jit
def store_split(acc, ws_ptrs, slice_size, split, lock_ptr, c_ptrs, mask_c,
                 SPLIT_K: tl.constexpr, ACCUMULATE: tl.constexpr):
    # Split `split` of a C tile: its fp32 partial goes to ws_ptrs + split·slice_size; the last split
    # to arrive at the tile's lock adds all SPLIT_K partials in split order and stores C.
    tl.store(ws_ptrs + split.to(tl.int64) * slice_size, acc, mask=mask_c)
    if arrive(lock_ptr, SPLIT_K):
        acc = tl.zeros_like(acc)
        for _ in range(SPLIT_K):
            acc += tl.load(ws_ptrs, mask=mask_c, other=0.0, cache_modifier=".cg")
            ws_ptrs += slice_size
        store_tile(c_ptrs, acc, mask_c, ACCUMULATE, False)



@Launcher
@triton.jit
def gemm_kernel(
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
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
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
        store_split(acc, ws_ptrs, M * N, pid_k, lock_ptr + tl.program_id(0), c_ptrs, mask_c, SPLIT_K, ACCUMULATE)
    else:
        store_tile(c_ptrs, acc, mask_c, ACCUMULATE, ATOMIC)



# ------------------------------------------------------------------------------------- configuration


def tile_config(bm, bn, bk, stages, warps, **extra):
    """A GEMM configuration: tile (BLOCK_M, BLOCK_N, BLOCK_K), pipeline stages and warps, plus
    ``extra`` keys (PERSIST, SPLIT_K, SPLIT_MODE, STREAM_K, DESC)."""
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
            "num_stages": stages, "num_warps": warps, **extra}


INTERPRET_CONFIG = {**tile_config(32, 32, 16, 1, 4), "GROUP_M": 2, "PERSIST": True, "SPLIT_K": 1}
# Candidates per kernel family, timed on first use of a shape (the first is the untuned default).
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). 256x128 with 4 stages (192 KB of shared memory) was added
# after a profile showed cuBLAS's weight-gradient tile using 221 KB against our 3-stage 147 KB.
DESC_TILES = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 256, 64, 4, 8), (64, 256, 64, 4, 4),
              (128, 128, 64, 4, 4), (64, 128, 64, 5, 4), (256, 128, 64, 3, 8), (256, 128, 64, 4, 8)]
POINTER_TILES = [(128, 128, 64, 3, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4),
                 (128, 64, 64, 4, 4), (64, 64, 32, 4, 4), (32, 32, 32, 2, 4)]


def fill(units: int, sms: int) -> float:
    """Share of ``sms`` busy over the waves that ``units`` programs take."""
    return units / (settings.cdiv(units, sms) * sms)


def split_for(tiles: int, R: int, block_k: int, sms: int) -> int:
    """Reduction split that best fills whole waves of ``sms`` programs (1 when tiles already do)."""
    best = 1
    for s in range(2, 17):
        if R < s * 8 * block_k:  # keep at least 8 reduction blocks per program
            break
        if fill(tiles * s, sms) > 1.15 * fill(tiles * best, sms):  # the fp32 buffer and atomics must pay
            best = s
    return best


def pointer_split(N: int, K: int, R: int, sms: int) -> int:
    """Reduction split of the pointer kernel's (N, K) weight gradient over R rows (128x128 tiles)."""
    return split_for(settings.cdiv(N, 128) * settings.cdiv(K, 128), R, 64, sms)


def stream_k_plan(N: int, K: int, n: int, cfg: dict, sms: int) -> tuple[int, int, int]:
    """(tiles shared stream-K, workspace slots per program, programs) of ``cfg`` on ``sms`` SMs."""
    tiles = settings.cdiv(N, cfg["BLOCK_M"]) * settings.cdiv(K, cfg["BLOCK_N"])
    sk_tiles = tiles % sms
    k_blocks = settings.cdiv(n, cfg["BLOCK_K"])
    programs = max(1, min(sms, sk_tiles * k_blocks))  # every stream-K run holds at least one block
    # A program's run of ceil(total / programs) blocks touches at most this many tiles.
    slots = settings.cdiv(settings.cdiv(sk_tiles * k_blocks, programs), k_blocks) + 1
    return sk_tiles, slots, programs


def desc_ok(t: torch.Tensor) -> bool:
    """Tensor descriptors need 2-byte elements here, unit inner stride and 16-byte aligned rows."""
    return (
        t.dtype in (torch.float16, torch.bfloat16) and t.stride(1) == 1 and t.stride(0) % 8 == 0
        and t.data_ptr() % 16 == 0 and t.shape[0] > 0 and t.shape[1] > 0
    )


def tensor_desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """A tensor descriptor of 2-D ``t`` loading ``block`` tiles."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def grid_size(units: int, cfg: dict, device: torch.device) -> int:
    """Programs of a launch: one per unit, or at most one per SM for a persistent ``cfg``."""
    return min(units, settings.num_sms(device)) if cfg["PERSIST"] else units


def rows_bucket(n: int) -> int:
    """Tuning-key bucket of a row count: configs are shared by row counts within a factor of two."""
    return n.bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for ``dtype``."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # match torch's fp32 matmul unless the user opted into TF32
    return "tf32"


def pointer_candidates() -> list[dict]:
    """Pointer-kernel tiles, timed on first use of a shape (the first is the untuned default)."""
    if INTERPRET:
        return [INTERPRET_CONFIG]
    return [tile_config(*t) for t in POINTER_TILES]


def launch_pointer(a, b, c, bias, a_index, b_index, M, N, K, strides, cfg, *, accumulate, atomic, split_k,
                   ws=None, locks=None):
    """Pointer kernel: C (M, N) (+)= A[a_index] (M, K) @ B[b_index] (K, N); ``strides`` in the
    kernel's order (A m, k; B k, n; C m, n); a split without atomics needs ``ws`` and ``locks``."""
    dummy = c  # stands in for absent optional pointers (never dereferenced)
    grid = (settings.cdiv(M, cfg["BLOCK_M"]) * settings.cdiv(N, cfg["BLOCK_N"]), split_k)
    gemm_kernel[grid](
        a, b, c,
        dummy if bias is None else bias,
        dummy if a_index is None else a_index,
        dummy if b_index is None else b_index,
        dummy if ws is None else ws,
        dummy if locks is None else locks,
        M, N, K, *strides,
        GATHER_A_ROWS=a_index is not None, GATHER_B_ROWS=b_index is not None, HAS_BIAS=bias is not None,
        ACCUMULATE=accumulate, ATOMIC=atomic, SPLIT_K=split_k,
        UPCAST=INTERPRET or a.dtype == torch.float32, DOT_PRECISION=dot_precision(a.dtype),
        EVEN_K=K % cfg["BLOCK_K"] == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def contiguous_index(index: torch.Tensor | None) -> torch.Tensor | None:
    """``index`` with unit stride (None passes through)."""
    return None if index is None else index.contiguous()
