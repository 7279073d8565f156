"""The sparse rules of :class:`~collider_autograd.TokenSparseTensor`: one handler per aten op.

* :mod:`.tokens`: ops on the token dims — views, slicing, indexing, transposes, expands,
  concatenation, reductions, and the backwards of slicing and indexing (scatters);
* :mod:`.elementwise`: products with per-token tensors, division by them, ``where`` and
  ``masked_fill`` with zero, negation, casts, the activation backwards;
* :mod:`.accumulate`: sums of gradients (where ``filtered_mean`` terms meet), copies into a
  leaf's dense ``.grad``, in-place ops.

An op without a rule, or a rule that declines (returns ``NotImplemented``), goes to
:func:`collider_autograd.densify.no_rule`: an error, or dense under ``allow_densify()``.
"""

from __future__ import annotations

from collider_autograd._sparse_ops import accumulate, elementwise, tokens  # noqa: F401  (register the rules)
from collider_autograd._sparse_ops._common import RULES
from collider_autograd.densify import inplace_error, no_rule


def _writes_sparse(func, args, kwargs) -> bool:
    from collider_autograd.sparse_grad import TokenSparseTensor

    schema = func._schema
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if isinstance(value, TokenSparseTensor):
            return True
    return False


def dispatch(func, args, kwargs):
    """Apply the sparse rule of ``func``; without one, an error (or dense, when allowed)."""
    handler = RULES.get(func)
    if handler is not None:
        result = handler(*args, **kwargs)
        if result is not NotImplemented:
            return result
    if _writes_sparse(func, args, kwargs):
        raise inplace_error(func)
    return no_rule(func, args, kwargs)
