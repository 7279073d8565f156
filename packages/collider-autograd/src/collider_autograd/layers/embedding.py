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
        return None, _weight_grad(rows, dest, ctx.num_embeddings, ctx.weight_dtype)


def _weight_grad(rows: torch.Tensor, ids: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """(vocab, dim) gradient in ``dtype``: row ``v`` is the sum of the (n, dim) ``rows`` whose id is
    ``v``, accumulated in fp32 (or fp64) and rounded once.

    The sums are formed on n rows, not on a (vocab, dim) fp32 table: the rows are sorted by id,
    the rows of each distinct id added into one slot, and the slots copied into a zeroed table in
    the weight's dtype. With no host synchronisation the number of distinct ids stays unknown, so
    the unused slots are copied into one extra row past the vocabulary, then dropped."""
    n, dim = rows.shape
    acc_dtype = torch.promote_types(rows.dtype, torch.float32)
    out = rows.new_zeros((vocab + 1, dim), dtype=dtype)
    if n == 0:
        return out[:vocab]
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids.index_select(0, order)  # (n,)
    first = torch.ones(n, dtype=torch.bool, device=ids.device)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot = first.cumsum(0) - 1  # (n,) slot of each sorted row: one per distinct id, in id order
    sums = rows.new_zeros((n, dim), dtype=acc_dtype)
    scatter_add_rows(rows.index_select(0, order), slot, out=sums, validate=False)
    target = torch.full((n,), vocab, dtype=torch.int64, device=ids.device).scatter_(0, slot, sorted_ids.long())
    out.index_copy_(0, target, sums.to(dtype))  # distinct targets except the unused slots' extra row
    return out[:vocab]


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
