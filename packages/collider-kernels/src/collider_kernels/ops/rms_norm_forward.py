"""RMSNorm forward (Llama/Qwen convention: normalise in fp32, cast to x's dtype, then scale)."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_norm_params
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import compute_dtype


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)`` row by row, ``x32 = x.float()``.

    Rounded as the op-by-op torch computation of Llama/Qwen (Hugging Face ``LlamaRMSNorm``): the
    normalised row is computed in fp32 (fp64 for fp64 ``x``), cast to ``x.dtype``, then multiplied
    by ``weight`` in the promoted dtype. The Triton kernel reads each row once and equals the torch
    backend up to the order of the row's sum of squares.

    Args:
        x: (M, H) rows to normalise (any row stride).
        weight: (H,) scale.
        eps: added to the mean square.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        y (M, H) in ``promote_types(x.dtype, weight.dtype)`` (fp32 for bf16 ``x`` and an fp32
        ``weight``, as torch computes it).
    """
    eps = check_norm_params(x, weight, eps)
    fn = resolve_backend("rms_norm_forward", backend, x.device, (x.dtype, weight.dtype), (x, weight, eps))
    return fn(x, weight, eps)


def rms_normalize(x32: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x32 * rstd, rstd)`` with ``rstd = rsqrt(mean(x32²) + eps)`` over the last dim ((..., 1))."""
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (M, 1)
    return x32 * rstd, rstd


@register("rms_norm_forward", "torch")
def _rms_norm_forward_torch(x, weight, eps):
    xhat, _ = rms_normalize(x.to(compute_dtype(x)), eps)  # (M, H) fp32 (fp64)
    return weight * xhat.to(x.dtype)
