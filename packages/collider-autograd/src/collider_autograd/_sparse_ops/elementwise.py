"""Sparse rules of elementwise ops that are zero wherever the sparse operand is zero.

The dense operand (a per-token weight, a condition, the saved input of an activation) is read
only at the kept rows. Rows that are not kept stay exact zeros, the true derivative there,
where a dense computation could make NaN of ``0 * inf`` or ``0 / 0``.
"""

from __future__ import annotations

import torch

from collider_autograd._sparse_ops import tokens
from collider_autograd._sparse_ops._common import (
    as_rows,
    aten,
    is_sparse,
    rows_of,
    rule,
    same_index,
    token_rows,
    wrap_dim,
)
from collider_autograd.sparse_grad import TokenSparseTensor


def _zero_scalar(x) -> bool:
    if isinstance(x, torch.Tensor):
        return not is_sparse(x) and x.dim() == 0 and bool(x == 0)
    return x == 0


def _grow(s, other):
    """``s`` broadcast to the shape of ``s`` op ``other`` when ``other`` is larger (a per-row
    gradient times a per-token tensor, as in the backward of a max or a logsumexp over
    positions: each entry of a kept row is then kept); ``NotImplemented`` if they do not broadcast."""
    if not isinstance(other, torch.Tensor) or other.dim() == 0:
        return s
    try:
        shape = torch.broadcast_shapes(s.shape, other.shape)
    except RuntimeError:
        return NotImplemented
    return s if shape == s.shape else tokens.expand(s, shape)


def _dense_rows(other, s):
    """Rows of ``other`` at ``s``'s kept tokens, or ``NotImplemented`` (sparse or not broadcastable)."""
    if is_sparse(other):
        return NotImplemented
    try:
        return rows_of(other, s)
    except RuntimeError:  # does not broadcast to s
        return NotImplemented


def _both(a, b, values) -> TokenSparseTensor:
    """The result of an op on two sparse tensors with the same rows: both tensors' terms."""
    return TokenSparseTensor(values, a.index, a.token_shape, a.terms | b.terms)


@rule(aten.mul.Tensor)
def mul(a, b):
    """Product with a per-token tensor, a 0-dim tensor or a number (the gradient of
    ``loss * weight``, and of the weight); two sparse operands with the same rows."""
    if is_sparse(a) and is_sparse(b):
        if a.shape != b.shape or not same_index(a, b):
            return NotImplemented
        return _both(a, b, a.values * b.values)
    s, other = (a, b) if is_sparse(a) else (b, a)
    s = _grow(s, other)
    rows = NotImplemented if s is NotImplemented else _dense_rows(other, s)
    return NotImplemented if rows is NotImplemented else s.with_values(s.values * rows)


@rule(aten.mul.Scalar)
def mul_scalar(a, other):
    return a.with_values(a.values * other)


@rule(aten.div.Tensor)
def div(a, b):
    """Division of the sparse tensor by a per-token tensor, a 0-dim tensor or a number."""
    if not is_sparse(a):
        return NotImplemented  # x / sparse is not zero where the sparse tensor is
    a = _grow(a, b)
    rows = NotImplemented if a is NotImplemented else _dense_rows(b, a)
    return NotImplemented if rows is NotImplemented else a.with_values(a.values / rows)


@rule(aten.div.Scalar)
def div_scalar(a, other):
    return a.with_values(a.values / other)


@rule(aten.neg.default)
def neg(a):
    return a.with_values(-a.values)


@rule(aten.where.self)
def where(condition, a, b):
    """``where(c, sparse, 0)`` and ``where(c, 0, sparse)`` (the backwards of ``where`` and
    ``clamp``), and ``where`` of two sparse tensors with the same rows."""
    if is_sparse(condition):
        return NotImplemented
    if is_sparse(a) and is_sparse(b):
        if a.shape != b.shape or not same_index(a, b):
            return NotImplemented
        c = _dense_rows(condition, a)
        if c is NotImplemented:
            return NotImplemented
        return _both(a, b, torch.where(c, a.values, b.values))
    s, other, sparse_if_true = (a, b, True) if is_sparse(a) else (b, a, False)
    if not _zero_scalar(other):
        return NotImplemented
    s = _grow(s, condition)
    c = NotImplemented if s is NotImplemented else _dense_rows(condition, s)
    if c is NotImplemented:
        return NotImplemented
    return s.with_values(s.values.masked_fill(~c if sparse_if_true else c, 0))


@rule(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(a, mask, value):
    """``masked_fill(sparse, mask, 0)`` (the backward of ``masked_fill``)."""
    if not is_sparse(a) or not _zero_scalar(value):
        return NotImplemented
    m = _dense_rows(mask, a)
    return NotImplemented if m is NotImplemented else a.with_values(a.values.masked_fill(m, 0))


def _activation_backward(op):
    """``op(grad, saved, *args)`` is elementwise and zero where ``grad`` is zero."""

    def apply(grad, saved, *args, **kwargs):
        if not is_sparse(grad) or is_sparse(saved) or saved.shape != grad.shape:
            return NotImplemented
        return grad.with_values(op(grad.values, rows_of(saved, grad), *args, **kwargs))

    return apply


for _op in (
    aten.sigmoid_backward.default,
    aten.tanh_backward.default,
    aten.threshold_backward.default,
    aten.gelu_backward.default,
    aten.silu_backward.default,
    aten.softplus_backward.default,
    aten.hardtanh_backward.default,
    aten.leaky_relu_backward.default,
):
    rule(_op)(_activation_backward(_op))


def _softmax_backward(op):
    """(Log-)softmax backward over a trailing dim (the classes of a cross-entropy), computed per
    row of the leading dims: a row is kept whole when any entry is (each entry reads all of
    them). Over the leading dim nothing is per row: no rule."""

    def apply(grad, output, dim, input_dtype):
        if not is_sparse(grad) or is_sparse(output) or output.shape != grad.shape:
            return NotImplemented
        dim = wrap_dim(dim, grad.dim())
        rows = as_rows(grad, dim)  # the dims from `dim` on become feature dims
        if rows is NotImplemented:
            return NotImplemented
        feature_dim = dim - len(rows.token_shape) + 1
        out = rows.with_values(op(rows.values, token_rows(output, rows), feature_dim, input_dtype))
        return out.regroup(len(grad.token_shape))  # back to the token dims it came with

    return apply


for _op in (aten._log_softmax_backward_data.default, aten._softmax_backward_data.default):
    rule(_op)(_softmax_backward(_op))


@rule(aten.nll_loss_backward.default)
def nll_loss_backward(grad, self, target, weight, reduction, ignore_index, total_weight):
    """Per-token NLL (``reduction="none"``): the rows of the kept tokens."""
    if not is_sparse(grad) or grad.feature_shape or grad.dim() != 1 or reduction != 0 or is_sparse(self):
        return NotImplemented
    values = aten.nll_loss_backward.default(
        grad.values, token_rows(self, grad), token_rows(target, grad), weight, reduction, ignore_index, total_weight
    )  # (n, C)
    return grad.with_values(values)


@rule(aten._to_copy.default)
def to_copy(a, *, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None):
    if layout not in (None, torch.strided):
        return NotImplemented
    index = a.index if device is None else a.index.to(device)
    return TokenSparseTensor(a.values.to(dtype=dtype, device=device), index, a.token_shape, a.terms)


@rule(aten.detach.default, aten.alias.default)
def alias(a, *args, **kwargs):
    return a.with_values(a.values)


@rule(aten.clone.default)
def clone(a, *, memory_format=None):
    return a.with_values(a.values.clone())


@rule(aten.linalg_vector_norm.default)
def vector_norm(a, ord=2, dim=None, keepdim=False, *, dtype=None):
    """A norm over the whole tensor (``ord > 0``: zero rows add nothing), an ordinary 0-dim tensor."""
    if dim is not None or not ord > 0:
        return NotImplemented
    values = a.values if a.values.numel() else a.values.new_zeros(1)
    norm = torch.linalg.vector_norm(values, ord, dtype=dtype)
    return norm.view((1,) * a.dim()) if keepdim else norm
