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


# kind → (tensor, version, index, result) of the last reusable result, or None. A plain global:
# concurrent backward passes can only evict each other's entries, since a hit needs the same tensors.
_last: dict[str, tuple] = {}


def reuse_last(kind: str, t: torch.Tensor, index: torch.Tensor | None, make) -> tuple[torch.Tensor, bool]:
    """``(make(), False)``, a value computed from ``t`` (and ``index``) alone, or ``(value, True)``
    when the same tensor and index come again right after: projections sharing an input gather its
    kept rows once, and two layers fed one output gradient (Phi's parallel attention and MLP) sum
    its rows for their biases once. The slot holds ``t`` itself, so its memory cannot be reused
    while cached, its version counter catches in-place changes, and the slots are emptied when the
    backward ends."""
    slot = _last.get(kind)
    if slot is not None:
        prev, version, index_prev, value = slot
        same = prev.data_ptr() == t.data_ptr() and prev.shape == t.shape and prev.stride() == t.stride()
        if same and prev.dtype == t.dtype and index_prev is index and version == t._version:
            return value, True
    value = make()
    _last[kind] = (t, t._version, index, value)
    torch.autograd.Variable._execution_engine.queue_callback(_last.clear)  # runs when this backward ends
    return value, False


def kept_rows(x2d: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x2d[index]`` (n, in), gathered once for the projections that share ``x2d`` (read only)."""
    return reuse_last("gather", x2d, index, lambda: x2d.index_select(0, index))[0]


def bias_grad(rows: torch.Tensor) -> torch.Tensor:
    """``rows.sum(0)``: the bias gradient of a layer whose output gradient has these (n, out) rows,
    summed once for the layers fed the same gradient; each layer gets its own tensor (a ``.grad``
    may be changed in place later)."""
    value, reused = reuse_last("row sum", rows, None, lambda: rows.sum(0))
    return value.clone() if reused else value
