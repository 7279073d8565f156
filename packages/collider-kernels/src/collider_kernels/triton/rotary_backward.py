"""Triton rotary backward: the shared rotary kernel (:mod:`~collider_kernels.triton.rotary`)
rotating the gradient by minus each row's angle, in fp32 with one rounding to grad's dtype."""

from __future__ import annotations

from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.triton import settings
from collider_kernels.triton.rotary import launch_rotary


def launch_rotary_backward(grad, cos, sin, positions, cfg: dict | None = None, into=None):
    """dx (n, H, D) in ``grad.dtype``, written into ``into`` when given (may be ``grad``);
    ``cfg`` overrides :func:`~collider_kernels.triton.rotary.rotary_config`."""
    return launch_rotary(grad, cos, sin, positions, grad.dtype, transpose=True, cfg=cfg, out=into)


@register("rotary_backward", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES)
def rotary_backward_triton(grad, cos, sin, positions, into=None):
    """Fused rotary backward with the cos/sin rows gathered by position inside the kernel."""
    return launch_rotary_backward(grad, cos, sin, positions, into=into)
