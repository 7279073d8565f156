"""Triton SwiGLU backward: the gradients of ``silu(gate) * up`` for (optionally gathered) rows.

Elementwise over (rows, columns) tiles: the kept rows of ``gate`` and ``up`` are read once through
``index`` (no gathered copy), ``grad`` and the outputs are compact; fp32 arithmetic, one write of
each output in its dtype. With ``with_output`` the same pass also writes the forward output of the
rows, rounded as the forward kernel rounds it. The tile is a fixed heuristic of the width (the
kernel is memory-bound).
"""

from __future__ import annotations

import triton
import triton.language as tl

from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.triton import settings
from collider_kernels.triton.launch import Launcher
from collider_kernels.triton.rows import elementwise_config, elementwise_grid, row_tile, silu_times, unit_cols


@Launcher
@triton.jit
def _swiglu_bwd_kernel(
    grad_ptr, gate_ptr, up_ptr, index_ptr, dgate_ptr, dup_ptr, y_ptr,
    n, I,
    stride_grad, stride_gate, stride_up, stride_out,
    GATHER: tl.constexpr,  # input row r is gate/up row index[r]
    WITH_OUTPUT: tl.constexpr,  # also write y = silu(gate) * up of the rows
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    rows, src, cols, mask = row_tile(index_ptr, n, I, GATHER, BLOCK_R, BLOCK_I)
    g = tl.load(grad_ptr + rows[:, None] * stride_grad + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(gate_ptr + src[:, None] * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(up_ptr + src[:, None] * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    dgate = g * b * s * (1.0 + a * (1.0 - s))
    dup = g * (a * s)
    out = rows[:, None] * stride_out + cols
    tl.store(dgate_ptr + out, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + out, dup.to(dup_ptr.dtype.element_ty), mask=mask)
    if WITH_OUTPUT:
        tl.store(y_ptr + out, silu_times(a, b, gate_ptr).to(y_ptr.dtype.element_ty), mask=mask)


def launch_swiglu_backward(grad, gate, up, index, with_output=False, cfg: dict | None = None):
    """Run the SwiGLU kernel: ``(dgate, dup)``, plus ``y`` with ``with_output``; ``cfg`` overrides
    :func:`~collider_kernels.triton.rows.elementwise_config` (block_r, block_i, num_warps)."""
    n, I = grad.shape
    outs = [settings.alloc_output((n, I), gate.dtype, gate.device) for _ in range(3 if with_output else 2)]
    if n == 0 or I == 0:
        return tuple(outs)
    dgate, dup = outs[:2]  # (n, I) each, as y
    grad, gate, up = unit_cols(grad), unit_cols(gate), unit_cols(up)
    index = None if index is None else index.contiguous()
    cfg = {**elementwise_config(I), **(cfg or {})}
    _swiglu_bwd_kernel[elementwise_grid(n, I, cfg)](
        grad, gate, up, dgate if index is None else index, dgate, dup, outs[-1],
        n, I, grad.stride(0), gate.stride(0), up.stride(0), dgate.stride(0),
        GATHER=index is not None, WITH_OUTPUT=with_output, BLOCK_R=cfg["block_r"], BLOCK_I=cfg["block_i"],
        num_warps=cfg["num_warps"],
    )
    return tuple(outs)


@register("swiglu_backward", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES)
def swiglu_backward_triton(grad, gate, up, index, with_output=False):
    """Fused SwiGLU backward (and, with ``with_output``, the forward output) with the row gather
    inside the kernel."""
    return launch_swiglu_backward(grad, gate, up, index, with_output)
