"""Triton RMSNorm forward: one read of each row, one write of the output, fp32 math; optionally
the residual sum ``x + residual`` formed and written in the same pass, then normalised.

A program normalises ``block_r`` whole rows held in registers (the mean square needs all of the
row), so rows wider than :data:`~collider_kernels.triton.row_norms.MAX_NORM_WIDTH` are out of its
reach (``backend="auto"`` takes the torch backend for them). The normalised row is rounded to
x's dtype before the weight multiplies it, as the op-by-op torch computation does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.triton import settings
from collider_kernels.triton.launch import Launcher
from collider_kernels.triton.row_norms import norm_config, width_refusal
from collider_kernels.triton.rows import unit_cols


def too_wide(x, weight, eps, residual=None) -> str | None:
    """Why the kernel cannot take these arguments (rows wider than ``MAX_NORM_WIDTH``), or None."""
    return width_refusal(x.shape[1])


@Launcher
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, h_ptr,
    n, H, eps, inv_h,  # inv_h = 1/H from the host
    stride_x, stride_r, stride_y, stride_h,
    RESIDUAL: tl.constexpr,  # normalise h = x + r (rounded to x's dtype) and write h too
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # grid (cdiv(n, BLOCK_R),); x, r, h (n, H) unit column stride, y (n, H), w (H,).
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    mask_r = offs_r < n
    mask_h = cols < H
    mask = mask_r[:, None] & mask_h[None, :]
    rows = offs_r.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)  # the residual sum, rounded as torch's add rounds it
        tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    ms = tl.sum(x * x, axis=1) * inv_h  # (BLOCK_R,) mean square
    rstd = tl.math.rsqrt(tl.where(mask_r, ms + eps, 1.0))  # rows past the end stay finite when eps == 0
    xhat = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to x's dtype
    w = tl.load(w_ptr + cols, mask=mask_h, other=0.0).to(tl.float32)  # (BLOCK_H,)
    y = (w[None, :] * xhat).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y, mask=mask)


def launch_rms_norm_forward(x, weight, eps, residual=None, cfg: dict | None = None):
    """y (n, H), or ``(y, h)`` with ``residual`` (h = x + residual, normalised in y); ``cfg``
    overrides :func:`~collider_kernels.triton.row_norms.norm_config` (block_r, num_warps)."""
    n, H = x.shape
    y = settings.alloc_output((n, H), torch.promote_types(x.dtype, weight.dtype), x.device)  # (n, H)
    h = None if residual is None else settings.alloc_output((n, H), x.dtype, x.device)  # (n, H)
    if n == 0 or H == 0:
        return y if h is None else (y, h)
    x, weight = unit_cols(x), weight.contiguous()
    r = x if residual is None else unit_cols(residual)
    cfg = {**norm_config(H), **(cfg or {})}
    _rms_norm_fwd_kernel[(settings.cdiv(n, cfg["block_r"]),)](
        x, r, weight, y, y if h is None else h, n, H, eps, 1.0 / H,
        x.stride(0), r.stride(0), y.stride(0), y.stride(0) if h is None else h.stride(0),
        RESIDUAL=h is not None, BLOCK_R=cfg["block_r"], BLOCK_H=settings.next_power_of_2(H),
        num_warps=cfg["num_warps"],
    )
    return y if h is None else (y, h)


@register("rms_norm_forward", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES, check=too_wide)
def rms_norm_forward_triton(x, weight, eps, residual=None):
    """Fused RMSNorm forward: each row read once and written once (with ``residual``, the sum
    ``x + residual`` is formed, written and normalised in the same pass)."""
    return launch_rms_norm_forward(x, weight, eps, residual)
