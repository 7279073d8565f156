"""Fused LM head + per-token cross-entropy: hidden states → (B, T) float32 token losses.

The (B, T, V) logits are never stored: the forward computes them in row chunks and keeps
only each row's logsumexp; the backward recomputes logits for the rows it needs — the kept
rows of a sparse gradient (gathered once per chunk for both GEMMs), or all rows of a dense one.
Each chunk's logits stay in the model's dtype: one fused pass turns them into the row losses
(:func:`collider_kernels.cross_entropy_forward`), and in the backward one fused pass turns them,
in place, into the logit gradient (:func:`collider_kernels.cross_entropy_backward`).

With ``keep_logits=True`` the forward keeps the (M, V) logits in the model's dtype and the
backward reads the rows it needs from them instead of recomputing them (the kept rows where they
lie, without a gathered copy): one LM-head GEMM less (over the kept rows) for ``M * V`` elements
of memory until the backward.
"""

from __future__ import annotations

import torch

from collider_autograd._autocast import autocast_off, cast_for_matmul
from collider_autograd.layers._rows import grad_rows, input_grad, layer_grad, shaped_output
from collider_kernels import (
    check_label_values,
    cross_entropy_backward,
    cross_entropy_forward,
    gather_matmul,
    gathered_weight_grad,
)

# Rows per chunk are chosen so a chunk of logits stays near this many elements.
_CHUNK_ELEMENTS = 1 << 28


def _chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """hidden (*tokens, H), weight (V, H), bias (V,)|None, labels (*tokens,) → loss (*tokens,) fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, keep_logits):
        h2d = hidden.reshape(-1, hidden.shape[-1])  # (M, H)
        lab = labels.reshape(-1)  # (M,)
        M, V = h2d.shape[0], weight.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 models
        loss = torch.zeros(M, dtype=acc, device=hidden.device)
        lse = torch.zeros(M, dtype=acc, device=hidden.device)
        kept = hidden.new_empty((M, V), dtype=torch.result_type(hidden, weight)) if keep_logits else None
        step = _chunk_rows(V)
        for s in range(0, M, step):
            logits = torch.nn.functional.linear(h2d[s : s + step], weight, bias)  # (c, V)
            loss_c, lse_c = cross_entropy_forward(logits, lab[s : s + step], ignore_index, validate=False)
            loss[s : s + step], lse[s : s + step] = loss_c, lse_c
            if kept is not None:
                kept[s : s + step] = logits
        ctx.save_for_backward(hidden, weight, bias, labels, lse, kept)
        ctx.ignore_index = ignore_index
        return shaped_output(loss, labels.shape)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse, kept = ctx.saved_tensors
        grad = layer_grad(grad, 0)
        h2d = hidden.reshape(-1, hidden.shape[-1])  # (M, H)
        lab = labels.reshape(-1)
        V = weight.shape[0]
        g, rows = grad_rows(grad, ())  # (n,) kept rows and their index, or all M rows and None
        g = g.to(lse.dtype)
        sparse = rows is not None
        n = g.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = h2d.new_empty((n, h2d.shape[1])) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        db = torch.zeros(V, dtype=acc, device=weight.device) if (need_b and bias is not None) else None
        step = _chunk_rows(V)
        for s in range(0, n, step):
            if sparse:  # kept rows of this chunk, gathered once for both GEMMs
                idx = rows[s : s + step]
                h_c, lab_c, lse_c = h2d.index_select(0, idx), lab.index_select(0, idx), lse.index_select(0, idx)
            else:
                h_c, lab_c, lse_c = h2d[s : s + step], lab[s : s + step], lse[s : s + step]
            # The forward's logits stay intact (a second backward can read them again).
            logits, out, at = kept, None, None
            if kept is None:  # recompute this chunk's logits; the gradient is written over them
                logits = out = gather_matmul(h_c, None, weight, bias)  # (c, V) in the weight's dtype
            elif sparse:  # the kept rows, read where they lie
                at = idx
            else:
                logits = kept[s : s + step]
            dlogits = cross_entropy_backward(  # (softmax - onehot) * g, (c, V)
                logits, lse_c, lab_c, g[s : s + step], ctx.ignore_index, index=at, out=out, validate=False
            )
            if need_h:
                dh[s : s + step] = dlogits @ weight  # (c, H)
            if need_w:  # a frozen head (requires_grad=False) costs no weight-gradient GEMM
                gathered_weight_grad(dlogits, h_c, None, out=dw)
            if db is not None:
                db += dlogits.sum(0, dtype=acc)
        if need_h:
            dh = input_grad(grad, dh, hidden.shape)
        dw = dw.to(weight.dtype) if need_w else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    *,
    keep_logits: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden @ weightᵀ (+ bias)`` against ``labels``.

    Args:
        hidden: ``(*tokens, H)`` final hidden states.
        weight: (V, H) LM head weight.
        labels: ``(*tokens,)`` int64 targets aligned with positions; ``ignore_index`` → loss 0.
        bias: optional (V,) LM head bias.
        keep_logits: keep the logits from the forward for the backward instead of recomputing
            them (faster by one LM-head GEMM over the kept rows; holds ``tokens * V`` elements).
        validate: check that every label lies in ``[0, V)`` or equals ``ignore_index`` (a
            device sync on CUDA; a caller that checked its labels already passes False).

    Returns:
        ``(*tokens,)`` float32 losses (float64 for float64 inputs); the backward accepts a dense
        or a token-sparse gradient. Under ``torch.autocast`` the logits are computed in the
        autocast dtype (the losses stay fp32).
    """
    if labels.shape != hidden.shape[:-1]:
        want = tuple(hidden.shape[:-1])
        raise ValueError(f"labels must have shape {want} (hidden without its last dim), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    V = weight.shape[0]
    if validate:
        check_label_values(labels, V, ignore_index)
    hidden, weight, bias = cast_for_matmul(hidden, weight, bias)  # the LM head GEMM in the autocast dtype
    with autocast_off(hidden.device.type):
        return LinearCrossEntropyFunction.apply(hidden, weight, bias, labels, ignore_index, keep_logits)
