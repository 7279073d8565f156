"""The sparsity-carrying gradient: a tensor of logical shape (*tokens, *features) that stores
only the rows of kept tokens.

Autograd sees an ordinary tensor of the logical shape (so it accepts it as the gradient of an
activation); the data is ``values`` (n, *features) and the sorted flat token ``index`` (n,).
Every op applied to it either has an exact sparse rule (:mod:`collider_autograd._sparse_ops`:
sums of gradients, views, slicing and indexing of the token dims, per-token products, ...) or
raises :class:`~collider_autograd.SparseGradientError`, unless
:func:`~collider_autograd.allow_densify` is active (see the Design page of the docs).

The tensor reports zero strides: it has no dense layout, so when it reaches a leaf,
``AccumulateGrad`` copies it into an ordinary dense ``.grad`` (on which in-place ops such as
``clip_grad_norm_`` and ``zero_grad(set_to_none=False)`` work as usual).
"""

from __future__ import annotations

import math

import torch

from collider_autograd.densify import densify_counts, reset_densify_counts

__all__ = ["TokenSparseTensor", "densify_counts", "reset_densify_counts"]


class TokenSparseTensor(torch.Tensor):
    """A gradient that is zero outside a set of token rows.

    Args:
        values: ``(n, *features)`` rows of the kept tokens, in ``index`` order.
        index: (n,) int64 strictly increasing flat token index into ``prod(token_shape)``.
        token_shape: leading (token) dimensions of the logical shape, e.g. ``(B, T)``.
        terms: ids of the ``filtered_mean`` terms this gradient comes from; gradients of different
            terms with different kept rows cannot be summed (each term detaches the keys and
            values of its own filtered positions). Empty for tensors built by hand.
    """

    values: torch.Tensor
    index: torch.Tensor
    token_shape: tuple[int, ...]
    terms: frozenset

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, values: torch.Tensor, index: torch.Tensor, token_shape, terms=frozenset()):
        token_shape = tuple(int(s) for s in token_shape)
        if values.dim() < 1 or index.dim() != 1 or values.shape[0] != index.shape[0]:
            raise ValueError(
                f"values must be (n, *features) with one row per index entry, got values "
                f"{tuple(values.shape)} and index {tuple(index.shape)}"
            )
        shape = token_shape + tuple(values.shape[1:])
        self = torch.Tensor._make_wrapper_subclass(
            cls, shape, strides=(0,) * len(shape), dtype=values.dtype, device=values.device, requires_grad=False
        )
        self.values = values
        self.index = index
        self.token_shape = token_shape
        self.terms = frozenset(terms)
        return self

    def __init__(self, values, index, token_shape, terms=frozenset()):  # noqa: D107  (all work done in __new__)
        pass

    @property
    def num_tokens(self) -> int:
        """Number of token rows of the logical tensor (kept or not)."""
        return math.prod(self.token_shape)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The trailing (feature) dimensions of the logical shape."""
        return tuple(self.values.shape[1:])

    @property
    def is_full(self) -> bool:
        """Every token row is kept: the data is the whole dense tensor, rows in order."""
        return self.index.numel() == self.num_tokens

    def to_dense(self) -> torch.Tensor:
        """The ordinary tensor this represents (zero rows where no token is kept)."""
        if self.is_full:
            return self.values.reshape(self.shape).clone()
        dense = self.values.new_zeros((self.num_tokens,) + self.feature_shape)
        dense.index_copy_(0, self.index, self.values)
        return dense.view(self.shape)

    def rows_like(self, values: torch.Tensor, shape, feature_ndim: int = 1) -> TokenSparseTensor:
        """Same kept tokens, as a tensor of logical ``shape`` whose last ``feature_ndim`` dims are
        features; ``values`` holds its (n, ...) rows. Layers use it to shape the gradient of
        their input from the input's own shape, whatever views the incoming gradient went through."""
        token_shape = tuple(shape[: len(shape) - feature_ndim])
        if math.prod(token_shape) != self.num_tokens:
            got = math.prod(token_shape)
            raise ValueError(f"shape {tuple(shape)} has {got} tokens, this gradient has {self.num_tokens}")
        features = tuple(shape[len(token_shape):])
        values = values.reshape((self.index.numel(),) + features)
        return TokenSparseTensor(values, self.index, token_shape, self.terms)

    def regroup(self, token_ndim: int) -> TokenSparseTensor:
        """The same tensor with its first ``token_ndim`` dims as token dims: trailing token dims
        become features (a row is kept when any of its entries is), or leading feature dims
        become token dims (each entry of a kept row is kept)."""
        from collider_autograd._sparse_ops._common import as_rows, as_tokens

        if not 1 <= token_ndim <= self.dim():
            raise ValueError(f"token_ndim must be in [1, {self.dim()}], got {token_ndim}")
        if token_ndim < len(self.token_shape):
            return as_rows(self, token_ndim)
        return as_tokens(self, token_ndim)

    def with_values(self, values: torch.Tensor) -> TokenSparseTensor:
        """Same index, token shape and terms, new row values ``(n, *features')``."""
        return TokenSparseTensor(values, self.index, self.token_shape, self.terms)

    def __repr__(self) -> str:  # noqa: D105
        return (
            f"TokenSparseTensor(shape={tuple(self.shape)}, kept={self.index.numel()}/"
            f"{self.num_tokens}, dtype={self.dtype}, device={self.device})"
        )

    def __tensor_flatten__(self):
        return ["values", "index"], {"token_shape": self.token_shape, "terms": self.terms}

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return TokenSparseTensor(inner["values"], inner["index"], meta["token_shape"], meta["terms"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {})


from collider_autograd._sparse_ops import dispatch  # noqa: E402  (the rules need the class above)
