"""Sparse rules of ops that move, select or combine token rows.

Views regroup the token dims among themselves (or the feature dims among themselves) and keep
the flat index. Slicing, indexing, transposes, flips and expands of the token dims read rows
(``gather``); their backwards and reductions over token dims write rows (``scatter``). Each
keeps exactly the rows the dense op would make nonzero, so the kept set follows the tokens the
loss reads through these ops. Feature dims are handled on ``values`` directly.
"""

from __future__ import annotations

import math

import torch

from collider_autograd._sparse_ops._common import (
    aten,
    coalesce,
    gather,
    is_sparse,
    make,
    positions,
    rule,
    scatter,
    split_dims,
    wrap_dim,
)
from collider_autograd.densify import terms_meet
from collider_autograd.sparse_grad import TokenSparseTensor

# ---------------------------------------------------------------------------------------- views


@rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten._reshape_alias.default)
def view(a, size, *_strides):
    """Reshape token dims and/or feature dims (flat token index unchanged); a view mixing them makes
    every dim a token dim first."""
    size = list(size)
    if -1 in size:
        i = size.index(-1)
        rest = math.prod(s for j, s in enumerate(size) if j != i)
        size[i] = a.numel() // rest if rest else 0
    if not a.feature_shape:  # a per-token tensor (losses, weights): every dim is a token dim
        return make(a.values.reshape(-1), a.index, size, a.terms) if math.prod(size) == a.num_tokens else NotImplemented
    if math.prod(size) != a.numel():
        return NotImplemented
    nt = len(a.token_shape)
    if tuple(size[:nt]) == a.token_shape and math.prod(size[nt:]) == math.prod(a.feature_shape):
        return a.with_values(a.values.reshape((-1,) + tuple(size[nt:])))
    prod = 1
    for k, s in enumerate(size, start=1):
        prod *= s
        if prod == a.num_tokens:
            features = tuple(size[k:])
            if math.prod(features) == math.prod(a.feature_shape):
                return TokenSparseTensor(a.values.reshape((-1,) + features), a.index, size[:k], a.terms)
        if prod > a.num_tokens:
            break
    return view(a.regroup(a.dim()), size)  # mixes token and feature dims: every dim a token dim


@rule(aten.unsqueeze.default)
def unsqueeze(a, dim):
    """A new size-1 dim: a token dim when it lands among (or right after) the token dims."""
    dim = wrap_dim(dim, a.dim() + 1)
    nt = len(a.token_shape)
    if dim <= nt:
        return TokenSparseTensor(a.values, a.index, a.token_shape[:dim] + (1,) + a.token_shape[dim:], a.terms)
    return a.with_values(a.values.unsqueeze(dim - nt + 1))


@rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def squeeze(a, dim=None):
    dims = range(a.dim()) if dim is None else ([dim] if isinstance(dim, int) else dim)
    dims = [d for d in (wrap_dim(d, a.dim()) for d in dims) if a.shape[d] == 1]
    token_dims, feature_dims = split_dims(a, dims)
    values = a.values.squeeze(feature_dims) if feature_dims else a.values
    token_shape = [s for d, s in enumerate(a.token_shape) if d not in token_dims]
    return make(values, a.index, token_shape, a.terms)


# ------------------------------------------------------------------------ reading rows (gather)


def _token_or_feature(a, dim, on_tokens, on_values):
    dim = wrap_dim(dim, a.dim())
    nt = len(a.token_shape)
    if dim < nt:
        return gather(a, on_tokens(positions(a.token_shape, a.device), dim))
    return a.with_values(on_values(a.values, dim - nt + 1))


@rule(aten.slice.Tensor)
def slice_(a, dim=0, start=None, end=None, step=1):
    def cut(t, d):
        return aten.slice.Tensor(t, d, start, end, step)

    return _token_or_feature(a, dim, cut, cut)


@rule(aten.select.int)
def select(a, dim, index):
    return _token_or_feature(a, dim, lambda p, d: p.select(d, index), lambda v, d: v.select(d, index))


@rule(aten.flip.default)
def flip(a, dims):
    token_dims, feature_dims = split_dims(a, dims)
    values = a.values.flip(feature_dims) if feature_dims else a.values
    if not token_dims:
        return a.with_values(values)
    return gather(a, positions(a.token_shape, a.device).flip(token_dims), values)


@rule(aten.roll.default)
def roll(a, shifts, dims=()):
    if not dims:
        return NotImplemented  # a roll of the flattened tensor mixes token and feature dims
    token_dims, feature_dims = split_dims(a, dims)
    dims = [wrap_dim(d, a.dim()) for d in dims]
    shifts_t = [s for s, d in zip(shifts, dims, strict=True) if d < len(a.token_shape)]
    shifts_f = [s for s, d in zip(shifts, dims, strict=True) if d >= len(a.token_shape)]
    values = a.values.roll(shifts_f, feature_dims) if feature_dims else a.values
    if not token_dims:
        return a.with_values(values)
    return gather(a, positions(a.token_shape, a.device).roll(shifts_t, token_dims), values)


@rule(aten.constant_pad_nd.default)
def constant_pad_nd(a, pad, value=0):
    """Zero padding (or cropping, with negative pads) of the last dims; the backward of ``F.pad``."""
    if value != 0:
        return NotImplemented
    nf = len(a.feature_shape)
    pad_f, pad_t = list(pad[: 2 * nf]), list(pad[2 * nf :])  # pairs from the last dim backward
    values = aten.constant_pad_nd.default(a.values, pad_f, 0) if any(pad_f) else a.values
    if not any(pad_t):
        return a.with_values(values)
    return gather(a, aten.constant_pad_nd.default(positions(a.token_shape, a.device), pad_t, -1), values)


@rule(aten.index.Tensor)
def index(a, indices):
    """Advanced indexing of the leading (token) dims, with integer or bool index tensors."""
    if len(indices) > len(a.token_shape) or any(is_sparse(i) for i in indices if i is not None):
        return NotImplemented
    return gather(a, aten.index.Tensor(positions(a.token_shape, a.device), indices))


@rule(aten.permute.default)
def permute(a, dims):
    nt = len(a.token_shape)
    dims = [wrap_dim(d, a.dim()) for d in dims]
    if sorted(dims[:nt]) != list(range(nt)):  # mixes token and feature dims: those become token dims
        moved = max(i for i, d in enumerate(dims) if d != i) + 1
        return permute(a.regroup(moved), dims)
    values = a.values.permute([0] + [d - nt + 1 for d in dims[nt:]])
    if dims[:nt] == list(range(nt)):
        return a.with_values(values)
    return gather(a, positions(a.token_shape, a.device).permute(dims[:nt]), values)


@rule(aten.transpose.int)
def transpose(a, dim0, dim1):
    dims = list(range(a.dim()))
    d0, d1 = wrap_dim(dim0, a.dim()), wrap_dim(dim1, a.dim())
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return permute(a, dims)


@rule(aten.t.default)
def t(a):
    return transpose(a, 0, 1) if a.dim() == 2 else a


@rule(aten.expand.default)
def expand(a, size, implicit=False):
    """Broadcast: new leading dims and size-1 dims expanded; token rows are repeated."""
    size = list(size)
    nf = len(a.feature_shape)
    new = len(size) - a.dim()
    size = [s if s != -1 else a.shape[i - new] for i, s in enumerate(size)]
    token_size, feature_size = size[: len(size) - nf], size[len(size) - nf :]
    values = a.values.expand([a.values.shape[0], *feature_size]).contiguous()
    grid = positions(a.token_shape, a.device).view([1] * new + list(a.token_shape))
    if tuple(token_size) == a.token_shape:
        return a.with_values(values)
    return gather(a, grid.expand(token_size), values)


# ----------------------------------------------------------------------- writing rows (scatter)


def _zero_dense(t) -> bool:
    """A dense tensor that holds only zeros (autograd fills missing gradients with them)."""
    return isinstance(t, torch.Tensor) and not is_sparse(t) and not bool(t.any())


@rule(aten.slice_backward.default)
def slice_backward(grad, input_sizes, dim, start, end, step):
    nt = len(grad.token_shape)
    dim = wrap_dim(dim, len(input_sizes))
    if dim >= nt:
        sizes = [grad.index.numel(), *input_sizes[nt:]]
        return grad.with_values(aten.slice_backward.default(grad.values, sizes, dim - nt + 1, start, end, step))
    token_shape = tuple(input_sizes[:nt])
    dest = aten.slice.Tensor(positions(token_shape, grad.device), dim, start, end, step)
    return scatter(grad, dest, token_shape)


@rule(aten.select_backward.default)
def select_backward(grad, input_sizes, dim, index):
    nt = len(grad.token_shape)
    dim = wrap_dim(dim, len(input_sizes))
    if dim > nt or (dim == nt and grad.feature_shape):  # the selected dim was a feature dim
        sizes = [grad.index.numel(), *input_sizes[nt:]]
        return grad.with_values(aten.select_backward.default(grad.values, sizes, dim - nt + 1, index))
    token_shape = tuple(input_sizes[: nt + 1])
    dest = positions(token_shape, grad.device).select(dim, index)
    return scatter(grad, dest, token_shape)


@rule(aten.new_zeros.default)
def new_zeros(a, size, *, dtype=None, layout=None, device=None, pin_memory=None):
    """An empty (all-zero) sparse tensor, e.g. the start of an index backward."""
    nf = len(a.feature_shape)
    size = tuple(size)
    if layout not in (None, torch.strided) or (nf and size[len(size) - nf :] != a.feature_shape):
        return NotImplemented
    device = a.device if device is None else device
    values = torch.zeros((0,) + size[len(size) - nf :], dtype=dtype or a.dtype, device=device)
    return make(values, torch.zeros(0, dtype=torch.int64, device=device), size[: len(size) - nf], a.terms)


@rule(aten.zeros_like.default)
def zeros_like(a, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return new_zeros(a, a.shape, dtype=dtype, layout=layout, device=device)


def _as_sparse_base(base, like: TokenSparseTensor):
    """``base`` as a sparse tensor when it is one, or a dense all-zero tensor (else ``None``)."""
    if is_sparse(base):
        return base
    if not _zero_dense(base):
        return None
    nf = len(like.feature_shape)
    if tuple(base.shape[base.dim() - nf :]) != like.feature_shape:
        return None
    return new_zeros(like, base.shape, dtype=base.dtype)


@rule(aten.index_put.default)
def index_put(self, indices, values, accumulate=False):
    """The backward of advanced indexing: rows scattered into a zero tensor (repeats summed)."""
    if not is_sparse(values) or any(is_sparse(i) for i in indices if i is not None):
        return NotImplemented
    base = _as_sparse_base(self, values)
    if base is None or len(indices) > len(base.token_shape) or base.feature_shape != values.feature_shape:
        return NotImplemented
    dest = aten.index.Tensor(positions(base.token_shape, base.device), indices)
    if tuple(dest.shape) != values.token_shape:
        return NotImplemented  # broadcast values
    target = dest.reshape(-1).index_select(0, values.index)
    if not accumulate and (base.index.numel() or torch.unique(target).numel() != target.numel()):
        return NotImplemented  # overwriting semantics
    scattered = coalesce(target, values.values.to(base.dtype), base.token_shape, values.terms)
    return _union(base, scattered, aten.index_put.default, (self, indices, values, accumulate))


def _scatter_into(self, src, dest, func, args):
    """``self`` (zero) with the rows of ``src`` written at ``dest`` (``src``'s token grid → flat
    positions of ``self``'s), repeats summed."""
    base = _as_sparse_base(self, src)
    if base is None or base.feature_shape != src.feature_shape or tuple(dest.shape) != src.token_shape:
        return NotImplemented
    return _union(base, scatter(src, dest, base.token_shape, src.values.to(base.dtype)), func, args)


@rule(aten.index_add.default)
def index_add(self, dim, index, source, *, alpha=1):
    """The backward of ``index_select``: rows added at ``index`` along a token dim."""
    if not is_sparse(source) or is_sparse(index) or alpha != 1:
        return NotImplemented
    dim = wrap_dim(dim, source.dim())
    if dim >= len(source.token_shape):
        return NotImplemented
    dest = positions(self.shape[: len(source.token_shape)], source.device).index_select(dim, index)
    return _scatter_into(self, source, dest, aten.index_add.default, (self, dim, index, source))


@rule(aten.scatter_add.default)
def scatter_add(self, dim, index, src):
    """The backward of ``gather``: rows added at ``index`` along a token dim."""
    if not is_sparse(src) or is_sparse(index) or src.feature_shape or index.shape != src.shape:
        return NotImplemented
    dest = positions(self.shape, src.device).gather(dim, index)
    return _scatter_into(self, src, dest, aten.scatter_add.default, (self, dim, index, src))


@rule(aten.scatter.src)
def scatter_src(self, dim, index, src):
    """The backward of ``max``/``topk``/``sort`` over a dim: rows written at distinct places."""
    if not is_sparse(src) or is_sparse(index) or src.feature_shape or index.shape != src.shape:
        return NotImplemented
    dest = positions(self.shape, src.device).gather(dim, index)
    kept = dest.reshape(-1).index_select(0, src.index)
    if torch.unique(kept).numel() != kept.numel():
        return NotImplemented  # several rows written to one place: the last one wins
    return _scatter_into(self, src, dest, aten.scatter.src, (self, dim, index, src))


@rule(aten.masked_scatter.default)
def masked_scatter(self, mask, source):
    """The backward of ``masked_select``: the 1-D rows written where ``mask`` is true, in order."""
    if not is_sparse(source) or is_sparse(mask) or source.feature_shape or source.dim() != 1:
        return NotImplemented
    base = _as_sparse_base(self, source)
    if base is None or base.feature_shape:
        return NotImplemented
    dest = positions(base.token_shape, base.device)[mask.expand(base.shape)]  # (k,) positions in order
    if dest.numel() != source.num_tokens:
        return NotImplemented
    scattered = scatter(source, dest, base.token_shape, source.values.to(base.dtype))
    return _union(base, scattered, aten.masked_scatter.default, (self, mask, source))


def _union(base, scattered, func, args):
    """``base`` (all zero or sparse) plus rows written elsewhere by the same gradient."""
    if not base.index.numel():
        return scattered
    from collider_autograd._sparse_ops.accumulate import add_grads

    return add_grads(base, scattered, func=func, args=args)


@rule(aten.cat.default)
def cat(tensors, dim=0):
    """Concatenation of gradients (the backward of split/chunk): along a token dim the parts'
    rows are placed side by side; missing parts are dense zeros."""
    parts = [t for t in tensors if not (isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == 0)]
    ref = next(t for t in parts if is_sparse(t))
    dim = wrap_dim(dim, ref.dim())
    nt = len(ref.token_shape)
    if dim >= nt:
        return NotImplemented
    for t in parts:
        if is_sparse(t):
            if t.feature_shape != ref.feature_shape or len(t.token_shape) != nt:
                return NotImplemented
        elif not _zero_dense(t) or t.dim() != ref.dim():
            return NotImplemented
    token_shape = list(ref.token_shape)
    token_shape[dim] = sum(t.shape[dim] for t in parts)
    grid = positions(token_shape, ref.device)
    terms, indices, values, offset = None, [], [], 0
    for t in parts:
        if is_sparse(t) and t.index.numel():
            if terms is not None and t.terms != terms:
                return terms_meet(aten.cat.default, (tensors, dim), {}, dense=False)
            terms = t.terms
            indices.append(grid.narrow(dim, offset, t.shape[dim]).reshape(-1).index_select(0, t.index))
            values.append(t.values.to(ref.dtype))
        offset += t.shape[dim]
    if not indices:
        return new_zeros(ref, token_shape + list(ref.feature_shape))
    return coalesce(torch.cat(indices), torch.cat(values), token_shape, terms)


@rule(aten.stack.default)
def stack(tensors, dim=0):
    dim = wrap_dim(dim, tensors[0].dim() + 1)
    return cat([unsqueeze(t, dim) if is_sparse(t) else t.unsqueeze(dim) for t in tensors], dim)


# ---------------------------------------------------------------------------------- reductions


@rule(aten.sum.dim_IntList)
def sum_dims(a, dim=None, keepdim=False, *, dtype=None):
    """Sum over token dims: rows of the same remaining token are summed; over all of them, an
    ordinary tensor (no token dim left). Over feature dims: on the rows."""
    dims = range(a.dim()) if not dim else dim
    token_dims, feature_dims = split_dims(a, dims)
    values = a.values.sum(feature_dims, keepdim=keepdim) if feature_dims else a.values
    values = values if dtype is None else values.to(dtype)
    if not token_dims:
        return a.with_values(values)
    nt = len(a.token_shape)
    if len(token_dims) == nt:  # nothing per token remains
        total = values.sum(0)
        return total.view((1,) * nt + tuple(total.shape)) if keepdim else total
    kept_shape = [1 if d in token_dims else s for d, s in enumerate(a.token_shape)]
    dest = positions(kept_shape, a.device).expand(a.token_shape)
    out_shape = kept_shape if keepdim else [s for d, s in enumerate(a.token_shape) if d not in token_dims]
    return scatter(a, dest, out_shape, values)


@rule(aten.sum.default)
def sum_all(a, *, dtype=None):
    return a.values.sum(dtype=dtype)
