"""Forward of the rotary position embedding (rotate-half convention), each row at its own position."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_rotary_args
from collider_kernels.backends import register, resolve_backend


def rotary_forward(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """``y = x * cos + rotate_half(x) * sin`` on the first ``R`` dims of each head; dims ``R..D``
    pass through.

    ``rotate_half(x) = cat(-x[R/2:R], x[:R/2])``; row ``r`` uses the table row ``positions[r]``.
    Rounded as torch's op-by-op computation (Hugging Face ``apply_rotary_pos_emb``): each product
    and the sum are rounded to the output dtype, so the Triton kernel equals the torch backend.
    This is the forward of :func:`~collider_kernels.rotary_backward`.

    Args:
        x: (n, H, D) rows (tokens) of H heads; any strides (read in place when the last stride
            is 1), e.g. the query or key heads of a fused q/k/v projection viewed as (n, heads, D).
        cos, sin: (P, R) tables of the same dtype, ``R`` even and ``<= D``.
        positions: (n,) int64/int32 table row of each row of ``x``, in ``[0, P)``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check that ``positions`` lie in range (costs a device sync on CUDA).

    Returns:
        y (n, H, D), contiguous, in ``promote_types(x.dtype, cos.dtype)``.
    """
    check_rotary_args("x", x, cos, sin, positions, validate=validate)
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin must have cos's dtype {cos.dtype}, got {sin.dtype}")
    fn = resolve_backend("rotary_forward", backend, x.device, (x.dtype, cos.dtype))
    return fn(x, cos, sin, positions)


def table_rows(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin rows of each position, (n, 1, R) each (broadcast over heads)."""
    return cos.index_select(0, positions).unsqueeze(1), sin.index_select(0, positions).unsqueeze(1)


@register("rotary_forward", "torch")
def _rotary_forward_torch(x, cos, sin, positions):
    R = cos.shape[1]
    h = R // 2
    c, s = table_rows(cos, sin, positions)  # (n, 1, R)
    xr = x[..., :R]  # (n, H, R)
    y = xr * c + torch.cat([-xr[..., h:], xr[..., :h]], dim=-1) * s  # each op rounded to y's dtype
    if R == x.shape[2]:
        return y.contiguous()
    return torch.cat([y, x[..., R:].to(y.dtype)], dim=-1)  # (n, H, D)
