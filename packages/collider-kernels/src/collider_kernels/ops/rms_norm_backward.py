"""RMSNorm backward over the kept rows (Llama/Qwen convention: normalise in fp32, cast, then scale)."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_norm_args, check_same_shape, check_tensor
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import FLOAT_DTYPES, compute_dtype
from collider_kernels.ops.rms_norm_forward import rms_normalize


def rms_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    index: torch.Tensor | None = None,
    *,
    residual_grad: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``y = weight * (x32 * rstd).to(x.dtype)``, ``rstd = rsqrt(mean(x32²) + eps)``.

    With ``xhat = x32 * rstd`` and ``dxhat = grad32 * weight32``:
    ``dx = rstd * (dxhat - xhat * mean(dxhat * xhat))`` and
    ``dweight = sum over rows of grad32 * xhat.to(x.dtype)``, computed in fp32 (fp64 when any
    input is fp64).

    Args:
        grad: (n, H) output gradient of the rows ``index``.
        x: (M, H) forward input.
        weight: (H,) scale.
        eps: added to the mean square.
        index: (n,) int64/int32 rows of ``x``, or ``None`` for all rows (n == M).
        residual_grad: optional (n, H) gradient reaching ``x`` by another path (a pre-norm block's
            residual stream), added to dx in the compute dtype before dx is rounded once.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check that ``index`` lies in range (costs a device sync on CUDA).

    Returns:
        ``(dx, dweight)``: dx (n, H) in ``x.dtype``; dweight (H,) summed over the n rows, in
        fp32 (fp64 when any input is fp64).
    """
    args = check_norm_args(grad, x, weight, eps, index, validate=validate)
    if residual_grad is not None:
        check_tensor("residual_grad", residual_grad, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
        check_same_shape("residual_grad", residual_grad, "grad", grad)
    dtypes = (grad.dtype, x.dtype, weight.dtype) + (() if residual_grad is None else (residual_grad.dtype,))
    args = (*args, residual_grad)
    return resolve_backend("rms_norm_backward", backend, x.device, dtypes, args)(*args)


@register("rms_norm_backward", "torch")
def _rms_norm_backward_torch(grad, x, weight, eps, index, residual_grad=None):
    ct = compute_dtype(grad, x, weight)
    rows = x if index is None else x.index_select(0, index)  # (n, H)
    xhat, rstd = rms_normalize(rows.to(ct), eps)  # (n, H), (n, 1)
    g = grad.to(ct)
    dweight = (g * xhat.to(x.dtype).to(ct)).sum(0)  # (H,)
    dxhat = g * weight.to(ct)
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    if residual_grad is not None:
        dx = dx + residual_grad.to(ct)
    return dx.to(x.dtype), dweight
