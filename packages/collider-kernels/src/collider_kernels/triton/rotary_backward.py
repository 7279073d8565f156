"""Fused Triton rotary backward: one read of the gradient, one write of dx, fp32 arithmetic.

One program per block of rows: it loads the rows' cos/sin once (gathered by position) and loops
over the heads. Dims past the rotated width pass through.
"""

from __future__ import annotations

import triton
import triton.language as tl

from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.triton import settings
from collider_kernels.triton.launch import Launcher
from collider_kernels.tuning import INTERPRET


@Launcher
@triton.jit
def _rotary_bwd_kernel(
    grad_ptr, cos_ptr, sin_ptr, pos_ptr, dx_ptr,
    n, H, R, D,
    stride_gn, stride_gh, stride_c, stride_s, stride_dn, stride_dh,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (cdiv(n, BLOCK_R),); grad/dx (n, H, D) with unit last stride; cos/sin (T, R).
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < n
    rows = offs_r.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    half = R // 2
    partner = tl.where(d < half, d + half, d - half)  # the dim rotated into d
    sign = tl.where(d < half, 1.0, -1.0)
    pos = tl.load(pos_ptr + rows, mask=mask_r, other=0).to(tl.int64)
    m_rot = mask_r[:, None] & (d < R)[None, :]
    m_all = mask_r[:, None] & (d < D)[None, :]
    # Past the rotated width: cos = 1, sin = 0, so dx = grad there.
    c = tl.load(cos_ptr + pos[:, None] * stride_c + d[None, :], mask=m_rot, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + pos[:, None] * stride_s + partner[None, :], mask=m_rot, other=0.0).to(tl.float32)
    s = s * sign[None, :]
    g_rows = grad_ptr + rows[:, None] * stride_gn
    dx_rows = dx_ptr + rows[:, None] * stride_dn
    for h in range(H):
        g = tl.load(g_rows + h * stride_gh + d[None, :], mask=m_all, other=0.0).to(tl.float32)
        gp = tl.load(g_rows + h * stride_gh + partner[None, :], mask=m_rot, other=0.0).to(tl.float32)
        tl.store(dx_rows + h * stride_dh + d[None, :], (g * c + gp * s).to(dx_ptr.dtype.element_ty), mask=m_all)


def rotary_config(D: int) -> dict:
    """Rows per program and warps for head dim ``D``."""
    if INTERPRET:
        return {"block_r": 16, "num_warps": 4}
    return {"block_r": max(1, 4096 // triton.next_power_of_2(D)), "num_warps": 4}


def launch_rotary_backward(grad, cos, sin, positions, cfg: dict | None = None):
    """Run the kernel; ``cfg`` overrides :func:`rotary_config` (block_r, num_warps)."""
    n, H, D = grad.shape
    dx = settings.alloc_output((n, H, D), grad.dtype, grad.device)  # (n, H, D)
    if n == 0 or H == 0 or D == 0:
        return dx
    if grad.stride(2) != 1:
        grad = grad.contiguous()
    cos = cos if cos.stride(1) == 1 else cos.contiguous()
    sin = sin if sin.stride(1) == 1 else sin.contiguous()
    cfg = {**rotary_config(D), **(cfg or {})}
    _rotary_bwd_kernel[(triton.cdiv(n, cfg["block_r"]),)](
        grad, cos, sin, positions.contiguous(), dx,
        n, H, cos.shape[1], D,
        grad.stride(0), grad.stride(1), cos.stride(0), sin.stride(0), dx.stride(0), dx.stride(1),
        BLOCK_R=cfg["block_r"], BLOCK_D=triton.next_power_of_2(D), num_warps=cfg["num_warps"],
    )
    return dx


@register("rotary_backward", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES)
def rotary_backward_triton(grad, cos, sin, positions):
    """Fused rotary backward with the cos/sin rows gathered by position inside the kernel."""
    return launch_rotary_backward(grad, cos, sin, positions)
