"""SwiGLU forward: ``silu(gate) * up``, rounded as the two torch ops round it."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_same_shape, check_tensor
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import FLOAT_DTYPES


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``F.silu(gate) * up`` row by row.

    Rounded as torch computes it op by op: ``silu(gate)`` (in fp32) rounded to ``gate.dtype``,
    then the product rounded to the output dtype. The Triton kernel reads each input once and
    writes the output once.

    Args:
        gate: (M, I) input of the sigmoid-weighted branch (any row stride: ``gate`` and ``up`` may
            be the two column halves of one fused (M, 2I) projection).
        up: (M, I) input of the linear branch.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        y (M, I) in ``promote_types(gate.dtype, up.dtype)``.
    """
    check_tensor("gate", gate, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("up", up, ndim=2, dtypes=FLOAT_DTYPES, device=gate.device)
    check_same_shape("up", up, "gate", gate)
    fn = resolve_backend("swiglu_forward", backend, gate.device, (gate.dtype, up.dtype))
    return fn(gate, up)


@register("swiglu_forward", "torch")
def _swiglu_forward_torch(gate, up):
    return torch.nn.functional.silu(gate) * up  # (M, I)
