"""RMSNorm (Llama/Qwen convention: normalise in fp32, cast, then scale by the weight)."""

from __future__ import annotations

import torch
from torch import nn

from collider_autograd._autocast import autocast_off
from collider_autograd.layers._rows import grad_rows, input_grad, layer_grad, same_rows, shaped_output
from collider_kernels import rms_norm_backward, rms_norm_forward


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x / rms(x)).to(x.dtype)`` over the last dimension."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        dim = x.shape[-1]
        return shaped_output(rms_norm_forward(x.reshape(-1, dim), weight, eps), (*x.shape[:-1], dim))  # one pass

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


class AddRMSNormFunction(torch.autograd.Function):
    """``h = x + residual`` and ``y = rms_norm(h)`` in one pass: (*tokens, H) → (y, h)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        dim = x.shape[-1]
        y, h = rms_norm_forward(x.reshape(-1, dim), weight, eps, residual=residual.reshape(-1, dim))
        h = shaped_output(h, x.shape)
        ctx.save_for_backward(h, weight)
        ctx.eps = eps
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return shaped_output(y, (*x.shape[:-1], y.shape[-1])), h

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        h, weight = ctx.saved_tensors
        dim = h.shape[-1]
        grad_y = None if grad_y is None else layer_grad(grad_y, 1)
        grad_h = None if grad_h is None else layer_grad(grad_h, 1)
        dw = None
        if grad_y is None:
            dh = grad_h  # the norm's output took no part in the loss
        elif same_rows([grad_y, grad_h]):  # the residual's gradient is added inside the norm's kernel
            g, index = grad_rows(grad_y, (dim,))  # (n, dim) kept rows, or all rows
            res = None if grad_h is None else grad_rows(grad_h, (dim,))[0]
            dx, dw = rms_norm_backward(g, h.reshape(-1, dim), weight, ctx.eps, index, residual_grad=res,
                                       validate=False)
            dh = input_grad(grad_y, dx, h.shape)
        else:  # kept rows differ: the norm's gradient, then the sum as autograd would form it
            g, index = grad_rows(grad_y, (dim,))
            dx, dw = rms_norm_backward(g, h.reshape(-1, dim), weight, ctx.eps, index, validate=False)
            dh = input_grad(grad_y, dx, h.shape) + grad_h
        dw = dw.to(weight.dtype) if dw is not None and ctx.needs_input_grad[2] else None
        return dh, dh, dw, None


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's "add, then norm" in one pass: ``(rms_norm(h, weight, eps), h)`` with
    ``h = x + residual``.

    Reads ``x`` and ``residual`` once and writes ``h`` and the normalised rows, instead of an add
    and a norm over the same rows; the backward adds the gradient that reaches ``h`` by the
    residual stream inside the norm's backward pass (over the kept rows when sparse). Values and
    gradients equal ``h = x + residual; rms_norm(h, weight, eps)`` (the gradient of ``h`` is summed
    in fp32 and rounded once).

    Args:
        x, residual: ``(*tokens, H)`` of one shape; different dtypes are promoted, as ``+`` does.
        weight: ``(H,)`` scale.
        eps: added to the mean square.
    """
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    dtype = torch.promote_types(x.dtype, residual.dtype)  # as torch's + (e.g. an fp32 stream, bf16 branch)
    x, residual = x.to(dtype), residual.to(dtype)
    with autocast_off(x.device.type):
        return AddRMSNormFunction.apply(x, residual, weight, eps)


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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``rms_norm(x)``; with ``residual``, ``(rms_norm(h), h)`` for ``h = x + residual``
        (:func:`~collider_autograd.add_rms_norm`: one pass for a pre-norm block's add and norm)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)
