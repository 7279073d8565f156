"""RMSNorm backward over the kept rows (Llama/Qwen convention: normalise in fp32, cast, then scale)."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_norm_args
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import compute_dtype
from collider_kernels.ops.rms_norm_forward import rms_normalize


def rms_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    index: torch.Tensor | None = None,
    *,
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
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check that ``index`` lies in range (costs a device sync on CUDA).

    Returns:
        ``(dx, dweight)``: dx (n, H) in ``x.dtype``; dweight (H,) summed over the n rows, in
        fp32 (fp64 when any input is fp64).
    """
    args = check_norm_args(grad, x, weight, eps, index, validate=validate)
    return resolve_backend("rms_norm_backward", backend, x.device, (grad.dtype, x.dtype, weight.dtype), args)(*args)


@register("rms_norm_backward", "torch")
def _rms_norm_backward_torch(grad, x, weight, eps, index):
    ct = compute_dtype(grad, x, weight)
    rows = x if index is None else x.index_select(0, index)  # (n, H)
    xhat, rstd = rms_normalize(rows.to(ct), eps)  # (n, H), (n, 1)
    g = grad.to(ct)
    dweight = (g * xhat.to(x.dtype).to(ct)).sum(0)  # (H,)
    dxhat = g * weight.to(ct)
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), dweight
