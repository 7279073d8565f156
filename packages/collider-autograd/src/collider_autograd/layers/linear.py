"""Linear layer whose backward shrinks to the kept token rows of a sparse gradient."""

from __future__ import annotations

import torch
from torch import nn

from collider_autograd._autocast import autocast_off, cast_for_matmul
from collider_autograd.layers._rows import bias_grad, grad_rows, input_grad, kept_rows, layer_grad
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
        need_x, need_w, need_b = ctx.needs_input_grad
        return linear_grads(layer_grad(grad, 1), x, weight, need_x, need_w, need_b and ctx.has_bias)


def linear_grads(grad, x, weight, need_x: bool, need_w: bool, need_b: bool):
    """``(dx, dweight, dbias)`` of ``y = x @ Wᵀ + b`` for the output gradient ``grad`` (dense, or
    sparse: kept rows only); ``None`` where not needed (a frozen weight costs no GEMM)."""
    x2d = x.reshape(-1, x.shape[-1])  # (M, in)
    g, index = grad_rows(grad, (weight.shape[0],))  # (n, out) kept rows, or all M rows
    dx = input_grad(grad, g @ weight, x.shape) if need_x else None  # (n, in) rows
    dw = gathered_weight_grad(g, x2d if index is None else kept_rows(x2d, index), None) if need_w else None
    db = bias_grad(g) if need_b else None
    return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Functional form of :class:`Linear`; under ``torch.autocast`` it computes in the autocast
    dtype, like ``torch.nn.functional.linear``."""
    x, weight, bias = cast_for_matmul(x, weight, bias)
    with autocast_off(x.device.type):
        return LinearFunction.apply(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` with the same parameters and a kept-rows backward for sparse gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
