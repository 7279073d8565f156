"""CuPy gather-GEMM ``x[index] @ weightᵀ (+ bias)``: a raw-kernel row gather, then one cuBLAS GEMM."""

from __future__ import annotations

import torch

from collider_kernels.backends import register
from collider_kernels.cupy._interop import (
    DEVICES,
    OP_N,
    OP_T,
    as_cupy,
    cublas_gemm,
    gather_rows,
    on_torch_stream,
    row_major,
)
from collider_kernels.dtypes import KERNEL_DTYPES


@register("gather_matmul", "cupy", devices=DEVICES, dtypes=KERNEL_DTYPES)
def gather_matmul_cupy(x, index, weight, bias):
    """``x[index] @ weightᵀ (+ bias)``: raw-kernel row gather, then one cuBLAS GEMM."""
    N, K = weight.shape
    with on_torch_stream(x.device):
        rows = x if index is None else gather_rows(x, index)  # (n, K)
        n = rows.shape[0]
        y = torch.empty((n, N), dtype=x.dtype, device=x.device)  # (n, N)
        if n == 0 or N == 0:
            return y
        if K == 0:
            return y.zero_() if bias is None else y.copy_(bias.expand(n, N))
        rows = row_major(rows, K)
        weight = row_major(weight, K)
        if bias is not None:
            as_cupy(y)[...] = as_cupy(bias.contiguous())  # broadcast into every row; the GEMM adds onto it
        # Row-major Y (n, N) is column-major Yᵀ (N, n) = W (N, K) · rowsᵀ (K, n).
        cublas_gemm(
            OP_T, OP_N, N, n, K,
            weight.data_ptr(), weight.stride(0), rows.data_ptr(), rows.stride(0),
            y.data_ptr(), N, bias is not None, x.dtype, y.dtype,
        )
    return y
