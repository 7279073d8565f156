"""GELU with the tanh approximation (``gelu_new`` of GPT-2/Phi), row-wise with a kept-rows backward."""

from __future__ import annotations

import math

import torch

from collider_autograd._autocast import autocast_off
from collider_autograd.layers._rows import grad_rows, input_grad, layer_grad
from collider_kernels import gelu_new_backward


class GeluNewFunction(torch.autograd.Function):
    """(*tokens, F) → (*tokens, F)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.gelu(x, approximate="tanh")

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad = layer_grad(grad, 1)
        x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1] if x.dim() else 1)  # (M, F)
        g, index = grad_rows(grad, (x2d.shape[1],))  # (n, F) kept rows, or all rows
        return input_grad(grad, gelu_new_backward(g, x2d, index, validate=False), x.shape)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """``0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))`` with a sparse-aware backward, in ``x``'s
    dtype (also under autocast)."""
    with autocast_off(x.device.type):
        return GeluNewFunction.apply(x)
