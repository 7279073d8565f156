"""Backward of the rotary position embedding (rotate-half convention) for kept rows."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_index, check_tensor
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import FLOAT_DTYPES


def rotary_backward(
    grad: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Gradient of ``y = x * cos + rotate_half(x) * sin`` on the first ``R`` dims of each head.

    ``rotate_half(x) = cat(-x[R/2:R], x[:R/2])``; dims ``R..D`` pass through. For row ``r`` at
    position ``p = positions[r]``, with ``h = R/2``:
    ``dx[d] = g[d] cos[p, d] + g[d+h] sin[p, d+h]`` for ``d < h``,
    ``dx[d] = g[d] cos[p, d] - g[d-h] sin[p, d-h]`` for ``h <= d < R``, ``dx[d] = g[d]`` beyond.

    Args:
        grad: (n, H, D) output gradient of n rows (kept tokens, or all B*T rows).
        cos, sin: (T, R) tables, ``R`` even and ``<= D``.
        positions: (n,) int64/int32 position of each row in ``[0, T)``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check that ``positions`` lie in range (costs a device sync on CUDA).

    Returns:
        dx (n, H, D) in ``grad.dtype``.
    """
    check_tensor("grad", grad, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("cos", cos, ndim=2, dtypes=FLOAT_DTYPES, device=grad.device)
    check_tensor("sin", sin, ndim=2, dtypes=FLOAT_DTYPES, device=grad.device)
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.shape[1] % 2 or cos.shape[1] > grad.shape[2]:
        raise ValueError(f"cos/sin width must be even and <= head dim {grad.shape[2]}, got {cos.shape[1]}")
    check_index("positions", positions, cos.shape[0], grad.device, validate=validate)
    if positions.shape[0] != grad.shape[0]:
        raise ValueError(f"positions must have one entry per row of grad ({grad.shape[0]}), got {positions.shape[0]}")
    fn = resolve_backend("rotary_backward", backend, grad.device, (grad.dtype, cos.dtype, sin.dtype))
    return fn(grad, cos, sin, positions)


@register("rotary_backward", "torch")
def _rotary_backward_torch(grad, cos, sin, positions):
    R = cos.shape[1]
    h = R // 2
    c = cos.index_select(0, positions).unsqueeze(1)  # (n, 1, R)
    s = sin.index_select(0, positions).unsqueeze(1)
    gr = grad[..., :R]
    gs = gr * s  # (n, H, R)
    out = gr * c + torch.cat([gs[..., h:], -gs[..., :h]], dim=-1)
    if R != grad.shape[2]:
        out = torch.cat([out, grad[..., R:]], dim=-1)
    return out.to(grad.dtype)
