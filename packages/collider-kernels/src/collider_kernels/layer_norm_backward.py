"""LayerNorm backward over the kept rows (weight and bias; statistics in fp32 from the input)."""

from __future__ import annotations

import torch

from collider_kernels._checks import FLOAT_DTYPES, check_index, check_tensor
from collider_kernels.backends import register, resolve_backend


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
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be ({x.shape[1]},) to match x, got {tuple(weight.shape)}")
    check_tensor("grad", grad, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if index is None:
        rows = x.shape[0]
    else:
        check_index("index", index, x.shape[0], x.device, validate=validate)
        rows = index.shape[0]
    if tuple(grad.shape) != (rows, x.shape[1]):
        what = "x's rows" if index is None else "one row per index entry"
        raise ValueError(f"grad must be ({rows}, {x.shape[1]}) ({what}), got {tuple(grad.shape)}")
    fn = resolve_backend("layer_norm_backward", backend, x.device)
    return fn(grad, x, weight, float(eps), index)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


@register("layer_norm_backward", "torch")
def _layer_norm_backward_torch(grad, x, weight, eps, index):
    rows = _upcast(x if index is None else x.index_select(0, index))  # (n, H)
    g = _upcast(grad)
    mean = rows.mean(-1, keepdim=True)  # (n, 1)
    rstd = torch.rsqrt((rows - mean).pow(2).mean(-1, keepdim=True) + eps)
    xhat = (rows - mean) * rstd  # (n, H)
    dxhat = g * _upcast(weight)
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    dweight = (g * xhat).sum(0)  # (H,)
    dbias = g.sum(0)
    return dx.to(x.dtype), dweight, dbias
