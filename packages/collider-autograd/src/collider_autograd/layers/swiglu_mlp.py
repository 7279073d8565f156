"""The SwiGLU MLP ``down(silu(gate(x)) * up(x))`` as one layer: one GEMM for gate and up, and no
saved activation.

Written as three :class:`~collider_autograd.Linear` layers and :func:`~collider_autograd.swiglu`,
the MLP keeps the (tokens, intermediate) activation ``silu(gate) * up`` alive until the backward,
because the down projection's weight gradient reads it. This layer keeps only ``x`` and the
gate/up projection output; the backward recomputes the activation rows it needs (the kept rows
of a sparse gradient, or all rows) in the same fused pass that computes the SwiGLU gradient
(:func:`collider_kernels.swiglu_backward` with ``with_output=True``). The gradients are the
same as the three-layer form's; the memory saved is one (tokens, intermediate) tensor per layer.
"""

from __future__ import annotations

import torch

from collider_autograd._autocast import autocast_off, cast_for_matmul
from collider_autograd.layers._rows import bias_grad, grad_rows, input_grad, layer_grad, shaped_output
from collider_kernels import gathered_weight_grad, swiglu_backward, swiglu_forward


class SwiGLUMLPFunction(torch.autograd.Function):
    """x (*tokens, H) → (*tokens, H) with gate/up weights (I, H), down weight (H, I), optional biases."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, b_gate, b_up, b_down):
        I = w_gate.shape[0]
        x2d = x.reshape(-1, x.shape[-1])  # (M, H)
        w_gu = torch.cat([w_gate, w_up])  # (2I, H): one GEMM for both projections
        b_gu = None if b_gate is None else torch.cat([b_gate, b_up])
        gu = torch.nn.functional.linear(x2d, w_gu, b_gu)  # (M, 2I)
        act = swiglu_forward(gu[:, :I], gu[:, I:])  # (M, I)
        y = torch.nn.functional.linear(act, w_down, b_down)  # (M, H)
        ctx.save_for_backward(x, w_gate, w_up, w_down, gu)
        ctx.has_bias = b_gate is not None, b_down is not None
        return shaped_output(y, x.shape)

    @staticmethod
    def backward(ctx, grad):
        x, w_gate, w_up, w_down, gu = ctx.saved_tensors
        grad = layer_grad(grad, 1)
        I = w_gate.shape[0]
        x2d = x.reshape(-1, x.shape[-1])  # (M, H)
        need_x, need_wg, need_wu, need_wd, need_bg, need_bu, need_bd = ctx.needs_input_grad
        g, index = grad_rows(grad, (w_down.shape[0],))  # (n, H) kept rows, or all M rows
        grad_act = g @ w_down  # (n, I)
        dgate, dup, act = swiglu_backward(grad_act, gu[:, :I], gu[:, I:], index, with_output=True, validate=False)
        x_rows = None
        if need_wg or need_wu:
            x_rows = x2d if index is None else x2d.index_select(0, index)  # (n, H), shared by gate and up
        dx = input_grad(grad, torch.addmm(dgate @ w_gate, dup, w_up), x.shape) if need_x else None
        dwg = gathered_weight_grad(dgate, x_rows, None) if need_wg else None  # (I, H)
        dwu = gathered_weight_grad(dup, x_rows, None) if need_wu else None
        dwd = gathered_weight_grad(g, act, None) if need_wd else None  # (H, I) from the recomputed rows
        has_gu_bias, has_down_bias = ctx.has_bias
        dbg = dgate.sum(0) if (need_bg and has_gu_bias) else None
        dbu = dup.sum(0) if (need_bu and has_gu_bias) else None
        dbd = bias_grad(g) if (need_bd and has_down_bias) else None
        return dx, dwg, dwu, dwd, dbg, dbu, dbd


def swiglu_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """``down(silu(x @ w_gateᵀ + b_gate) * (x @ w_upᵀ + b_up)) + b_down`` over ``(*tokens, H)``.

    Args:
        x: ``(*tokens, H)`` input.
        w_gate, w_up: (I, H) projection weights; ``w_down``: (H, I).
        b_gate, b_up, b_down: optional biases, (I,), (I,) and (H,) (gate and up together or not at all).

    Under ``torch.autocast`` the GEMMs run in the autocast dtype, as ``torch.nn.functional.linear``.
    """
    if (b_gate is None) != (b_up is None):
        raise ValueError("b_gate and b_up must be given together (both or neither)")
    if w_gate.shape != w_up.shape or w_down.shape != w_gate.shape[::-1] or x.shape[-1] != w_gate.shape[1]:
        raise ValueError(
            f"weights must be gate/up (I, H) and down (H, I) for x (..., H); got gate {tuple(w_gate.shape)}, "
            f"up {tuple(w_up.shape)}, down {tuple(w_down.shape)}, x {tuple(x.shape)}"
        )
    x, w_gate, w_up, w_down, b_gate, b_up, b_down = cast_for_matmul(x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    with autocast_off(x.device.type):
        return SwiGLUMLPFunction.apply(x, w_gate, w_up, w_down, b_gate, b_up, b_down)
