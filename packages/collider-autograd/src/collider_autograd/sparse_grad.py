"""The sparsity-carrying gradient: a tensor of logical shape (*tokens, *features) that stores
only the rows of kept tokens.

Autograd sees an ordinary tensor of the logical shape (so it accepts it as the gradient of an
activation); the data is ``values`` (n, *features) and the sorted flat token ``index`` (n,).
The ops autograd applies between layers are implemented on the compact form: summing two
gradients (residual merges), views that reshape token or feature dimensions, detach/clone,
scaling by a scalar and dtype casts. Any other op densifies the tensor — correct, but it warns
once per op and is counted by :func:`densify_counts`.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import torch
from torch.utils._pytree import tree_map

__all__ = ["TokenSparseTensor", "densify_counts", "reset_densify_counts"]

_DENSIFY_COUNTS: Counter = Counter()
_WARNED: set[str] = set()
aten = torch.ops.aten


def densify_counts() -> dict[str, int]:
    """How many times each op densified a :class:`TokenSparseTensor` since the last reset."""
    return dict(_DENSIFY_COUNTS)


def reset_densify_counts() -> None:
    """Zero the densify counters (warnings already shown stay shown)."""
    _DENSIFY_COUNTS.clear()


class TokenSparseTensor(torch.Tensor):
    """A gradient that is zero outside a set of token rows.

    Args:
        values: ``(n, *features)`` rows of the kept tokens, in ``index`` order.
        index: (n,) int64 strictly increasing flat token index into ``prod(token_shape)``.
        token_shape: leading (token) dimensions of the logical shape, e.g. ``(B, T)``.
    """

    values: torch.Tensor
    index: torch.Tensor
    token_shape: tuple[int, ...]

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, values: torch.Tensor, index: torch.Tensor, token_shape):
        token_shape = tuple(int(s) for s in token_shape)
        shape = token_shape + tuple(values.shape[1:])
        self = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=values.dtype, device=values.device, requires_grad=False
        )
        self.values = values
        self.index = index
        self.token_shape = token_shape
        return self

    def __init__(self, values, index, token_shape):  # noqa: D107  (all work done in __new__)
        pass

    @property
    def num_tokens(self) -> int:
        """Number of token rows of the logical tensor (kept or not)."""
        return math.prod(self.token_shape)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[1:])

    def to_dense(self) -> torch.Tensor:
        """The ordinary tensor this represents (zero rows where no token is kept)."""
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
        return TokenSparseTensor(values.reshape((self.index.numel(),) + features), self.index, token_shape)

    def with_values(self, values: torch.Tensor) -> TokenSparseTensor:
        """Same index and token shape, new row values ``(n, *features')``."""
        return TokenSparseTensor(values, self.index, self.token_shape)

    def __repr__(self) -> str:  # noqa: D105
        return (
            f"TokenSparseTensor(shape={tuple(self.shape)}, kept={self.index.numel()}/"
            f"{self.num_tokens}, dtype={self.dtype}, device={self.device})"
        )

    def __tensor_flatten__(self):
        return ["values", "index"], {"token_shape": self.token_shape}

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return TokenSparseTensor(inner["values"], inner["index"], meta["token_shape"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            result = handler(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return _densify_and_run(func, args, kwargs)


def _densify_and_run(func, args, kwargs):
    name = str(func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else func)
    _DENSIFY_COUNTS[name] += 1
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"collider: op '{name}' has no sparse rule and densified a TokenSparseTensor "
            "(correct, but the backward no longer shrinks with the kept fraction)",
            stacklevel=3,
        )

    def unwrap(t):
        return t.to_dense() if isinstance(t, TokenSparseTensor) else t

    return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def _same_index(a: TokenSparseTensor, b: TokenSparseTensor) -> bool:
    if a.index is b.index:
        return True
    return a.index.shape == b.index.shape and bool(torch.equal(a.index, b.index))


def _add(a, b, *, alpha=1):
    if not (isinstance(a, TokenSparseTensor) and isinstance(b, TokenSparseTensor)):
        return NotImplemented
    if a.shape != b.shape or a.token_shape != b.token_shape:
        return NotImplemented
    bv = b.values if alpha == 1 else b.values * alpha
    if _same_index(a, b):
        return a.with_values(a.values + bv)
    # Union of two kept sets: scatter both into the merged rows.
    index, inverse = torch.unique(torch.cat([a.index, b.index]), sorted=True, return_inverse=True)
    values = a.values.new_zeros((index.numel(),) + a.feature_shape)
    values.index_add_(0, inverse[: a.index.numel()], a.values)
    values.index_add_(0, inverse[a.index.numel() :], bv.to(values.dtype))
    return TokenSparseTensor(values, index, a.token_shape)


def _view(a, size):
    """Reshape token dims and/or feature dims, never mixing them."""
    size = list(size)
    if -1 in size:
        i = size.index(-1)
        rest = math.prod(s for j, s in enumerate(size) if j != i)
        size[i] = a.numel() // rest if rest else 0
    ntok = a.num_tokens
    nt = len(a.token_shape)
    if tuple(size[:nt]) == a.token_shape and math.prod(size[nt:]) == math.prod(a.feature_shape):
        return TokenSparseTensor(a.values.reshape((-1,) + tuple(size[nt:])), a.index, a.token_shape)
    prod = 1
    for k, s in enumerate(size, start=1):
        prod *= s
        if prod == ntok:
            features = tuple(size[k:])
            if math.prod(features) == math.prod(a.feature_shape):
                return TokenSparseTensor(a.values.reshape((-1,) + features), a.index, size[:k])
        if prod > ntok:
            break
    return NotImplemented


def _identity(a, *args, **kwargs):
    return a.with_values(a.values)


def _clone(a, *, memory_format=None):
    return a.with_values(a.values.clone())


def _mul(a, b):
    if isinstance(a, TokenSparseTensor) and not isinstance(b, TokenSparseTensor):
        if isinstance(b, (int, float)) or (isinstance(b, torch.Tensor) and b.dim() == 0):
            return a.with_values(a.values * b)
    if isinstance(b, TokenSparseTensor) and not isinstance(a, TokenSparseTensor):
        return _mul(b, a)
    return NotImplemented


def _to_copy(a, *, dtype=None, device=None, layout=None, pin_memory=None, non_blocking=False, memory_format=None):
    if layout not in (None, torch.strided):
        return NotImplemented
    index = a.index if device is None else a.index.to(device)
    return TokenSparseTensor(a.values.to(dtype=dtype, device=device), index, a.token_shape)


def _zeros_like(a, **kwargs):
    dtype = kwargs.get("dtype") or a.dtype
    values = a.values.new_zeros((0,) + a.feature_shape, dtype=dtype)
    return TokenSparseTensor(values, a.index[:0], a.token_shape)


_HANDLERS = {
    aten.add.Tensor: _add,
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.reshape.default: _view,
    aten.detach.default: _identity,
    aten.alias.default: _identity,
    aten.clone.default: _clone,
    aten.mul.Tensor: _mul,
    aten._to_copy.default: _to_copy,
    aten.zeros_like.default: _zeros_like,
}
