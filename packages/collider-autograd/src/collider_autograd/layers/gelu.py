"""GELU with the tanh approximation (``gelu_new`` of GPT-2/Phi), row-wise with a kept-rows backward."""

from __future__ import annotations

import math

import torch

from collider_autograd._dtypes import upcast
from collider_autograd.sparse_grad import TokenSparseTensor

_C = math.sqrt(2.0 / math.pi)


class GeluNewFunction(torch.autograd.Function):
    """(*tokens, F) → (*tokens, F)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.gelu(x, approximate="tanh")

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        sparse = isinstance(grad, TokenSparseTensor)
        if sparse:
            width = x.shape[-1]
            xr = upcast(x.reshape(-1, width).index_select(0, grad.index))  # (n, F)
            g = upcast(grad.values.reshape(-1, width))
        else:
            xr, g = upcast(x), upcast(grad)
        t = torch.tanh(_C * (xr + 0.044715 * xr**3))
        dgelu = 0.5 * (1 + t) + 0.5 * xr * (1 - t * t) * _C * (1 + 3 * 0.044715 * xr * xr)
        dx = (g * dgelu).to(x.dtype)
        return grad.with_values(dx).view(x.shape) if sparse else dx


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """``0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))`` with a sparse-aware backward."""
    return GeluNewFunction.apply(x)
