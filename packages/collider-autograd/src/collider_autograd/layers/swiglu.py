"""SwiGLU activation ``silu(gate) * up``, row-wise, with a kept-rows backward."""

from __future__ import annotations

import torch
from torch import nn

from collider_autograd.sparse_grad import TokenSparseTensor
from collider_kernels import swiglu_backward


class SwiGLUFunction(torch.autograd.Function):
    """(*tokens, I), (*tokens, I) → (*tokens, I)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        width = gate.shape[-1]
        common = torch.promote_types(gate.dtype, up.dtype)
        gate2d = gate.reshape(-1, width).to(common)  # (M, I)
        up2d = up.reshape(-1, width).to(common)
        if isinstance(grad, TokenSparseTensor):
            g = grad.values.reshape(-1, width)  # (n, I) kept rows
            dgate, dup = swiglu_backward(g, gate2d, up2d, grad.index, validate=False)
            dgate, dup = dgate.to(gate.dtype), dup.to(up.dtype)
            return grad.rows_like(dgate, gate.shape), grad.rows_like(dup, up.shape)
        dgate, dup = swiglu_backward(grad.reshape(-1, width), gate2d, up2d)
        return dgate.to(gate.dtype).view(gate.shape), dup.to(up.dtype).view(up.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with a sparse-aware backward."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return SwiGLUFunction.apply(gate, up)
