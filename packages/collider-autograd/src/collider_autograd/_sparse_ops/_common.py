"""Shared pieces of the sparse rules: the registry, and moving kept rows between token grids.

A token grid is the token part of a logical shape; a flat token position is its row-major index.
Ops that move tokens are written once, as plain torch ops on a grid of positions
(:func:`positions`): ``gather`` when each output token reads one input token (slicing,
indexing, transposes, expands), ``scatter`` when each input token lands on one output token
(the backwards of slicing and indexing, reductions over token dims).
"""

from __future__ import annotations

import math

import torch

from collider_autograd.sparse_grad import TokenSparseTensor

RULES: dict = {}
aten = torch.ops.aten


def rule(*ops):
    """Register the decorated function as the sparse rule of ``ops``."""

    def register(fn):
        for op in ops:
            RULES[op] = fn
        return fn

    return register


def is_sparse(t) -> bool:
    return isinstance(t, TokenSparseTensor)


def wrap_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def make(values: torch.Tensor, index: torch.Tensor, token_shape, terms) -> torch.Tensor:
    """A TokenSparseTensor. Once no token dim is left, a 0-dim result is an ordinary tensor (the
    gradient of a scalar: an exact value), and any other takes its feature dims as token dims,
    every entry kept when the single row is (they may be token positions of a model)."""
    token_shape = tuple(token_shape)
    if token_shape:
        return TokenSparseTensor(values, index, token_shape, terms)
    features = tuple(values.shape[1:])
    if not features:
        return values[0] if values.shape[0] else values.new_zeros(())
    n = math.prod(features) if values.shape[0] else 0
    return TokenSparseTensor(values[:1].reshape(n), torch.arange(n, device=index.device), features, terms)


def positions(token_shape, device) -> torch.Tensor:
    """``token_shape`` int64 grid of flat token positions."""
    return torch.arange(math.prod(token_shape), device=device).view(tuple(token_shape))


def gather(src: TokenSparseTensor, source_of: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
    """Output token ``r`` (a grid of ``source_of``'s shape) takes the row of input token
    ``source_of[r]`` (-1: none); rows whose input token is not kept are zero. ``features``
    replaces ``src.values`` (same rows, other feature layout)."""
    values = src.values if features is None else features
    lookup = torch.full((src.num_tokens + 1,), -1, dtype=torch.int64, device=src.index.device)  # last: none
    lookup[src.index] = torch.arange(src.index.numel(), device=src.index.device)
    rows = lookup[source_of.reshape(-1)]  # (out tokens,) row of values, or -1 (source -1 reads the last slot)
    out_index = (rows >= 0).nonzero().squeeze(1)  # (n',) sorted
    return make(values.index_select(0, rows.index_select(0, out_index)), out_index, source_of.shape, src.terms)


def scatter(src: TokenSparseTensor, dest: torch.Tensor, token_shape, values: torch.Tensor | None = None):
    """Input token ``s`` lands on output token ``dest[s]`` (``dest`` has ``src``'s token shape) of a
    grid of ``token_shape``; rows landing on the same token are summed."""
    target = dest.reshape(-1).index_select(0, src.index)  # (n,)
    return coalesce(target, src.values if values is None else values, token_shape, src.terms)


def coalesce(index: torch.Tensor, values: torch.Tensor, token_shape, terms) -> torch.Tensor:
    """Rows at unsorted, possibly repeated flat ``index`` → sorted unique rows (repeats summed)."""
    uniq, inverse = torch.unique(index, sorted=True, return_inverse=True)
    out = values.new_zeros((uniq.numel(),) + tuple(values.shape[1:]))
    out.index_add_(0, inverse, values)
    return make(out, uniq, token_shape, terms)


def same_index(a: TokenSparseTensor, b: TokenSparseTensor) -> bool:
    if a.index is b.index:
        return True
    return a.index.shape == b.index.shape and bool(torch.equal(a.index, b.index))


def rows_of(other, s: TokenSparseTensor):
    """The rows of ``other`` (a number or a tensor that broadcasts to ``s.shape``) at the kept
    tokens of ``s``: ``(n, *features)``, or ``other`` itself when it is a number or 0-dim."""
    if not isinstance(other, torch.Tensor) or other.dim() == 0:
        return other
    if torch.broadcast_shapes(other.shape, s.shape) != s.shape:
        return NotImplemented
    full = other.expand(s.shape)  # a view: only the kept rows are read
    return full[torch.unravel_index(s.index, s.token_shape)]  # (n, *features)


def split_dims(s: TokenSparseTensor, dims) -> tuple[list[int], list[int]]:
    """``dims`` of the logical shape → (token dims, feature dims as dims of ``values``)."""
    nt = len(s.token_shape)
    dims = [wrap_dim(d, s.dim()) for d in dims]
    return [d for d in dims if d < nt], [d - nt + 1 for d in dims if d >= nt]


def as_rows(s: TokenSparseTensor, token_ndim: int):
    """``s`` with only its first ``token_ndim`` dims as token dims: later token dims become
    feature dims (a row is kept when any of its entries was). ``NotImplemented`` when no token
    dim would be left."""
    nt = len(s.token_shape)
    if token_ndim >= nt:
        return s
    if token_ndim < 1:
        return NotImplemented
    inner_shape = s.token_shape[token_ndim:]
    inner = math.prod(inner_shape)
    rows, cols = s.index // inner, s.index % inner
    uniq, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    values = s.values.new_zeros((uniq.numel(), inner) + s.feature_shape)
    values[inverse, cols] = s.values
    values = values.view((uniq.numel(),) + tuple(inner_shape) + s.feature_shape)
    return TokenSparseTensor(values, uniq, s.token_shape[:token_ndim], s.terms)


def as_tokens(s: TokenSparseTensor, token_ndim: int) -> TokenSparseTensor:
    """``s`` with its first ``token_ndim`` dims as token dims: leading feature dims become token
    dims (every entry of a kept row is kept)."""
    k = token_ndim - len(s.token_shape)
    if k <= 0:
        return s
    inner_shape = s.feature_shape[:k]
    inner = math.prod(inner_shape)
    index = (s.index[:, None] * inner + torch.arange(inner, device=s.index.device)).reshape(-1)
    values = s.values.reshape((index.numel(),) + s.feature_shape[k:])
    return TokenSparseTensor(values, index, s.token_shape + inner_shape, s.terms)


def token_rows(other: torch.Tensor, s: TokenSparseTensor) -> torch.Tensor:
    """The rows of ``other``, whose leading dims are ``s``'s token dims, at ``s``'s kept tokens."""
    return other[torch.unravel_index(s.index, s.token_shape)]
