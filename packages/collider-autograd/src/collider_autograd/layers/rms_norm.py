"""RMSNorm (Llama/Qwen convention: normalise in fp32, cast, then scale by the weight)."""

from __future__ import annotations

import torch
from torch import nn

from collider_autograd._autocast import autocast_off
from collider_autograd.layers._rows import grad_rows, input_grad, layer_grad
from collider_kernels import rms_norm_backward, rms_norm_forward


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x / rms(x)).to(x.dtype)`` over the last dimension."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        dim = x.shape[-1]
        return rms_norm_forward(x.reshape(-1, dim), weight, eps).view(*x.shape[:-1], dim)  # one fused pass

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = layer_grad(grad, 1)
        dim = x.shape[-1]
        g, index = grad_rows(grad, (dim,))  # (n, dim) kept rows, or all rows
        dx, dw = rms_norm_backward(g, x.reshape(-1, dim), weight, ctx.eps, index, validate=False)
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None  # frozen weight: no gradient
        dx = input_grad(grad, dx, x.shape) if ctx.needs_input_grad[0] else None
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Functional form of :class:`RMSNorm`; the output dtype is that of ``weight * x`` (the
    ``transformers`` convention), also under autocast."""
    with autocast_off(x.device.type):
        return RMSNormFunction.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale; parameter name ``weight`` (HF convention)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
