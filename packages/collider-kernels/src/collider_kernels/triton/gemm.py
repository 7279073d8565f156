"""Triton gather-GEMM, gathered weight-gradient GEMM and row scatter-add kernels.

One tiled GEMM kernel serves both GEMM ops. It computes ``C[m, n] (+)= sum_k A[ra(m), k] B[rb(k), n]``
where ``ra``/``rb`` optionally read rows through an index inside the K loop, so no gathered copy is
ever made:

* gather-GEMM ``Y = X[index] @ Wᵀ``: A = X with gathered rows (``GATHER_A_ROWS``), B = Wᵀ (a strided
  view of W, no copy);
* weight gradient ``dW = dYᵀ @ X[index]``: A = dYᵀ (strided view), B = X with gathered rows along
  the reduction (``GATHER_B_ROWS``); ``ACCUMULATE`` adds into an existing ``out`` in the epilogue,
  and small outputs split the reduction over programs that add into an fp32 buffer atomically.

All arithmetic accumulates in fp32. On the GPU the block shapes are autotuned per problem shape;
under ``TRITON_INTERPRET=1`` one small fixed configuration runs instead.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from collider_kernels.backends import register
from collider_kernels.gather_matmul import _gather_matmul_torch
from collider_kernels.gathered_weight_grad import _gathered_weight_grad_torch
from collider_kernels.scatter_add_rows import _scatter_add_rows_torch
from collider_kernels.triton import DEVICES

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# COLLIDER_TRITON_AUTOTUNE=0 runs one fixed GPU configuration instead of tuning (fast test runs).
AUTOTUNE = not INTERPRET and os.environ.get("COLLIDER_TRITON_AUTOTUNE", "1") != "0"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, a_index_ptr, b_index_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    GATHER_A_ROWS: tl.constexpr,  # A row m is a_ptr row a_index[m]
    GATHER_B_ROWS: tl.constexpr,  # B row k is b_ptr row b_index[k]
    HAS_BIAS: tl.constexpr,  # add bias[n] to every row of C
    ACCUMULATE: tl.constexpr,  # C += A @ B instead of C = A @ B
    ATOMIC: tl.constexpr,  # add into fp32 C with atomics (split reduction)
    SPLIT_K: tl.constexpr,  # programs sharing the reduction of one C tile
    UPCAST: tl.constexpr,  # cast loaded tiles to fp32 before the dot
    DOT_PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K: no mask on the reduction
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped tile order: GROUP_M row-tiles share their B tiles in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

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
    c_ptrs = (
        c_ptr
        + offs_m.to(tl.int64)[:, None] * stride_cm
        + offs_n.to(tl.int64)[None, :] * stride_cn
    )
    mask_c = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(c_ptrs, acc, mask=mask_c)
    else:
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=mask_c, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


_gemm_kernel_h = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(
    _gemm_kernel
)


def _configs():
    # Hopper-sized tiles for bf16/fp16; configs that do not fit (fp32) are skipped by the tuner.
    shapes = [
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 256, 64, 4, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 64, 4, 8),
        (128, 64, 64, 4, 4),
        (256, 128, 64, 4, 8),
        (128, 128, 128, 3, 8),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in shapes
    ]


def _tuning_bench(fn, quantiles=None):
    # Short trials: the tuned problems are large enough that a few repeats separate the configs.
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_FLAG_KEYS = ["GATHER_A_ROWS", "GATHER_B_ROWS", "HAS_BIAS", "ACCUMULATE", "ATOMIC", "SPLIT_K", "UPCAST"]


def _autotune(key, **kw):
    try:
        return triton.autotune(configs=_configs(), key=key, do_bench=_tuning_bench, **kw)
    except TypeError:  # a triton without the do_bench hook
        return triton.autotune(configs=_configs(), key=key, **kw)


# Forward-shaped GEMM: tuned per (N, K); the row count n follows the keep ratio and shares a config.
_gemm_fwd_tuned = _autotune(["N", "K", *_FLAG_KEYS])(_gemm_kernel_h)
# Weight-gradient GEMM: tuned per output (M, N); the reduction length n follows the keep ratio.
# Tuning trials re-run a kernel that adds into C, so C is restored after each trial.
_gemm_wgrad_tuned = _autotune(["M", "N", *_FLAG_KEYS], restore_value=["c_ptr"])(_gemm_kernel_h)

_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}
_FIXED_GPU_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # match torch's fp32 matmul unless the user opted into TF32
    return "tf32"


def _launch_gemm(tuned, a, b, c, bias, a_index, b_index, M, N, K, strides, *, accumulate, atomic, split_k):
    """Launch the GEMM kernel: C (M, N) (+)= A[a_index] (M, K) @ B[b_index] (K, N)."""
    dummy = c  # stands in for absent optional pointers (never dereferenced)
    flags = {
        "GATHER_A_ROWS": a_index is not None,
        "GATHER_B_ROWS": b_index is not None,
        "HAS_BIAS": bias is not None,
        "ACCUMULATE": accumulate,
        "ATOMIC": atomic,
        "SPLIT_K": split_k,
        "UPCAST": INTERPRET or a.dtype == torch.float32,
        "DOT_PRECISION": _dot_precision(a.dtype),
    }
    args = (
        a, b, c,
        dummy if bias is None else bias,
        dummy if a_index is None else a_index,
        dummy if b_index is None else b_index,
        M, N, K, *strides,
    )
    if not AUTOTUNE:
        cfg = _INTERPRET_CONFIG if INTERPRET else _FIXED_GPU_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split_k)
        _gemm_kernel_h[grid](*args, **flags, **cfg)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)

        tuned[grid](*args, **flags)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_k(M: int, N: int, K: int, device: torch.device) -> int:
    """Reduction split for the weight gradient: enough programs to fill the GPU on small outputs."""
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    sms = _num_sms(device)
    if tiles >= sms or K < 1024:
        return 1
    split = min(16, max(1, (2 * sms) // tiles), K // 512)
    return max(1, split)


def _index(index: torch.Tensor | None) -> torch.Tensor | None:
    return None if index is None else index.contiguous()


@register("gather_matmul", "triton", DEVICES)
def gather_matmul_triton(x, index, weight, bias):
    """``x[index] @ weightᵀ (+ bias)`` with the row gather fused into the A-tile loads."""
    if x.dtype not in _KERNEL_DTYPES:
        return _gather_matmul_torch(x, index, weight, bias)
    index = _index(index)
    n = x.shape[0] if index is None else index.shape[0]
    N, K = weight.shape
    y = torch.empty((n, N), dtype=x.dtype, device=x.device)  # (n, N)
    if n == 0 or N == 0:
        return y
    # B = weightᵀ (K, N): B[k, j] = weight[j, k].
    strides = (x.stride(0), x.stride(1), weight.stride(1), weight.stride(0), y.stride(0), y.stride(1))
    _launch_gemm(
        _gemm_fwd_tuned, x, weight, y, None if bias is None else bias.contiguous(), index, None,
        n, N, K, strides, accumulate=False, atomic=False, split_k=1,
    )
    return y


@register("gathered_weight_grad", "triton", DEVICES)
def gathered_weight_grad_triton(grad_out, x, index, out):
    """``grad_outᵀ @ x[index]`` (N, K), reducing over the kept rows; adds into ``out`` when given."""
    if grad_out.dtype not in _KERNEL_DTYPES or (out is not None and out.dtype not in _KERNEL_DTYPES):
        return _gathered_weight_grad_torch(grad_out, x, index, out)
    index = _index(index)
    n, N = grad_out.shape
    K = x.shape[1]
    if out is None:
        result = torch.empty((N, K), dtype=x.dtype, device=x.device)  # (N, K)
        accumulate = False
    else:
        result, accumulate = out, True
    if N == 0 or K == 0:
        return result
    split = _split_k(N, K, n, x.device)
    if split > 1:
        if result.dtype == torch.float32:
            target = result
            if not accumulate:
                target.zero_()
        else:
            target = torch.zeros((N, K), dtype=torch.float32, device=x.device)
    else:
        target = result
    # A = grad_outᵀ (N, n): A[i, r] = grad_out[r, i]; B = x[index] (n, K).
    strides = (
        grad_out.stride(1), grad_out.stride(0), x.stride(0), x.stride(1),
        target.stride(0), target.stride(1),
    )
    _launch_gemm(
        _gemm_wgrad_tuned, grad_out, x, target, None, None, index,
        N, K, n, strides, accumulate=accumulate and split == 1, atomic=split > 1, split_k=split,
    )
    if target is not result:
        if accumulate:
            result.add_(target)
        else:
            result.copy_(target)
    return result


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


def segment_plan(index: torch.Tensor):
    """Sort ``index`` stably into segments of equal rows.

    Returns ``(order, seg_start, seg_row)``: source rows in summation order (n,), segment
    boundaries into ``order`` (S + 1,), and each segment's destination row (S,).
    """
    sorted_rows, order = torch.sort(index, stable=True)  # (n,), (n,)
    seg_row, counts = torch.unique_consecutive(sorted_rows, return_counts=True)  # (S,), (S,)
    seg_start = torch.zeros(seg_row.shape[0] + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(counts, 0, out=seg_start[1:])
    return order, seg_start, seg_row


@register("scatter_add_rows", "triton", DEVICES)
def scatter_add_rows_triton(src, index, out, deterministic):
    """``out[index[i]] += src[i]``; deterministic (sorted segments) unless fp32 ``out`` allows atomics."""
    if src.dtype not in _KERNEL_DTYPES or out.dtype not in _KERNEL_DTYPES:
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
