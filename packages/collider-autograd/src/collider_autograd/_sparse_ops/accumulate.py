"""Sparse rules where gradients are summed or stored: autograd's sums of the gradients of
branches and loss terms, the copy into a leaf's ``.grad``, and in-place ops.

Summing is exact when both gradients come from the same ``filtered_mean`` terms (the kept rows
are then the union: those the term reads, along both branches), or when their kept rows are the
same (every term detaches the same keys and values). A term whose gradient keeps every row
detaches nothing and sums with a dense gradient as a dense one. Any other sum — a sparse term
and a dense term, or two terms with different kept sets — has no single sparse backward:
:func:`collider_autograd.densify.terms_meet` raises (or densifies, when allowed).
"""

from __future__ import annotations

import torch

from collider_autograd._sparse_ops import elementwise, tokens
from collider_autograd._sparse_ops._common import aten, coalesce, is_sparse, rows_of, rule, same_index
from collider_autograd.densify import inplace_error, terms_meet
from collider_autograd.sparse_grad import TokenSparseTensor


def _cast(a: TokenSparseTensor, dtype) -> TokenSparseTensor:
    return a if a.dtype == dtype else TokenSparseTensor(a.values.to(dtype), a.index, a.token_shape, a.terms)


def add_grads(a, b, alpha=1, *, func=aten.add.Tensor, args=None):
    """``a + alpha * b`` with at least one of them sparse; ``func``/``args`` name the op in errors."""
    args = (a, b) if args is None else args
    if a.shape != b.shape:
        return NotImplemented
    dtype = torch.promote_types(a.dtype, b.dtype)
    if is_sparse(b) and alpha != 1:
        b = b.with_values(b.values * alpha)
    elif alpha != 1:
        b = b * alpha
    if not (is_sparse(a) and is_sparse(b)):
        s, d = (a, b) if is_sparse(a) else (b, a)
        if not s.index.numel():
            return d.to(dtype, copy=True)
        if not s.is_full:
            return terms_meet(func, args, {}, dense=True)
        return d.to(dtype) + s.values.reshape(s.shape)  # every row kept: the dense tensor itself
    if not b.index.numel():
        return _cast(a, dtype)
    if not a.index.numel():
        return _cast(b, dtype)
    if a.token_shape != b.token_shape:  # the same shape, split differently into tokens and features
        nt = max(len(a.token_shape), len(b.token_shape))
        a, b = a.regroup(nt), b.regroup(nt)
    same = same_index(a, b)
    if a.terms != b.terms and not same:
        return terms_meet(func, args, {}, dense=False)
    terms = a.terms | b.terms
    if same:
        return TokenSparseTensor(a.values.to(dtype) + b.values.to(dtype), a.index, a.token_shape, terms)
    # One term's gradient along two branches: the union of the rows.
    index = torch.cat([a.index, b.index])
    return coalesce(index, torch.cat([a.values.to(dtype), b.values.to(dtype)]), a.token_shape, terms)


@rule(aten.add.Tensor)
def add(a, b, *, alpha=1):
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return NotImplemented
    return add_grads(a, b, alpha, args=(a, b))


@rule(aten.sub.Tensor)
def sub(a, b, *, alpha=1):
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return NotImplemented
    return add_grads(a, b, -alpha, func=aten.sub.Tensor, args=(a, b))


# ------------------------------------------------------------------ storing into a leaf's .grad


def _in_accumulate_grad() -> bool:
    """Running inside a leaf's AccumulateGrad, or outside any backward (user code): places where
    a dense copy is the destination, not a gradient that flows on through the model."""
    node = torch._C._current_autograd_node()
    return node is None or type(node).__name__ == "AccumulateGrad"


@rule(aten.new_empty_strided.default)
def new_empty_strided(a, size, stride, *, dtype=None, layout=None, device=None, pin_memory=None):
    """The dense buffer AccumulateGrad allocates for a leaf's first ``.grad``."""
    if not _in_accumulate_grad() or layout not in (None, torch.strided):
        return NotImplemented
    return torch.empty_strided(size, stride, dtype=dtype or a.dtype, device=device or a.device)


@rule(aten.copy_.default)
def copy_(self, src, non_blocking=False):
    if is_sparse(self):
        if not is_sparse(src) or src.shape != self.shape:
            return NotImplemented
        self.values, self.index, self.terms = src.values.to(self.dtype, copy=True), src.index, src.terms
        self.token_shape = src.token_shape
        return self
    if not _in_accumulate_grad():
        return NotImplemented
    return self.copy_(src.to_dense(), non_blocking)


@rule(aten.add_.Tensor)
def add_(self, other, *, alpha=1):
    """``dense.add_(sparse)`` (a leaf's ``.grad += new gradient``) adds the kept rows in place;
    ``sparse.add_(sparse)`` updates the sparse tensor."""
    if not isinstance(other, torch.Tensor) or self.shape != other.shape:
        return NotImplemented
    if not is_sparse(self):
        if not _in_accumulate_grad():
            return NotImplemented
        rows = (other.values * alpha).to(self.dtype)
        if self.is_contiguous():
            self.view((other.num_tokens,) + other.feature_shape).index_add_(0, other.index, rows)
        else:
            self.add_(other.to_dense(), alpha=alpha)
        return self
    if not is_sparse(other):
        raise inplace_error(aten.add_.Tensor)
    result = add_grads(self, other, alpha, func=aten.add_.Tensor, args=(self, other))
    if not is_sparse(result):
        raise inplace_error(aten.add_.Tensor)
    self.values, self.index, self.terms = result.values.to(self.dtype), result.index, result.terms
    return self


@rule(aten.zero_.default)
def zero_(self):
    self.values, self.index = self.values[:0], self.index[:0]
    return self


def _scale_(op):
    def apply(self, other):
        if not is_sparse(self) or is_sparse(other):
            return NotImplemented
        try:
            rows = rows_of(other, self)
        except RuntimeError:
            return NotImplemented
        if rows is NotImplemented:
            return NotImplemented
        self.values = op(self.values, rows).to(self.dtype)
        return self

    return apply


rule(aten.mul_.Tensor, aten.mul_.Scalar)(_scale_(torch.mul))
rule(aten.div_.Tensor, aten.div_.Scalar)(_scale_(torch.div))


def _in_place(out_of_place):
    """The in-place form of a rule whose result is again sparse, of ``self``'s shape and dtype:
    ``self`` takes the result's rows (e.g. ``masked_fill_`` in the backward of ``minimum``,
    ``index_add_`` in that of ``index_select``)."""

    def apply(self, *args, **kwargs):
        if not is_sparse(self):
            return NotImplemented
        result = out_of_place(self, *args, **kwargs)
        if not is_sparse(result) or result.shape != self.shape:
            return NotImplemented
        self.values, self.index, self.terms = result.values.to(self.dtype), result.index, result.terms
        return self

    return apply


rule(aten.masked_fill_.Scalar, aten.masked_fill_.Tensor)(_in_place(elementwise.masked_fill))
rule(aten.index_add_.default)(_in_place(tokens.index_add))
rule(aten.scatter_add_.default)(_in_place(tokens.scatter_add))
rule(aten.index_put_.default)(_in_place(tokens.index_put))
