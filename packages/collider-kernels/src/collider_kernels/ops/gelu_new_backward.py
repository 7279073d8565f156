"""Backward of the tanh-approximated GELU (``gelu_new`` of GPT-2/Phi) for the kept rows of its input."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_row_grad, check_tensor
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import FLOAT_DTYPES, upcast
from collider_kernels.reference import GELU_COEF, SQRT_2_OVER_PI


def gelu_new_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    index: torch.Tensor | None = None,
    *,
    with_output: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ``y = 0.5 * x * (1 + tanh(c * (x + 0.044715 * x³)))``, ``c = sqrt(2 / pi)``.

    With ``t = tanh(c * (x + 0.044715 * x³))``:
    ``dx = grad * (0.5 * (1 + t) + 0.5 * x * (1 - t²) * c * (1 + 3 * 0.044715 * x²))``,
    computed in fp32 (fp64 when ``x`` or ``grad`` is fp64). With ``with_output=True`` the same pass
    also recomputes the forward output ``y`` of those rows (a fused MLP can then drop the saved
    activation and recompute the rows its second projection's weight gradient reads). The torch
    backend computes ``y`` as ``torch.nn.functional.gelu(x, approximate="tanh")`` does, bit for
    bit; the Triton kernel in fp32 with its own tanh, rounded once to ``x.dtype``.

    Args:
        grad: (n, F) output gradient of the rows ``index``.
        x: (M, F) forward input.
        index: (n,) int64/int32 rows of ``x``, or ``None`` for all rows (n == M).
        with_output: also return ``y`` of the rows ``index``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check that ``index`` lies in range (costs a device sync on CUDA).

    Returns:
        dx (n, F) in ``x.dtype``; ``(dx, y)`` with ``with_output``, y (n, F) in ``x.dtype``.
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_row_grad(grad, x, index, validate=validate)
    fn = resolve_backend("gelu_new_backward", backend, x.device, (grad.dtype, x.dtype))
    return fn(grad, x, index, bool(with_output))


@register("gelu_new_backward", "torch")
def _gelu_new_backward_torch(grad, x, index, with_output=False):
    rows = x if index is None else x.index_select(0, index)  # (n, F)
    xr = upcast(rows)
    g = upcast(grad)
    t = torch.tanh(SQRT_2_OVER_PI * (xr + GELU_COEF * xr**3))
    dgelu = 0.5 * (1 + t) + 0.5 * xr * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * GELU_COEF * xr * xr)
    dx = (g * dgelu).to(x.dtype)
    if not with_output:
        return dx
    return dx, torch.nn.functional.gelu(rows, approximate="tanh")  # as the forward computes it
