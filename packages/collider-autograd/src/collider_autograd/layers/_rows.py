"""Row plumbing shared by the layers: an output gradient as rows, and back.

A :class:`TokenSparseTensor` that keeps some rows gives those rows and their index; a dense
gradient, or a sparse one that keeps every row (nothing is detached then), gives all rows in
order and ``None``, and the layer runs its ordinary backward and returns dense gradients.
"""

from __future__ import annotations

import math

import torch

from collider_autograd.sparse_grad import TokenSparseTensor


def layer_grad(grad: torch.Tensor, feature_ndim: int) -> torch.Tensor:
    """``grad`` split as the layer sees it: its last ``feature_ndim`` dims are features, the others
    tokens (a loss-side op may have left it split otherwise, e.g. classes as tokens)."""
    if not isinstance(grad, TokenSparseTensor) or len(grad.token_shape) == grad.dim() - feature_ndim:
        return grad
    return grad.regroup(grad.dim() - feature_ndim)


def is_partial(grad: torch.Tensor) -> bool:
    """A sparse gradient that keeps only some rows."""
    return isinstance(grad, TokenSparseTensor) and not grad.is_full


def grad_rows(grad: torch.Tensor, feature_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rows, index)``: the kept rows ``(n, *feature_shape)`` and their sorted flat token index
    for a partial :class:`TokenSparseTensor`; every row ``(M, *feature_shape)`` and ``None`` else."""
    if isinstance(grad, TokenSparseTensor):
        return grad.values.reshape((grad.index.numel(), *feature_shape)), (grad.index if not grad.is_full else None)
    tokens = math.prod(grad.shape[: grad.dim() - len(feature_shape)])
    return grad.reshape((tokens, *feature_shape)), None


def input_grad(grad: torch.Tensor, rows: torch.Tensor, shape, feature_ndim: int = 1) -> torch.Tensor:
    """``rows`` of an input's gradient shaped like the input (``shape``): kept rows of a
    :class:`TokenSparseTensor` when ``grad`` is a partial one, else a dense tensor."""
    if is_partial(grad):
        return grad.rows_like(rows, shape, feature_ndim)
    return rows.reshape(shape)


def same_rows(grads) -> bool:
    """Every given gradient (``None`` entries aside) is dense or keeps every row, or every one keeps
    the same rows: the same index tensor and terms, as the layers above a shared input produce
    them. Such gradients can be handled as one set of rows."""
    given = [g for g in grads if g is not None]
    if not any(is_partial(g) for g in given):
        return True
    return all(is_partial(g) and g.index is given[0].index and g.terms == given[0].terms for g in given)


def index_derived(index: torch.Tensor, key: tuple, make):
    """``make()``, a tensor derived from a kept-token ``index`` alone (a sequence's offsets, each
    row's position), computed once per index: every layer of a backward receives the same index
    tensor. Kept on the index tensor under ``key`` and its version counter, so an index changed in
    place is never served a stale value."""
    cache = index.__dict__.setdefault("_collider_derived", {})
    full_key = (*key, index._version)
    value = cache.get(full_key)
    if value is None:
        value = cache[full_key] = make()
    return value


def shaped_output(t: torch.Tensor, shape) -> torch.Tensor:
    """A Function's output: ``t`` (contiguous, made by the forward) as ``shape``, an ordinary
    tensor over the same memory rather than a view of ``t``, so wrappers that hook module
    outputs (FSDP2 warns about views) see what a dense layer returns."""
    return t.view(shape).detach()
