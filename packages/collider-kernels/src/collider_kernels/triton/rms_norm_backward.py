"""Triton RMSNorm backward (dx and dweight in one pass) over (optionally gathered) rows.

The kernel is the one RMSNorm shares with LayerNorm (:mod:`~collider_kernels.triton.row_norms`);
dweight sees the normalised row after the forward's cast to x's dtype (the Llama/Qwen convention).
"""

from __future__ import annotations

from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.triton import settings
from collider_kernels.triton.row_norms import launch_norm_backward, too_wide


def launch_rms_norm_backward(grad, x, weight, eps, index, cfg: dict | None = None, residual_grad=None):
    """RMSNorm ``(dx, dweight)``, ``residual_grad`` added to dx; ``cfg`` overrides
    :func:`~collider_kernels.triton.row_norms.norm_config` (block_r, num_warps, programs_per_sm)."""
    return launch_norm_backward(grad, x, weight, eps, index, cfg, center=False, residual_grad=residual_grad)


@register("rms_norm_backward", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES, check=too_wide)
def rms_norm_backward_triton(grad, x, weight, eps, index, residual_grad=None):
    """Fused RMSNorm backward (dx and dweight in one pass, plus the residual branch's gradient)
    with the row gather inside the kernel."""
    return launch_rms_norm_backward(grad, x, weight, eps, index, residual_grad=residual_grad)
