"""Gathered weight gradient: ``dW = dYᵀ @ X[index]``; the reduction runs over kept rows only."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_index, check_tensor
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import FLOAT_DTYPES


def gathered_weight_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    index: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Weight gradient of a linear layer from kept rows.

    The Triton backend splits the reduction of small outputs over several programs; their fp32
    partial tiles are added in a fixed order (bitwise reproducible), and splits adding through fp32
    atomics are also tried unless ``torch.use_deterministic_algorithms(True)`` is in effect.

    Args:
        grad_out: (n, N) output gradient of the kept rows.
        x: (M, K) layer inputs; row ``index[i]`` pairs with ``grad_out[i]``.
        index: (n,) rows of ``x``, or ``None`` when ``x`` already holds the n rows.
        out: optional (N, K) buffer to accumulate into (``out += dYᵀ X[index]``), typically
            an fp32 gradient-accumulation buffer; it is returned. The product is accumulated in
            fp32 and added to ``out`` unrounded (torch backend on CPU: rounded once to the inputs'
            dtype before the sum).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cupy"``.
        validate: check that ``index`` lies in range (costs a device sync on CUDA).

    Returns:
        (N, K): a new tensor in ``x.dtype`` (fp32 accumulation), or ``out``.
    """
    check_tensor("grad_out", grad_out, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("x", x, ndim=2, dtypes=(grad_out.dtype,), device=grad_out.device)
    n = grad_out.shape[0]
    if index is None:
        if x.shape[0] != n:
            raise ValueError(f"x must have {n} rows like grad_out when index is None, got {x.shape[0]}")
    else:
        check_index("index", index, x.shape[0], x.device, validate=validate)
        if index.shape[0] != n:
            raise ValueError(f"index must have {n} entries (rows of grad_out), got {index.shape[0]}")
    if out is not None:
        check_tensor("out", out, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
        if tuple(out.shape) != (grad_out.shape[1], x.shape[1]):
            raise ValueError(
                f"out must be ({grad_out.shape[1]}, {x.shape[1]}), got {tuple(out.shape)}"
            )
    dtypes = (grad_out.dtype,) if out is None else (grad_out.dtype, out.dtype)
    fn = resolve_backend("gathered_weight_grad", backend, x.device, dtypes)
    return fn(grad_out, x, index, out)


@register("gathered_weight_grad", "torch")
def _gathered_weight_grad_torch(grad_out, x, index, out):
    rows = x if index is None else x.index_select(0, index)  # (n, K)
    if out is None:
        return grad_out.t() @ rows  # (N, K)
    if out.dtype == grad_out.dtype:
        return out.addmm_(grad_out.t(), rows)
    if out.is_cuda and out.dtype == torch.float32 and grad_out.dtype in (torch.float16, torch.bfloat16):
        # One GEMM whose epilogue adds the fp32 product into ``out`` (no rounded (N, K) temporary,
        # no separate pass over ``out``: an LM head accumulating over row chunks reads it once per chunk).
        return torch.addmm(out, grad_out.t(), rows, out_dtype=torch.float32, out=out)
    # Wider buffer (e.g. fp32 for bf16 inputs): the product runs on the inputs' dtype (tensor
    # cores, fp32 accumulation inside the GEMM); only the sum into ``out`` is in its dtype.
    return out.add_(grad_out.t() @ rows)
