"""Row plumbing shared by the row-wise layers: an output gradient as rows, and back."""

from __future__ import annotations

import math

import torch

from collider_autograd.sparse_grad import TokenSparseTensor


def grad_rows(grad: torch.Tensor, feature_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rows, index)``: the kept rows ``(n, *feature_shape)`` and their sorted flat token index for
    a :class:`TokenSparseTensor`; every row ``(M, *feature_shape)`` and ``None`` for a dense gradient."""
    if isinstance(grad, TokenSparseTensor):
        return grad.values.reshape((grad.index.numel(), *feature_shape)), grad.index
    tokens = math.prod(grad.shape[: grad.dim() - len(feature_shape)])
    return grad.reshape((tokens, *feature_shape)), None


def input_grad(grad: torch.Tensor, rows: torch.Tensor, shape, feature_ndim: int = 1) -> torch.Tensor:
    """``rows`` of an input's gradient shaped like the input (``shape``): kept rows of a
    :class:`TokenSparseTensor` when ``grad`` is one, else a dense view."""
    if isinstance(grad, TokenSparseTensor):
        return grad.rows_like(rows, shape, feature_ndim)
    return rows.view(shape)
