"""SwiGLU activation ``silu(gate) * up``, row-wise, with a kept-rows backward."""

from __future__ import annotations

import torch
from torch import nn

from collider_autograd._dtypes import upcast
from collider_autograd.sparse_grad import TokenSparseTensor


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
        sparse = isinstance(grad, TokenSparseTensor)
        if sparse:
            g = upcast(grad.values.reshape(-1, width))
            gate_r = upcast(gate.reshape(-1, width).index_select(0, grad.index))  # (n, I)
            up_r = upcast(up.reshape(-1, width).index_select(0, grad.index))
        else:
            g, gate_r, up_r = upcast(grad), upcast(gate), upcast(up)
        sig = torch.sigmoid(gate_r)
        silu = gate_r * sig
        dgate = (g * up_r * sig * (1 + gate_r * (1 - sig))).to(gate.dtype)
        dup = (g * silu).to(up.dtype)
        if sparse:
            return grad.with_values(dgate).view(gate.shape), grad.with_values(dup).view(up.shape)
        return dgate.view(gate.shape), dup.view(up.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with a sparse-aware backward."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    return SwiGLUFunction.apply(gate, up)
