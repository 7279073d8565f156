"""LayerNorm with weight and bias (Phi), with a kept-rows backward."""

from __future__ import annotations

import torch
from torch import nn

from collider_autograd._dtypes import upcast
from collider_autograd.sparse_grad import TokenSparseTensor


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
        sparse = isinstance(grad, TokenSparseTensor)
        if sparse:
            rows = upcast(x.reshape(-1, dim).index_select(0, grad.index))  # (n, H)
            g = upcast(grad.values.reshape(-1, dim))
        else:
            rows, g = upcast(x.reshape(-1, dim)), upcast(grad.reshape(-1, dim))
        mean = rows.mean(-1, keepdim=True)
        rstd = torch.rsqrt((rows - mean).pow(2).mean(-1, keepdim=True) + ctx.eps)
        xhat = (rows - mean) * rstd  # (n, H)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dxhat = g * upcast(weight)
            dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
            dx = dx.to(x.dtype)
            dx = grad.with_values(dx).view(x.shape) if sparse else dx.view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = (g * xhat).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            db = g.sum(0).to(weight.dtype)
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
