"""Triton backward of the tanh-approximated GELU (``gelu_new``) for (optionally gathered) rows.

Elementwise over (rows, columns) tiles like the SwiGLU kernel: kept input rows read once through
``index``, fp32 arithmetic, ``tanh`` through ``exp(-2|u|)`` so that ``1 + t`` and ``1 - t²`` keep
their precision and never overflow. With ``with_output`` the same pass also writes the forward
output ``0.5 * x * (1 + t)`` of the rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.reference import GELU_COEF, SQRT_2_OVER_PI
from collider_kernels.triton import settings
from collider_kernels.triton.launch import Launcher
from collider_kernels.triton.rows import elementwise_config, elementwise_grid, row_tile, unit_cols


@Launcher
@triton.jit
def _gelu_new_bwd_kernel(
    grad_ptr, x_ptr, index_ptr, dx_ptr, y_ptr,
    n, F, c, coef,
    stride_grad, stride_x, stride_dx, stride_y,
    GATHER: tl.constexpr,  # input row r is x row index[r]
    WITH_OUTPUT: tl.constexpr,  # also write y = gelu(x) of the rows
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows, src, cols, mask = row_tile(index_ptr, n, F, GATHER, BLOCK_R, BLOCK_F)
    g = tl.load(grad_ptr + rows[:, None] * stride_grad + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + src[:, None] * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = c * (x + coef * x * x * x)
    # t = tanh(u) through s = exp(-2|u|) in (0, 1]: 1 + t and 1 - t² without cancellation or overflow.
    s = tl.exp(-2.0 * tl.abs(u))
    inv = 1.0 / (1.0 + s)
    one_plus_t = tl.where(u >= 0, 2.0 * inv, 2.0 * s * inv)
    one_minus_t2 = 4.0 * s * inv * inv
    dgelu = 0.5 * one_plus_t + 0.5 * x * one_minus_t2 * c * (1.0 + 3.0 * coef * x * x)
    tl.store(dx_ptr + rows[:, None] * stride_dx + cols, (g * dgelu).to(dx_ptr.dtype.element_ty), mask=mask)
    if WITH_OUTPUT:
        y = 0.5 * x * one_plus_t
        tl.store(y_ptr + rows[:, None] * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def launch_gelu_new_backward(grad, x, index, with_output=False, cfg: dict | None = None):
    """Run the GELU kernel: dx, or ``(dx, y)`` with ``with_output``; ``cfg`` overrides
    :func:`~collider_kernels.triton.rows.elementwise_config` (block_r, block_i, num_warps)."""
    n, F = grad.shape
    outs = [settings.alloc_output((n, F), x.dtype, x.device) for _ in range(2 if with_output else 1)]  # (n, F)
    result = tuple(outs) if with_output else outs[0]
    if n == 0 or F == 0:
        return result
    grad, x = unit_cols(grad), unit_cols(x)
    index = None if index is None else index.contiguous()
    dx, y = outs[0], outs[-1]
    cfg = {**elementwise_config(F), **(cfg or {})}
    _gelu_new_bwd_kernel[elementwise_grid(n, F, cfg)](
        grad, x, dx if index is None else index, dx, y,
        n, F, SQRT_2_OVER_PI, GELU_COEF,
        grad.stride(0), x.stride(0), dx.stride(0), y.stride(0),
        GATHER=index is not None, WITH_OUTPUT=with_output, BLOCK_R=cfg["block_r"], BLOCK_F=cfg["block_i"],
        num_warps=cfg["num_warps"],
    )
    return result


@register("gelu_new_backward", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES)
def gelu_new_backward_triton(grad, x, index, with_output=False):
    """Fused GELU (tanh) backward (and, with ``with_output``, the forward output) with the row
    gather inside the kernel."""
    return launch_gelu_new_backward(grad, x, index, with_output)
