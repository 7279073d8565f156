"""Several linear projections of one input as one GEMM (e.g. the q, k and v projections).

Written as separate :class:`~collider_autograd.Linear` layers, ``k`` projections of one input
cost ``k`` narrow GEMMs forward, and backward ``k`` input-gradient GEMMs whose outputs autograd
then sums, plus ``k`` weight-gradient GEMMs. Here the weights are concatenated at run time (the
parameters keep their own names and shapes), the forward is one GEMM whose output is split into
views, and the backward is one input-gradient GEMM and one weight-gradient GEMM over the
concatenated output gradients, on the kept rows when they are sparse. The gradients are those
of the separate layers.
"""

from __future__ import annotations

import torch
from torch import nn

from collider_autograd._autocast import autocast_off, cast_for_matmul
from collider_autograd.layers._rows import (
    bias_grad,
    grad_rows,
    input_grad,
    is_partial,
    kept_rows,
    layer_grad,
    same_rows,
)
from collider_autograd.layers.linear import linear, linear_grads
from collider_kernels import gathered_weight_grad


class MultiLinearFunction(torch.autograd.Function):
    """x (*tokens, in) and k weights (out_i, in) (+ biases) → k outputs (*tokens, out_i)."""

    @staticmethod
    def forward(ctx, x, k, *params):
        weights, biases = params[:k], params[k:]
        has_bias = biases[0] is not None
        w = torch.cat(weights)  # (N, in), N = sum out_i
        b = torch.cat(biases) if has_bias else None
        y = nn.functional.linear(x, w, b)  # (*tokens, N)
        ctx.save_for_backward(x, *weights)
        ctx.k, ctx.has_bias = k, has_bias
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not dense zeros
        return y.split([wi.shape[0] for wi in weights], dim=-1)  # views (*tokens, out_i)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        k = ctx.k
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2:2 + k], ctx.needs_input_grad[2 + k:]
        grads = [None if g is None else layer_grad(g, 1) for g in grads]
        if not same_rows(grads):  # kept rows differ between outputs: each projection on its own
            dx, dws, dbs = MultiLinearFunction._separately(ctx, x, weights, grads)
            return dx, None, *dws, *dbs
        given = [g for g in grads if g is not None]
        ref = next((g for g in given if is_partial(g)), given[0])  # the rows the input's gradient keeps
        parts = [None if g is None else grad_rows(g, (w.shape[0],)) for g, w in zip(grads, weights, strict=True)]
        index = next((p[1] for p in parts if p is not None and p[1] is not None), None)
        like = next(p[0] for p in parts if p is not None)  # (n, out_i): kept rows, or all M rows
        used = [p is not None for p in parts]  # an output without gradient gives its weight none
        rows = [p[0] if p is not None else like.new_zeros((like.shape[0], w.shape[0]))
                for p, w in zip(parts, weights, strict=True)]
        g = _one_buffer(rows)  # (n, N)
        if g is None:
            g = torch.cat(rows, dim=1)
        sizes = [w.shape[0] for w in weights]
        dx = input_grad(ref, g @ torch.cat(weights), x.shape) if need_x else None  # (n, in) rows
        dws = [None] * k
        wanted = [need and u for need, u in zip(need_w, used, strict=True)]
        if any(wanted):
            x2d = x.reshape(-1, x.shape[-1])  # (M, in)
            x_rows = x2d if index is None else kept_rows(x2d, index)  # (n, in)
            if all(wanted):  # one GEMM for every projection's weight
                dws = list(gathered_weight_grad(g, x_rows, None).split(sizes))  # (out_i, in) each
            else:  # a frozen weight (or an unused output) costs no GEMM
                dws = [gathered_weight_grad(r, x_rows, None) if w else None for r, w in zip(rows, wanted, strict=True)]
        dbs = [None] * k
        if ctx.has_bias and any(need_b):
            sums = bias_grad(g).split(sizes)
            dbs = [d if need and u else None for d, need, u in zip(sums, need_b, used, strict=True)]
        return dx, None, *dws, *dbs

    @staticmethod
    def _separately(ctx, x, weights, grads):
        """``(dx, dws, dbs)`` as k separate linear layers would give them (dx summed)."""
        k = ctx.k
        dx, dws, dbs = None, [None] * k, [None] * k
        for i, (g, w) in enumerate(zip(grads, weights, strict=True)):
            if g is None:
                continue
            part, dws[i], dbs[i] = linear_grads(g, x, w, ctx.needs_input_grad[0], ctx.needs_input_grad[2 + i],
                                                ctx.has_bias and ctx.needs_input_grad[2 + k + i])
            if part is not None:
                dx = part if dx is None else dx + part
        return dx, dws, dbs


def _one_buffer(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """The (n, N) row-major buffer whose consecutive column slices the (n, out_i) ``rows`` are
    (as the attention layer's backward writes dQ, dK, dV), without a copy; None when they are not."""
    first = rows[0]
    n, N = first.shape[0], sum(r.shape[1] for r in rows)
    if n == 0:
        return None
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for r in rows:
        if r.dtype != first.dtype or r.device != first.device or r.shape[0] != n:
            return None
        if r.untyped_storage().data_ptr() != storage or r.storage_offset() != offset:
            return None
        if (n > 1 and r.stride(0) != N) or (r.shape[1] > 1 and r.stride(1) != 1):
            return None
        offset += r.shape[1]
    return first.as_strided((n, N), (N, 1), first.storage_offset())


def multi_linear(
    x: torch.Tensor,
    weights: list[torch.Tensor] | tuple[torch.Tensor, ...],
    biases: list[torch.Tensor | None] | tuple[torch.Tensor | None, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """``(x @ w_iᵀ + b_i for each i)``: the projections of one input by several weights, as one GEMM.

    Args:
        x: ``(*tokens, in)`` input.
        weights: ``k`` weights ``(out_i, in)``.
        biases: ``None``, or ``k`` biases ``(out_i,)`` (all given or all ``None``).

    Returns:
        ``k`` outputs ``(*tokens, out_i)``, views of one ``(*tokens, sum out_i)`` tensor (a
        consumer that keeps one alive for its backward should keep a contiguous copy, so the
        others' memory can go). Under ``torch.autocast`` the GEMM runs in the autocast dtype,
        as ``torch.nn.functional.linear``. The gradients equal those of ``k`` separate
        :func:`~collider_autograd.linear` calls.
    """
    weights = tuple(weights)
    k = len(weights)
    if k == 0:
        raise ValueError("weights must hold at least one (out, in) weight")
    biases = (None,) * k if biases is None else tuple(biases)
    if len(biases) != k:
        raise ValueError(f"biases must hold one entry per weight ({k}), got {len(biases)}")
    if any(b is None for b in biases) and any(b is not None for b in biases):
        raise ValueError("biases must be all given or all None")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"weights[{i}] must be (out, {x.shape[-1]}) for x (..., {x.shape[-1]}), "
                             f"got {tuple(w.shape)}")
        if biases[i] is not None and tuple(biases[i].shape) != (w.shape[0],):
            raise ValueError(f"biases[{i}] must be ({w.shape[0]},), got {tuple(biases[i].shape)}")
    if k == 1:
        return (linear(x, weights[0], biases[0]),)
    x, *params = cast_for_matmul(x, *weights, *biases)
    with autocast_off(x.device.type):
        return MultiLinearFunction.apply(x, k, *params)
