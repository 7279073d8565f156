"""Linear layer whose backward shrinks to the kept token rows of a sparse gradient."""

from __future__ import annotations

import torch
from torch import nn

from collider_autograd._autocast import autocast_off, cast_for_matmul
from collider_autograd.layers._rows import grad_rows, input_grad, layer_grad
from collider_kernels import gathered_weight_grad

# (x2d, version, index, rows) of the last gather, or None. A plain global: concurrent backward
# passes can only evict each other's entry, since a hit needs the same tensors.
_last_gather = None


def _kept_rows(x2d: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x2d[index]``, reusing the previous gather when the same input and index come again:
    the q/k/v (and gate/up) projections share their input, and their backwards run one after
    another, so one gather serves all of them. The slot holds ``x2d`` itself, so its memory
    cannot be reused while cached, its version counter catches in-place changes, and the slot
    is emptied when the backward pass ends."""
    global _last_gather
    slot = _last_gather
    if slot is not None:
        x_prev, version, index_prev, rows = slot
        same_x = x_prev.data_ptr() == x2d.data_ptr() and x_prev.shape == x2d.shape
        same_x = same_x and x_prev.stride() == x2d.stride() and x_prev.dtype == x2d.dtype
        if same_x and index_prev is index and version == x2d._version:
            return rows
    rows = x2d.index_select(0, index)  # (n, in)
    _last_gather = (x2d, x2d._version, index, rows)
    torch.autograd.Variable._execution_engine.queue_callback(_release)  # runs when backward ends
    return rows


def _release() -> None:
    global _last_gather
    _last_gather = None


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
    dw = gathered_weight_grad(g, x2d if index is None else _kept_rows(x2d, index), None) if need_w else None
    db = g.sum(0) if need_b else None
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
