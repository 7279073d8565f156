"""Helpers shared by the layer tests: kept-row gradients, running a multi-output layer's backward,
comparing outputs and gradients (``None`` where a leaf gets none), counting reductions."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from collider_autograd import TokenSparseTensor


def kept_index(gen: torch.Generator, tokens: int, share: float) -> torch.Tensor:
    """Sorted flat token index keeping each of ``tokens`` positions with probability ``share``."""
    return (torch.rand(tokens, generator=gen) < share).nonzero().squeeze(1)


def sparse_grad(gen: torch.Generator, index: torch.Tensor, token_shape, width: int) -> TokenSparseTensor:
    """fp64 random rows ``(len(index), width)`` at ``index`` of a ``(*token_shape, width)`` gradient."""
    values = torch.randn(index.numel(), width, generator=gen, dtype=torch.float64)
    return TokenSparseTensor(values, index, tuple(token_shape))


def outputs_and_grads(outs, leaves, grads) -> list:
    """Backward of the outputs ``outs`` that get a gradient in ``grads`` (None: unused); the
    detached outputs, then each leaf's ``.grad`` (None where it got none). Clears the leaves first."""
    for t in leaves:
        t.grad = None
    used = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    return [o.detach() for o in outs] + [None if t.grad is None else t.grad.clone() for t in leaves]


def assert_all_close(got: list, want: list, tol: float = 1e-12) -> None:
    """Entry by entry equal within ``tol`` (rtol and atol), ``None`` exactly where ``want`` has it."""
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)


class CountSums(TorchDispatchMode):
    """Counts reductions (a bias gradient is one)."""

    def __init__(self):
        super().__init__()
        self.sums = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.sum.dim_IntList, torch.ops.aten.sum.default):
            self.sums += 1
        return func(*args, **(kwargs or {}))
