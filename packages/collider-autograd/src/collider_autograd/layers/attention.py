"""Causal self-attention core: flash forward that keeps the logsumexp, masked backward.

Dense gradient in → PyTorch's own attention backward. Sparse gradient in (kept query rows) →
:func:`collider_kernels.masked_attention_backward`: dQ of kept queries over all visible keys,
dK/dV of kept keys over kept queries (filtered keys and values are detached, DESIGN.md §2).
"""

from __future__ import annotations

import math

import torch

from collider_autograd.sparse_grad import TokenSparseTensor
from collider_kernels import masked_attention_backward

aten = torch.ops.aten


def _expand_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    # (B, Hkv, T, D) → (B, Hkv*group, T, D), query head h reads kv head h // group
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _reduce_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    # (B, Hq, T, D) → (B, Hkv, T, D)
    if group == 1:
        return t
    B, H, T, D = t.shape
    return t.view(B, H // group, group, T, D).sum(2)


def _flash_forward(qh, kh, vh, scale):
    """(B, H, T, D) ×3 → out (B, H, T, D), lse (B, H, T) fp32, extra outputs for the backward."""
    T = qh.shape[2]
    if qh.is_cuda and qh.dtype in (torch.float16, torch.bfloat16):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            qh, kh, vh, 0.0, True, False, scale=scale
        )
        return out, lse, ("flash", [cum_q, cum_k, seed, offset, max_q, max_k])
    if qh.is_cuda:
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
            qh, kh, vh, None, True, 0.0, True, scale=scale
        )
        return out, lse[:, :, :T], ("efficient", [lse, seed, offset])
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, True, scale=scale)
    return out, lse, ("cpu", [])


def _dense_backward(grad_out, qh, kh, vh, out, lse, kind, extra, scale):
    """PyTorch's own causal attention backward; all tensors (B, H, T, D)."""
    if kind == "flash":
        cum_q, cum_k, seed, offset, max_q, max_k = extra
        return aten._scaled_dot_product_flash_attention_backward(
            grad_out, qh, kh, vh, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale
        )
    if kind == "efficient":
        full_lse, seed, offset = extra
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            grad_out, qh, kh, vh, None, out, full_lse, seed, offset, 0.0, [True, True, True, False],
            True, scale=scale,
        )
        return dq, dk, dv
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, qh, kh, vh, out, lse, 0.0, True, scale=scale
    )


class CausalAttentionFunction(torch.autograd.Function):
    """q (B, T, Hq, D), k/v (B, T, Hkv, D) → (B, T, Hq, D) causal softmax attention."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        # CUDA flash attention takes grouped K/V heads natively; the other kernels need them expanded.
        native_gqa = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        group = 1 if native_gqa else q.shape[2] // k.shape[2]
        qh = q.transpose(1, 2)  # (B, Hq, T, D)
        kh = _expand_kv(k.transpose(1, 2), group)  # (B, Hq or Hkv, T, D)
        vh = _expand_kv(v.transpose(1, 2), group)
        out, lse, (kind, extra) = _flash_forward(qh, kh, vh, scale)
        ctx.save_for_backward(q, k, v, out, lse, *(t for t in extra if not isinstance(t, int)))
        ctx.ints = [t for t in extra if isinstance(t, int)]  # flash's max_q, max_k
        ctx.kind, ctx.scale, ctx.group = kind, scale, group
        return out.transpose(1, 2).contiguous()  # (B, T, Hq, D)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, *extra = ctx.saved_tensors
        extra = list(extra) + ctx.ints
        B, T, Hq, D = q.shape
        if isinstance(grad, TokenSparseTensor):
            n = grad.index.numel()
            dq, dk, dv = masked_attention_backward(
                q, k, v, out.transpose(1, 2), lse, grad.values.reshape(n, Hq, D), grad.index,
                scale=ctx.scale, validate=False,
            )  # (n, Hq, D), (n, Hkv, D), (n, Hkv, D)
            return grad.rows_like(dq, q.shape, 2), grad.rows_like(dk, k.shape, 2), grad.rows_like(dv, v.shape, 2), None
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        kh, vh = _expand_kv(kh, ctx.group), _expand_kv(vh, ctx.group)
        dq, dk, dv = _dense_backward(grad.transpose(1, 2), qh, kh, vh, out, lse, ctx.kind, extra, ctx.scale)
        dk, dv = _reduce_kv(dk, ctx.group), _reduce_kv(dv, ctx.group)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention over (B, T, H, D) tensors with grouped-query K/V; returns (B, T, Hq, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, T, H, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        want = f"({q.shape[0]}, {q.shape[1]}, Hkv, {q.shape[3]})"
        raise ValueError(f"k and v must be {want}, got {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return CausalAttentionFunction.apply(q, k, v, scale)
