"""Gather-GEMM: ``Y = X[index] @ Wᵀ (+ bias)`` over the kept rows of ``X`` only."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_index, check_tensor
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import FLOAT_DTYPES


def gather_matmul(
    x: torch.Tensor,
    index: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Multiply the rows ``x[index]`` by ``weightᵀ``.

    Args:
        x: (M, K) activations (any row stride).
        index: (n,) int64/int32 rows of ``x`` to use, or ``None`` for all rows.
        weight: (N, K) as stored by ``nn.Linear``.
        bias: optional (N,) added to every output row.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cupy"``.
        validate: check that ``index`` lies in range (costs a device sync on CUDA).

    Returns:
        (n, N) in ``x.dtype``, accumulated in fp32 (or fp64 for fp64 inputs).
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be (N, {x.shape[1]}) to match x, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if index is not None:
        check_index("index", index, x.shape[0], x.device, validate=validate)
    fn = resolve_backend("gather_matmul", backend, x.device, (x.dtype,))
    return fn(x, index, weight, bias)


@register("gather_matmul", "torch")
def _gather_matmul_torch(x, index, weight, bias):
    rows = x if index is None else x.index_select(0, index)  # (n, K)
    if bias is None:
        return rows @ weight.t()  # (n, N)
    return torch.addmm(bias, rows, weight.t())
