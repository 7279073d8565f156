"""Linear layer whose backward shrinks to the kept token rows of a sparse gradient."""

from __future__ import annotations

import torch
from torch import nn

from collider_autograd.sparse_grad import TokenSparseTensor
from collider_kernels import gathered_weight_grad


class LinearFunction(torch.autograd.Function):
    """``y = x @ Wᵀ + b`` over (*tokens, in) → (*tokens, out)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        x2d = x.reshape(-1, x.shape[-1])  # (M, in)
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = dw = db = None
        if isinstance(grad, TokenSparseTensor):
            g = grad.values.reshape(-1, weight.shape[0])  # (n, out)
            if need_x:
                dx = grad.with_values(g @ weight).view(x.shape)  # (n, in) rows
            if need_w:
                dw = gathered_weight_grad(g, x2d, grad.index, validate=False)  # (out, in)
        else:
            g = grad.reshape(-1, weight.shape[0])  # (M, out)
            if need_x:
                dx = (g @ weight).view(x.shape)
            if need_w:
                dw = gathered_weight_grad(g, x2d, None)
        if need_b and ctx.has_bias:
            db = g.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Functional form of :class:`Linear`."""
    return LinearFunction.apply(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` with the same parameters and a kept-rows backward for sparse gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LinearFunction.apply(x, self.weight, self.bias)
