"""RMSNorm forward (Llama/Qwen convention: normalise in fp32, cast to x's dtype, then scale)."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_norm_params, check_same_shape, check_tensor
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import compute_dtype


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)`` row by row, ``x32 = x.float()``.

    Rounded as the op-by-op torch computation of Llama/Qwen (Hugging Face ``LlamaRMSNorm``): the
    normalised row is computed in fp32 (fp64 for fp64 ``x``), cast to ``x.dtype``, then multiplied
    by ``weight`` in the promoted dtype. The Triton kernel reads each row once and equals the torch
    backend up to the order of the row's sum of squares.

    With ``residual`` the op is a pre-norm block's "add, then norm": ``h = x + residual`` (in
    ``x.dtype``, as torch's ``+`` rounds it) is normalised in place of ``x``, and returned too,
    from one pass that reads ``x`` and ``residual`` once.

    Args:
        x: (M, H) rows to normalise (any row stride).
        weight: (H,) scale.
        eps: added to the mean square.
        residual: optional (M, H) rows added to ``x`` first, ``x``'s dtype.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        y (M, H) in ``promote_types(x.dtype, weight.dtype)`` (fp32 for bf16 ``x`` and an fp32
        ``weight``, as torch computes it); ``(y, h)`` with ``residual``, h (M, H) in ``x.dtype``.
    """
    eps = check_norm_params(x, weight, eps)
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=x.device)
        check_same_shape("residual", residual, "x", x)
    fn = resolve_backend("rms_norm_forward", backend, x.device, (x.dtype, weight.dtype), (x, weight, eps, residual))
    return fn(x, weight, eps, residual)


def rms_normalize(x32: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x32 * rstd, rstd)`` with ``rstd = rsqrt(mean(x32²) + eps)`` over the last dim ((..., 1))."""
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (M, 1)
    return x32 * rstd, rstd


@register("rms_norm_forward", "torch")
def _rms_norm_forward_torch(x, weight, eps, residual=None):
    h = x if residual is None else x + residual  # (M, H) in x's dtype
    xhat, _ = rms_normalize(h.to(compute_dtype(h)), eps)  # (M, H) fp32 (fp64)
    y = weight * xhat.to(x.dtype)
    return y if residual is None else (y, h)
