"""LayerNorm backward over the kept rows (weight and bias; statistics in fp32 from the input)."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_norm_args
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import upcast


def layer_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    index: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``y = weight * (x - mean) * rstd + bias``, ``rstd = rsqrt(var(x) + eps)``.

    With ``xhat = (x32 - mean) * rstd`` (mean and biased variance over the row) and
    ``dxhat = grad32 * weight32``:
    ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))``,
    ``dweight = sum over rows of grad32 * xhat`` and ``dbias = sum over rows of grad32``, computed
    in fp32 (fp64 when ``x`` or ``grad`` is fp64).

    Args:
        grad: (n, H) output gradient of the rows ``index``.
        x: (M, H) forward input.
        weight: (H,) scale (the bias does not enter the backward).
        eps: added to the variance.
        index: (n,) int64/int32 rows of ``x``, or ``None`` for all rows (n == M).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check that ``index`` lies in range (costs a device sync on CUDA).

    Returns:
        ``(dx, dweight, dbias)``: dx (n, H) in ``x.dtype``; dweight and dbias (H,) summed over the
        n rows, in fp32 (fp64 when ``x`` or ``grad`` is fp64).
    """
    args = check_norm_args(grad, x, weight, eps, index, validate=validate)
    return resolve_backend("layer_norm_backward", backend, x.device, (grad.dtype, x.dtype, weight.dtype), args)(*args)


@register("layer_norm_backward", "torch")
def _layer_norm_backward_torch(grad, x, weight, eps, index):
    rows = upcast(x if index is None else x.index_select(0, index))  # (n, H)
    g = upcast(grad)
    mean = rows.mean(-1, keepdim=True)  # (n, 1)
    rstd = torch.rsqrt((rows - mean).pow(2).mean(-1, keepdim=True) + eps)
    xhat = (rows - mean) * rstd  # (n, H)
    dxhat = g * upcast(weight)
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    dweight = (g * xhat).sum(0)  # (H,)
    dbias = g.sum(0)
    return dx.to(x.dtype), dweight, dbias
