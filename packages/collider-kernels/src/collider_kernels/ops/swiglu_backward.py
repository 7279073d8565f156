"""SwiGLU backward: the gradients of ``silu(gate) * up`` for the kept rows of ``gate`` and ``up``."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_row_grad, check_same_shape, check_tensor
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import FLOAT_DTYPES, upcast
from collider_kernels.ops.swiglu_forward import _swiglu_forward_torch


def swiglu_backward(
    grad: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    index: torch.Tensor | None = None,
    *,
    with_output: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Gradients of ``y = silu(gate) * up`` for the rows ``index`` of ``gate`` and ``up``.

    With ``s = sigmoid(gate)``: ``dgate = grad * up * s * (1 + gate * (1 - s))`` and
    ``dup = grad * gate * s``, computed in fp32 (fp64 when any input is fp64). With
    ``with_output=True`` the same pass also recomputes the forward output ``y`` of those rows,
    rounded as :func:`~collider_kernels.swiglu_forward` rounds it (a fused MLP can then drop the
    saved activation and recompute it for the down projection's weight gradient).

    Args:
        grad: (n, I) output gradient of the rows ``index``.
        gate: (M, I) forward input of the sigmoid-weighted branch.
        up: (M, I) forward input of the linear branch, same dtype as ``gate``.
        index: (n,) int64/int32 rows of ``gate``/``up``, or ``None`` for all rows (n == M).
        with_output: also return ``y`` of the rows ``index``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check that ``index`` lies in range (costs a device sync on CUDA).

    Returns:
        ``(dgate, dup)``, each (n, I) in ``gate.dtype``; ``(dgate, dup, y)`` with ``with_output``,
        y (n, I) in ``gate.dtype``.
    """
    check_tensor("gate", gate, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("up", up, ndim=2, dtypes=(gate.dtype,), device=gate.device)
    check_same_shape("up", up, "gate", gate)
    check_row_grad(grad, gate, index, validate=validate, x_name="gate")
    fn = resolve_backend("swiglu_backward", backend, gate.device, (grad.dtype, gate.dtype))
    return fn(grad, gate, up, index, bool(with_output))


@register("swiglu_backward", "torch")
def _swiglu_backward_torch(grad, gate, up, index, with_output=False):
    if index is not None:
        gate = gate.index_select(0, index)  # (n, I)
        up = up.index_select(0, index)
    g, a, b = upcast(grad), upcast(gate), upcast(up)
    sig = torch.sigmoid(a)
    silu = a * sig
    dgate = (g * b * sig * (1 + a * (1 - sig))).to(gate.dtype)  # (n, I)
    dup = (g * silu).to(gate.dtype)
    if with_output:
        return dgate, dup, _swiglu_forward_torch(gate, up)  # y (n, I)
    return dgate, dup
