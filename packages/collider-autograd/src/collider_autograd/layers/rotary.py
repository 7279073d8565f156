"""Rotary position embedding (rotate-half convention), optionally on the first ``rot_dim`` dims."""

from __future__ import annotations

import torch

from collider_autograd._autocast import autocast_off
from collider_autograd.layers._rows import grad_rows, index_derived, input_grad, layer_grad
from collider_kernels import rotary_backward, rotary_forward


def rotary_tables(
    positions: torch.Tensor, rot_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, rot_dim) for integer ``positions`` (T,), computed in fp32."""
    even = torch.arange(0, rot_dim, 2, dtype=torch.int64, device=positions.device).float()  # (rot_dim/2,)
    inv_freq = 1.0 / (theta ** (even / rot_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, rot_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, rot_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def check_tables(name: str, cos, sin, B: int, T: int, D: int) -> None:
    """``cos``/``sin`` are float tables of one dtype, (T, R) shared by the batch or (B, T, R) per
    sequence, with ``R`` even and ``<= D``, that require no gradient (the rotary layers give them
    none); ``name`` names them in the error."""
    R = cos.shape[-1] if isinstance(cos, torch.Tensor) else -1
    if not (isinstance(sin, torch.Tensor) and R >= 0 and cos.shape == sin.shape
            and cos.shape[:-1] in ((T,), (B, T)) and R % 2 == 0 and R <= D):
        got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (cos, sin)]
        raise ValueError(f"{name} must be tables of shape ({T}, R) or ({B}, {T}, R) with R even and <= {D}, "
                         f"got {got}")
    if not (cos.is_floating_point() and cos.dtype == sin.dtype) or cos.device != sin.device:
        raise TypeError(f"{name} tables must be floating point, of one dtype, on one device, got "
                        f"{cos.dtype}/{sin.dtype} on {cos.device}/{sin.device}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos and sin must not require grad: the rotary tables get no gradient here")


def flat_tables(cos: torch.Tensor, sin: torch.Tensor, B: int, T: int):
    """``(cos, sin, period)``: (P, R) tables and the period of the flat token rows' table rows.
    (T, R) tables serve row ``b * T + t`` from row ``t`` (period T); (B, T, R) tables are
    flattened to one row per token (no period)."""
    if cos.dim() == 3:
        return cos.reshape(B * T, -1), sin.reshape(B * T, -1), None
    return cos, sin, T


def table_rows(rows: torch.Tensor, period: int | None) -> torch.Tensor:
    """Table row of each flat token row ``b * T + t`` (see :func:`flat_tables`)."""
    return rows if period is None else rows % period


def kept_table_rows(index: torch.Tensor, period: int | None) -> torch.Tensor:
    """Table rows of the kept tokens ``index``, computed once per index."""
    if period is None:
        return index
    return index_derived(index, ("positions", period), lambda: index % period)


def rotate_tokens(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, period: int | None) -> torch.Tensor:
    """(B, T, H, D) rotated by (P, R) tables (:func:`flat_tables`) into a new tensor of the
    dtype of ``x * cos``."""
    B, T, H, D = x.shape
    rows = table_rows(torch.arange(B * T, device=x.device), period)
    return rotary_forward(x.reshape(B * T, H, D), cos, sin, rows, validate=False).view(B, T, H, D)


def unrotate_tokens(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, period: int | None) -> torch.Tensor:
    """The gradient of :func:`rotate_tokens` for every token: (B, T, H, D) ``g`` rotated back, in
    ``g``'s dtype."""
    B, T, H, D = g.shape
    rows = table_rows(torch.arange(B * T, device=g.device), period)
    return rotary_backward(g.reshape(B * T, H, D), cos, sin, rows, validate=False).view(B, T, H, D)


class RotaryFunction(torch.autograd.Function):
    """(B, T, H, D) with (P, R) tables and their period (:func:`flat_tables`) → (B, T, H, D)."""

    @staticmethod
    def forward(ctx, x, cos, sin, period):
        ctx.save_for_backward(cos, sin)
        ctx.period, ctx.x_dtype = period, x.dtype
        return rotate_tokens(x, cos, sin, period)

    @staticmethod
    def backward(ctx, grad):
        # The kernel op's backward of the rotation, on kept rows (sparse) or all B*T rows (dense).
        cos, sin = ctx.saved_tensors
        grad = layer_grad(grad, 2)
        g, index = grad_rows(grad, tuple(grad.shape[2:]))  # (n, H, D)
        if index is None:  # every flat row b * T + t, in order
            positions = table_rows(torch.arange(g.shape[0], device=g.device), ctx.period)
        else:
            positions = kept_table_rows(index, ctx.period)
        dx = rotary_backward(g, cos, sin, positions, validate=False)  # (n, H, D) in g's dtype
        return input_grad(grad, dx.to(ctx.x_dtype), grad.shape, 2), None, None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``R`` dims of each head of ``x`` (B, T, H, D) by tables (T, R) shared by
    the batch or (B, T, R) per sequence (positions that differ between sequences: packed
    documents, padding); the output dtype is that of ``x * cos`` (as in ``transformers``), also
    under autocast."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, T, H, D), got shape {tuple(x.shape)}")
    B, T, _, D = x.shape
    check_tables("cos and sin", cos, sin, B, T, D)
    with autocast_off(x.device.type):
        return RotaryFunction.apply(x, *flat_tables(cos, sin, B, T))
