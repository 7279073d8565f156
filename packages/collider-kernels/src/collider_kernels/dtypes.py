"""The dtypes the ops and their backends take, and the compute dtype of their math (shared with
the layers of ``collider_autograd``)."""

from __future__ import annotations

import torch

# Floating dtypes every op accepts (the torch backend takes them all).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Dtypes of the Triton and CuPy kernels (fp64 resolves to the torch backend).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or unchanged when already fp32/fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when any tensor is fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
