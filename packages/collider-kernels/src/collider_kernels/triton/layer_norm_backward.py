"""Triton LayerNorm backward (dx, dweight and dbias in one pass) over (optionally gathered) rows.

The kernel is the one LayerNorm shares with RMSNorm (:mod:`~collider_kernels.triton.row_norms`),
with the row mean subtracted and the dbias sums added.
"""

from __future__ import annotations

from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.triton import settings
from collider_kernels.triton.row_norms import launch_norm_backward, too_wide


def launch_layer_norm_backward(grad, x, weight, eps, index, cfg: dict | None = None):
    """LayerNorm ``(dx, dweight, dbias)``; ``cfg`` overrides :func:`~collider_kernels.triton.row_norms.norm_config`."""
    return launch_norm_backward(grad, x, weight, eps, index, cfg, center=True)


@register("layer_norm_backward", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES, check=too_wide)
def layer_norm_backward_triton(grad, x, weight, eps, index):
    """Fused LayerNorm backward (dx, dweight and dbias in one pass) with the row gather inside the kernel."""
    return launch_layer_norm_backward(grad, x, weight, eps, index)
