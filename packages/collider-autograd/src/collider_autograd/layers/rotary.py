"""Rotary position embedding (rotate-half convention), optionally on the first ``rot_dim`` dims."""

from __future__ import annotations

import torch

from collider_autograd._autocast import autocast_off
from collider_autograd.layers._rows import grad_rows, index_derived, input_grad, layer_grad
from collider_kernels import rotary_backward, rotary_forward


def rotary_tables(
    positions: torch.Tensor, rot_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, rot_dim) for integer ``positions`` (T,), computed in fp32."""
    even = torch.arange(0, rot_dim, 2, dtype=torch.int64, device=positions.device).float()  # (rot_dim/2,)
    inv_freq = 1.0 / (theta ** (even / rot_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, rot_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, rot_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RotaryFunction(torch.autograd.Function):
    """(B, T, H, D) with tables (T, rot_dim) → (B, T, H, D)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.seqlen, ctx.x_dtype = x.shape[1], x.dtype
        B, T, H, D = x.shape
        rows = torch.arange(B * T, device=x.device) % T  # table row of each flat token b * T + t
        return rotary_forward(x.reshape(B * T, H, D), cos, sin, rows, validate=False).view(B, T, H, D)

    @staticmethod
    def backward(ctx, grad):
        # The kernel op's backward of the rotation, on kept rows (sparse) or all B*T rows (dense).
        cos, sin = ctx.saved_tensors
        grad = layer_grad(grad, 2)
        g, index = grad_rows(grad, tuple(grad.shape[2:]))  # (n, H, D)
        T = ctx.seqlen
        if index is None:  # every flat row b * T + t, in order
            positions = torch.arange(g.shape[0], device=g.device) % T
        else:
            positions = index_derived(index, ("positions", T), lambda: index % T)
        dx = rotary_backward(g, cos, sin, positions, validate=False)  # (n, H, D) in g's dtype
        return input_grad(grad, dx.to(ctx.x_dtype), grad.shape, 2), None, None


def check_tables_constant(cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The rotary layers give the tables no gradient: refuse tables that require one."""
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos and sin must not require grad: the rotary tables get no gradient here")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of each head of ``x`` (B, T, H, D); the output
    dtype is that of ``x * cos`` (as in ``transformers``), also under autocast."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, T, H, D), got shape {tuple(x.shape)}")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != x.shape[1]:
        raise ValueError(f"cos and sin must be ({x.shape[1]}, rot_dim), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.shape[1] > x.shape[-1] or cos.shape[1] % 2:
        raise ValueError(f"rot_dim must be even and <= head dim {x.shape[-1]}, got {cos.shape[1]}")
    check_tables_constant(cos, sin)
    with autocast_off(x.device.type):
        return RotaryFunction.apply(x, cos, sin)
