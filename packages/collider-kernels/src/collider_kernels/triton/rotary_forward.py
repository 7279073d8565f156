"""Triton rotary forward: the shared rotary kernel (:mod:`~collider_kernels.triton.rotary`) with
each product and the sum rounded to the output dtype, as torch's op-by-op forward rounds them."""

from __future__ import annotations

import torch

from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.triton import settings
from collider_kernels.triton.rotary import launch_rotary


def launch_rotary_forward(x, cos, sin, positions, cfg: dict | None = None):
    """y (n, H, D) in ``promote_types(x.dtype, cos.dtype)``; ``cfg`` overrides
    :func:`~collider_kernels.triton.rotary.rotary_config`."""
    out_dtype = torch.promote_types(x.dtype, cos.dtype)
    return launch_rotary(x, cos, sin, positions, out_dtype, transpose=False, cfg=cfg)


@register("rotary_forward", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES)
def rotary_forward_triton(x, cos, sin, positions):
    """Fused rotary forward with the cos/sin rows gathered by position inside the kernel."""
    return launch_rotary_forward(x, cos, sin, positions)
