"""Backward of the rotary position embedding (rotate-half convention) for kept rows."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_into, check_rotary_args
from collider_kernels.backends import register, resolve_backend
from collider_kernels.ops.rotary_forward import table_rows


def rotary_backward(
    grad: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of ``y = x * cos + rotate_half(x) * sin`` on the first ``R`` dims of each head.

    ``rotate_half(x) = cat(-x[R/2:R], x[:R/2])``; dims ``R..D`` pass through. For row ``r`` at
    position ``p = positions[r]``, with ``h = R/2``:
    ``dx[d] = g[d] cos[p, d] + g[d+h] sin[p, d+h]`` for ``d < h``,
    ``dx[d] = g[d] cos[p, d] - g[d-h] sin[p, d-h]`` for ``h <= d < R``, ``dx[d] = g[d]`` beyond.

    Args:
        grad: (n, H, D) output gradient of n rows (kept tokens, or all B*T rows); any
            strides (read in place when the last stride is 1).
        cos, sin: (T, R) tables, ``R`` even and ``<= D``.
        positions: (n,) int64/int32 position of each row in ``[0, T)``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check that ``positions`` lie in range (costs a device sync on CUDA).
        into: optional (n, H, D) tensor of ``grad.dtype`` with unit last stride to write dx
            into; it may be ``grad`` itself (in place).

    Returns:
        dx (n, H, D) in ``grad.dtype`` (``into`` when given).
    """
    check_rotary_args("grad", grad, cos, sin, positions, validate=validate)
    if into is not None:
        inputs = {"grad": grad, "cos": cos, "sin": sin, "positions": positions}
        check_into("into", into, tuple(grad.shape), grad.dtype, grad.device, inputs, same_as=grad)
    fn = resolve_backend("rotary_backward", backend, grad.device, (grad.dtype, cos.dtype, sin.dtype))
    return fn(grad, cos, sin, positions, into=into)


@register("rotary_backward", "torch")
def _rotary_backward_torch(grad, cos, sin, positions, into=None):
    R = cos.shape[1]
    h = R // 2
    c, s = table_rows(cos, sin, positions)  # (n, 1, R)
    gr = grad[..., :R]
    gs = gr * s  # (n, H, R)
    out = gr * c + torch.cat([gs[..., h:], -gs[..., :h]], dim=-1)
    if R != grad.shape[2]:
        out = torch.cat([out, grad[..., R:]], dim=-1)
    return out.to(grad.dtype) if into is None else into.copy_(out)
