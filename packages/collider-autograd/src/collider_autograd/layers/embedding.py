"""Token embedding whose weight gradient is a scatter-add of kept rows only."""

from __future__ import annotations

import torch
from torch import nn

from collider_autograd._autocast import autocast_off
from collider_autograd.layers._rows import grad_rows, layer_grad
from collider_kernels import scatter_add_rows


class EmbeddingFunction(torch.autograd.Function):
    """``weight[ids]``: (*tokens,) int → (*tokens, dim)."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.num_embeddings = weight.shape[0]
        ctx.weight_dtype = weight.dtype
        return nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:  # a frozen table costs no scatter-add
            return None, None
        grad = layer_grad(grad, 1)
        flat_ids = ids.reshape(-1)
        rows, index = grad_rows(grad, (grad.shape[-1],))  # (n, dim) kept rows, or all M rows
        dest = flat_ids if index is None else flat_ids.index_select(0, index)  # (n,) token id of each row
        # Accumulate repeated ids in fp32, then return in the weight's dtype.
        acc = rows.new_zeros((ctx.num_embeddings, rows.shape[1]), dtype=torch.promote_types(rows.dtype, torch.float32))
        scatter_add_rows(rows, dest, out=acc, validate=False)
        return None, acc.to(ctx.weight_dtype)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Functional form of :class:`Embedding` (rows in the weight's dtype, also under autocast)."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be an integer tensor (int64/int32), got {ids.dtype}")
    with autocast_off(weight.device.type):
        return EmbeddingFunction.apply(ids, weight)


class Embedding(nn.Embedding):
    """``nn.Embedding`` (no padding_idx/max_norm) with a kept-rows weight gradient."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding(ids, self.weight)
