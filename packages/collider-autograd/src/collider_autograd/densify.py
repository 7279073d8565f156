"""What happens when the sparse gradient meets an op without a sparse rule.

By default: a :class:`SparseGradientError` naming the op and the fix, because running the op on
the dense tensor would silently change the gradient. With :func:`allow_densify` active, the
tensor is made dense instead (counted by :func:`densify_counts`, warned once per op): from
that op toward the inputs the backward is the ordinary dense one, so attention layers there no
longer detach the keys and values of filtered positions — the gradient of the plain masked
mean, exactly so when the op sits between ``token_loss`` and ``filtered_mean``.
"""

from __future__ import annotations

import threading
import warnings
from collections import Counter
from contextlib import contextmanager

from torch.utils._pytree import tree_map

__all__ = ["SparseGradientError", "allow_densify", "densify_allowed", "densify_counts", "reset_densify_counts"]

_COUNTS: Counter = Counter()
_WARNED: set[str] = set()
_LOCK = threading.Lock()
_ALLOWED = 0  # nesting depth of allow_densify(); process-wide, so backward threads see it

DESIGN = "see 'Design' in the Collider docs"
_WHAT_DENSE_COMPUTES = (
    "from this op toward the inputs the backward is the ordinary dense one: attention layers there no "
    "longer detach the keys/values of filtered positions, which gives the gradient of the plain masked "
    "mean instead of Collider's (exactly that gradient when the op sits between token_loss and "
    "filtered_mean), and that part of the backward no longer shrinks with the kept share"
)


class SparseGradientError(RuntimeError):
    """A sparse gradient (:class:`~collider_autograd.TokenSparseTensor`) met an op that Collider
    cannot apply to it exactly. The message names the op and the fix."""


def densify_counts() -> dict[str, int]:
    """How many times each op densified a :class:`~collider_autograd.TokenSparseTensor` (only
    possible under :func:`allow_densify`) since the last :func:`reset_densify_counts`."""
    return dict(_COUNTS)


def reset_densify_counts() -> None:
    """Zero the densify counters (warnings already shown stay shown)."""
    _COUNTS.clear()


def densify_allowed() -> bool:
    """Whether :func:`allow_densify` is active."""
    return _ALLOWED > 0


@contextmanager
def allow_densify():
    """Opt in to densifying the sparse gradient where Collider has no exact sparse rule.

    Inside the block (process-wide, so it covers the backward's worker threads), an op without a
    sparse rule, or two gradients that cannot be summed sparsely (a dense loss term and a
    ``filtered_mean`` term, or two ``filtered_mean`` terms with different kept sets), no longer
    raise :class:`SparseGradientError`: the gradient is made dense there and the backward goes
    on densely. From that point toward the inputs the backward is the ordinary one — attention
    layers no longer detach the keys and values of filtered positions — so the result is the
    gradient of the plain masked mean (exactly, when the op sits between ``token_loss`` and
    ``filtered_mean``), not Collider's contract, and it no longer shrinks with the kept share.
    Each op warns once and is counted by :func:`densify_counts`.

    Example::

        with allow_densify():
            loss.backward()
    """
    global _ALLOWED
    with _LOCK:
        _ALLOWED += 1
    try:
        yield
    finally:
        with _LOCK:
            _ALLOWED -= 1


def op_name(func) -> str:
    """Short name of an aten op (``slice_backward``)."""
    packet = getattr(func, "overloadpacket", None)
    return str(packet.__name__ if packet is not None else func)


def no_rule(func, args, kwargs):
    """Raise, or under :func:`allow_densify` run ``func`` on dense tensors."""
    name = op_name(func)
    if not densify_allowed():
        raise SparseGradientError(
            f"collider: op '{name}' has no sparse rule for a TokenSparseTensor (the gradient of a "
            f"filtered_mean term). Running it on the dense tensor would change the gradient silently: "
            f"{_WHAT_DENSE_COMPUTES}. Fix: apply '{name}' after filtered_mean, or build the loss from ops "
            f"that have a sparse rule (slicing, indexing, transposes and reshapes of the token dims, "
            f"per-token weights, where/masked_fill, scalars; {DESIGN}); or accept the plain masked-mean "
            f"gradient with `with collider_autograd.allow_densify(): loss.backward()`. Outside a "
            f"backward pass, call .to_dense() to get an ordinary tensor."
        )
    return densify(name, func, args, kwargs)


def terms_meet(func, args, kwargs, dense: bool):
    """Two gradients that cannot be summed sparsely: raise, or densify under :func:`allow_densify`."""
    name = op_name(func)
    if not densify_allowed():
        if dense:
            what = ("the sparse gradient of a filtered_mean term meets a dense gradient (a dense loss term "
                    "on the same forward, such as 0.1 * token_loss.mean(), or a path without filtering)")
            why = "a dense term detaches nothing"
            fix = "`filtered.backward(retain_graph=True); dense_term.backward()`"
        else:
            what = "the sparse gradients of two filtered_mean terms with different kept sets meet"
            why = "the other term detaches by its own kept set"
            fix = "`term1.backward(retain_graph=True); term2.backward()`"
        raise SparseGradientError(
            f"collider: in '{name}', {what}. Each filtered_mean term detaches the keys/values of its own "
            f"filtered positions and {why}, so their sum has no single sparse backward. Fix: backpropagate "
            f"the terms one at a time, {fix} (the parameters' .grad then hold exactly the sum of each "
            f"term's gradient); or use one filtered_mean (per-token weights and one kept set); or accept "
            f"the plain gradient of the summed loss, nothing detached, with "
            f"`with collider_autograd.allow_densify(): loss.backward()`. This backward may already have "
            f"written part of the parameters' .grad and freed the graph: zero the gradients and run the "
            f"forward again before retrying."
        )
    return densify(name, func, args, kwargs)


def inplace_error(func):
    name = op_name(func)
    return SparseGradientError(
        f"collider: in-place op '{name}' has no sparse rule for a TokenSparseTensor, and running it on a "
        f"dense copy would leave the tensor unchanged. Call .to_dense() and work on the ordinary tensor."
    )


def densify(name: str, func, args, kwargs):
    """Run ``func`` with every TokenSparseTensor made dense (counted, warned once per op)."""
    from collider_autograd.sparse_grad import TokenSparseTensor

    _COUNTS[name] += 1
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"collider: op '{name}' densified a TokenSparseTensor (allowed by allow_densify()): "
            f"{_WHAT_DENSE_COMPUTES}",
            stacklevel=3,
        )

    def unwrap(t):
        return t.to_dense() if isinstance(t, TokenSparseTensor) else t

    return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
