"""Compute-dtype helper shared by the layers."""

import torch


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or unchanged when it is already fp32/fp64 (fp64 tests stay exact)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
