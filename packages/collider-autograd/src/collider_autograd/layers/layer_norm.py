"""LayerNorm with weight and bias (Phi), with a kept-rows backward."""

from __future__ import annotations

import torch
from torch import nn

from collider_autograd.sparse_grad import TokenSparseTensor
from collider_kernels import layer_norm_backward


class LayerNormFunction(torch.autograd.Function):
    """(*tokens, H) → (*tokens, H) normalised over the last dim, then ``* weight + bias``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dim = x.shape[-1]
        x2d = x.reshape(-1, dim)  # (M, dim)
        sparse = isinstance(grad, TokenSparseTensor)
        if sparse:
            g = grad.values.reshape(-1, dim)  # (n, dim) kept rows
            dx, dw, db = layer_norm_backward(g, x2d, weight, ctx.eps, grad.index, validate=False)
        else:
            dx, dw, db = layer_norm_backward(grad.reshape(-1, dim), x2d, weight, ctx.eps)
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = db.to(weight.dtype) if ctx.needs_input_grad[2] else None
        if not ctx.needs_input_grad[0]:
            dx = None
        else:
            dx = grad.rows_like(dx, x.shape) if sparse else dx.view(x.shape)
        return dx, dw, db, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Functional form of :class:`LayerNorm`."""
    return LayerNormFunction.apply(x, weight, bias, eps)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with parameters ``weight`` and ``bias`` (HF names)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LayerNormFunction.apply(x, self.weight, self.bias, self.eps)
