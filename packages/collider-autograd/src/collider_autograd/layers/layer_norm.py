"""LayerNorm with weight and bias (Phi), with a kept-rows backward."""

from __future__ import annotations

import torch
from torch import nn

from collider_autograd._autocast import autocast_dtype, autocast_off
from collider_autograd.layers._rows import grad_rows, input_grad, layer_grad
from collider_kernels import layer_norm_backward


class LayerNormFunction(torch.autograd.Function):
    """(*tokens, H) → (*tokens, H) normalised over the last dim, then ``* weight + bias``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype=None):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        ctx.bias_dtype = bias.dtype
        if out_dtype is not None:  # computed from the upcast input, x itself saved as it is
            x, weight, bias = x.to(out_dtype), weight.to(out_dtype), bias.to(out_dtype)
        return nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = layer_grad(grad, 1)
        dim = x.shape[-1]
        g, index = grad_rows(grad, (dim,))  # (n, dim) kept rows, or all rows
        dx, dw, db = layer_norm_backward(g, x.reshape(-1, dim), weight, ctx.eps, index, validate=False)
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None  # frozen weight/bias: no gradient
        db = db.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        dx = input_grad(grad, dx, x.shape) if ctx.needs_input_grad[0] else None
        return dx, dw, db, None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Functional form of :class:`LayerNorm`: statistics in fp32, output in ``x``'s dtype (as
    ``torch.nn.functional.layer_norm`` with a wider weight); under autocast in fp32, as autocast
    runs layer norms on CUDA."""
    out_dtype = torch.float32 if autocast_dtype(x.device.type) is not None and x.dtype != torch.float64 else None
    with autocast_off(x.device.type):
        return LayerNormFunction.apply(x, weight, bias, eps, out_dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with parameters ``weight`` and ``bias`` (HF names)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)
