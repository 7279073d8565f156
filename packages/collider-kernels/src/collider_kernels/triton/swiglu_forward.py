"""Triton SwiGLU forward: ``silu(gate) * up`` in one pass over (rows, columns) tiles.

Each input is read once and the output written once; fp32 math with ``silu(gate)`` rounded to
gate's dtype before the product, as torch's two ops round it (:func:`~collider_kernels.triton.rows.silu_times`).
The inputs may have any row strides (the column halves of one fused projection); the tile is a
fixed heuristic of the width (the kernel is memory-bound).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.triton import settings
from collider_kernels.triton.launch import Launcher
from collider_kernels.triton.rows import elementwise_config, elementwise_grid, row_tile, silu_times, unit_cols


@Launcher
@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr, y_ptr,
    n, I,
    stride_gate, stride_up, stride_y,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    # grid (row blocks, column blocks); gate/up/y (n, I) with unit column stride.
    rows, _, cols, mask = row_tile(gate_ptr, n, I, False, BLOCK_R, BLOCK_I)
    a = tl.load(gate_ptr + rows[:, None] * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(up_ptr + rows[:, None] * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    y = silu_times(a, b, gate_ptr)
    tl.store(y_ptr + rows[:, None] * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def launch_swiglu_forward(gate, up, cfg: dict | None = None):
    """y (n, I); ``cfg`` overrides :func:`~collider_kernels.triton.rows.elementwise_config`
    (block_r, block_i, num_warps)."""
    n, I = gate.shape
    y = settings.alloc_output((n, I), torch.promote_types(gate.dtype, up.dtype), gate.device)  # (n, I)
    if n == 0 or I == 0:
        return y
    gate, up = unit_cols(gate), unit_cols(up)
    cfg = {**elementwise_config(I), **(cfg or {})}
    _swiglu_fwd_kernel[elementwise_grid(n, I, cfg)](
        gate, up, y, n, I, gate.stride(0), up.stride(0), y.stride(0),
        BLOCK_R=cfg["block_r"], BLOCK_I=cfg["block_i"], num_warps=cfg["num_warps"],
    )
    return y


@register("swiglu_forward", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES)
def swiglu_forward_triton(gate, up):
    """Fused SwiGLU forward: each input read once, the output written once."""
    return launch_swiglu_forward(gate, up)
