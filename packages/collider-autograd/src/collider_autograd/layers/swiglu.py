"""SwiGLU activation ``silu(gate) * up``, row-wise, with a kept-rows backward."""

from __future__ import annotations

import torch

from collider_autograd._autocast import autocast_off
from collider_autograd.layers._rows import grad_rows, input_grad, layer_grad
from collider_kernels import swiglu_backward, swiglu_forward


class SwiGLUFunction(torch.autograd.Function):
    """(*tokens, I), (*tokens, I) → (*tokens, I)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        width = gate.shape[-1]
        return swiglu_forward(gate.reshape(-1, width), up.reshape(-1, width)).view(gate.shape)  # one fused pass

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad = layer_grad(grad, 1)
        width = gate.shape[-1]
        common = torch.promote_types(gate.dtype, up.dtype)
        gate2d = gate.reshape(-1, width).to(common)  # (M, I)
        up2d = up.reshape(-1, width).to(common)
        g, index = grad_rows(grad, (width,))  # (n, I) kept rows, or all rows
        dgate, dup = swiglu_backward(g, gate2d, up2d, index, validate=False)
        return input_grad(grad, dgate.to(gate.dtype), gate.shape), input_grad(grad, dup.to(up.dtype), up.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with a sparse-aware backward."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    with autocast_off(gate.device.type):  # in the inputs' (promoted) dtype, also under autocast
        return SwiGLUFunction.apply(gate, up)
