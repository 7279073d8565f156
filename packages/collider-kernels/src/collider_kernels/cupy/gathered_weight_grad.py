"""CuPy gathered weight gradient ``grad_outᵀ @ x[index]``: a raw-kernel row gather, then one cuBLAS GEMM."""

from __future__ import annotations

import torch

from collider_kernels.backends import register
from collider_kernels.cupy._interop import (
    DEVICES,
    OP_N,
    OP_T,
    cublas_gemm,
    gather_rows,
    on_torch_stream,
    row_major,
)
from collider_kernels.dtypes import KERNEL_DTYPES


@register("gathered_weight_grad", "cupy", devices=DEVICES, dtypes=KERNEL_DTYPES)
def gathered_weight_grad_cupy(grad_out, x, index, out):
    """``grad_outᵀ @ x[index]`` (N, K) by a raw-kernel gather and one cuBLAS GEMM; adds into ``out``."""
    n, N = grad_out.shape
    K = x.shape[1]
    with on_torch_stream(x.device):
        if out is None:
            result = torch.empty((N, K), dtype=x.dtype, device=x.device)  # (N, K)
        else:
            result = out
        if N == 0 or K == 0:
            return result
        if n == 0:
            return result if out is not None else result.zero_()
        rows = x if index is None else gather_rows(x, index)  # (n, K)
        rows = row_major(rows, K)
        grad_out = row_major(grad_out, N)
        direct = out is None or (
            out.dtype in (torch.float32, grad_out.dtype) and out.is_contiguous()
        )
        target = result if direct else torch.zeros((N, K), dtype=torch.float32, device=x.device)
        # Row-major dW (N, K) is column-major dWᵀ (K, N) = rowsᵀ (K, n) · grad_out (n, N).
        cublas_gemm(
            OP_N, OP_T, K, N, n,
            rows.data_ptr(), rows.stride(0), grad_out.data_ptr(), grad_out.stride(0),
            target.data_ptr(), K, out is not None and direct, grad_out.dtype, target.dtype,
        )
        if target is not result:
            result.add_(target)
    return result
