"""The GELU MLP ``fc2(gelu_new(fc1(x)))`` (GPT-2, Phi) as one layer, with no saved activation.

Written as two :class:`~collider_autograd.Linear` layers around :func:`~collider_autograd.gelu_new`,
the MLP keeps the (tokens, intermediate) activation ``gelu_new(fc1(x))`` alive until the backward,
because the second projection's weight gradient reads it, and gathers its kept rows there. This
layer keeps only ``x`` and the first projection's output; the backward recomputes the activation
rows it needs (the kept rows of a sparse gradient, or all rows) in the same fused pass that
computes the GELU gradient (:func:`collider_kernels.gelu_new_backward` with ``with_output=True``).
The gradients are the two-layer form's (on a GPU, up to the rounding of the kernel's own tanh in
the recomputed rows); the memory saved is one (tokens, intermediate) tensor per layer.
"""

from __future__ import annotations

import torch

from collider_autograd._autocast import autocast_off, cast_for_matmul
from collider_autograd.layers._rows import bias_grad, grad_rows, input_grad, layer_grad, shaped_output
from collider_kernels import gathered_weight_grad, gelu_new_backward


class GeluMLPFunction(torch.autograd.Function):
    """x (*tokens, H) → (*tokens, H) with fc1 weight (I, H), fc2 weight (H, I), optional biases."""

    @staticmethod
    def forward(ctx, x, w1, w2, b1, b2):
        x2d = x.reshape(-1, x.shape[-1])  # (M, H)
        h = torch.nn.functional.linear(x2d, w1, b1)  # (M, I)
        act = torch.nn.functional.gelu(h, approximate="tanh")  # (M, I), freed after the forward
        y = torch.nn.functional.linear(act, w2, b2)  # (M, H)
        ctx.save_for_backward(x, w1, w2, h)
        ctx.has_bias = b1 is not None, b2 is not None
        return shaped_output(y, x.shape)

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, h = ctx.saved_tensors
        grad = layer_grad(grad, 1)
        x2d = x.reshape(-1, x.shape[-1])  # (M, H)
        need_x, need_w1, need_w2, need_b1, need_b2 = ctx.needs_input_grad
        g, index = grad_rows(grad, (w2.shape[0],))  # (n, H) kept rows, or all M rows
        grad_act = g @ w2  # (n, I)
        dh, act = gelu_new_backward(grad_act, h, index, with_output=True, validate=False)  # (n, I) each
        dx = input_grad(grad, dh @ w1, x.shape) if need_x else None
        dw1 = gathered_weight_grad(dh, x2d, index, validate=False) if need_w1 else None  # (I, H), kept rows of x
        dw2 = gathered_weight_grad(g, act, None) if need_w2 else None  # (H, I) from the recomputed rows
        has_b1, has_b2 = ctx.has_bias
        db1 = dh.sum(0) if (need_b1 and has_b1) else None
        db2 = bias_grad(g) if (need_b2 and has_b2) else None
        return dx, dw1, dw2, db1, db2


def gelu_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """``gelu_new(x @ w1ᵀ + b1) @ w2ᵀ + b2`` over ``(*tokens, H)``, with the tanh GELU.

    Args:
        x: ``(*tokens, H)`` input.
        w1: (I, H) first projection (``fc1``); ``w2``: (H, I) second projection (``fc2``).
        b1, b2: optional biases, (I,) and (H,).

    Under ``torch.autocast`` the GEMMs run in the autocast dtype, as ``torch.nn.functional.linear``.
    """
    if w2.shape != w1.shape[::-1] or x.shape[-1] != w1.shape[1]:
        raise ValueError(
            f"weights must be w1 (I, H) and w2 (H, I) for x (..., H); got w1 {tuple(w1.shape)}, "
            f"w2 {tuple(w2.shape)}, x {tuple(x.shape)}"
        )
    if b1 is not None and b1.shape != w1.shape[:1]:
        raise ValueError(f"b1 must be ({w1.shape[0]},), got {tuple(b1.shape)}")
    if b2 is not None and b2.shape != w2.shape[:1]:
        raise ValueError(f"b2 must be ({w2.shape[0]},), got {tuple(b2.shape)}")
    x, w1, w2, b1, b2 = cast_for_matmul(x, w1, w2, b1, b2)
    with autocast_off(x.device.type):
        return GeluMLPFunction.apply(x, w1, w2, b1, b2)
