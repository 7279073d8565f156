"""Causal self-attention core: flash forward that keeps the logsumexp, masked backward.

Dense gradient in → PyTorch's own attention backward. Sparse gradient in (kept query rows) →
:func:`collider_kernels.masked_attention_backward`: dQ of kept queries over all visible keys,
dK/dV of kept keys over kept queries (filtered keys and values are detached; see the Design
page, ``docs/design.rst``).

With ``rotary`` tables the rotary position embedding of q and k runs inside the layer, so its
backward lands in the same buffer as dV: on the kept-rows path dQ, dK and dV are written into one
(n, Hq + 2 Hkv, D) buffer and rotated back in place there, which is the layout a fused q/k/v
projection's backward reads (no concatenation).

A sliding ``window`` and per-token document starts (``key_start``) restrict the keys each query
sees, in the forward and in both backwards. Without them the plain causal kernels run: PyTorch's
cuDNN attention on CUDA fp16/bf16 where cuDNN takes the call (grouped K/V heads natively; on an H200
its forward + backward takes 0.54-0.63x the time of PyTorch's flash attention at the three models'
shapes, ``benchmarks/results/attention_backends_h200.json``), else its flash attention, its memory-
efficient attention (CUDA fp32) and its CPU flash attention. With them, the same kernels take an
explicit additive mask: the CPU flash attention on CPU and the memory-efficient attention on CUDA
(every dtype). That path is exact for any window and any valid ``key_start`` (no host
synchronisation, no restriction to whole documents); it computes the full T×T score square and
builds a (B, 1, T, T) bias for each forward and each dense backward, instead of saving one per
layer.
"""

from __future__ import annotations

import math

import torch

from collider_autograd._autocast import autocast_off, cast_for_matmul
from collider_autograd.layers._rows import index_derived, is_partial, layer_grad
from collider_autograd.layers.rotary import check_tables, flat_tables, kept_table_rows, rotate_tokens, unrotate_tokens
from collider_autograd.sparse_grad import TokenSparseTensor
from collider_kernels import (
    check_attention_masks,
    masked_attention_backward,
    rotary_backward,
    sequence_offsets,
)
from collider_kernels.reference import attention_visibility

aten = torch.ops.aten

# Memory-efficient attention wants the bias's row stride a multiple of this many elements.
_BIAS_ALIGN = 16
# Whether cuDNN attention runs here: None until the first CUDA fp16/bf16 call tries it.
_CUDNN_WORKS: bool | None = None


def _expand_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    # (B, Hkv, T, D) → (B, Hkv*group, T, D), query head h reads kv head h // group
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def _reduce_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    # (B, Hq, T, D) → (B, Hkv, T, D)
    if group == 1:
        return t
    B, H, T, D = t.shape
    return t.view(B, H // group, group, T, D).sum(2)


def _mask_bias(q: torch.Tensor, heads: int, window, key_start) -> torch.Tensor:
    """(B, heads, T, T) additive mask in q's dtype (0 visible, -inf hidden), broadcast over heads,
    rows padded to an aligned stride as the memory-efficient kernel requires."""
    B, T = q.shape[0], q.shape[1]
    visible = attention_visibility(T, window, key_start, q.device)  # (B or 1, T, T)
    padded = -(-T // _BIAS_ALIGN) * _BIAS_ALIGN
    bias = torch.zeros((visible.shape[0], 1, T, padded), dtype=q.dtype, device=q.device)[..., :T]
    bias.masked_fill_(~visible[:, None], float("-inf"))
    return bias.expand(B, heads, T, T)


def _flash_forward(qh, kh, vh, scale, bias):
    """(B, H, T, D) ×3 → out (B, H, T, D), lse (B, H, T) fp32, extra outputs for the backward.

    ``bias``: None (plain causal) or the additive mask of :func:`_mask_bias`."""
    T = qh.shape[2]
    if bias is not None:
        if qh.is_cuda:
            out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
                qh, kh, vh, bias, True, 0.0, False, scale=scale
            )
            return out, lse[:, :, :T], ("efficient", [lse, seed, offset])
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, False, attn_mask=bias, scale=scale)
        return out, lse, ("cpu", [])
    if qh.is_cuda and qh.dtype in (torch.float16, torch.bfloat16):
        cudnn = _cudnn_forward(qh, kh, vh, scale)
        if cudnn is not None:
            return cudnn
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


def _cudnn_forward(qh, kh, vh, scale):
    """cuDNN's causal attention forward, or None where cuDNN does not take the call (tried once)."""
    global _CUDNN_WORKS
    if _CUDNN_WORKS is False:
        return None
    try:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            qh, kh, vh, None, True, 0.0, True, False, scale=scale
        )
    except (RuntimeError, NotImplementedError):
        if _CUDNN_WORKS is None:
            _CUDNN_WORKS = False
            return None
        raise
    _CUDNN_WORKS = True
    # lse (B, H, T, 1) is kept whole for cuDNN's backward; the masked backward reads (B, H, T).
    return out, lse[..., 0], ("cudnn", [lse, cum_q, cum_k, seed, offset, max_q, max_k])


def _dense_backward(grad_out, qh, kh, vh, out, lse, kind, extra, scale, bias):
    """PyTorch's own attention backward (causal, or under ``bias``); all tensors (B, H, T, D)."""
    causal = bias is None
    if kind == "cudnn":
        full_lse, cum_q, cum_k, seed, offset, max_q, max_k = extra
        return aten._scaled_dot_product_cudnn_attention_backward(
            grad_out, qh, kh, vh, out, full_lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True,
            scale=scale,
        )
    if kind == "flash":
        cum_q, cum_k, seed, offset, max_q, max_k = extra
        return aten._scaled_dot_product_flash_attention_backward(
            grad_out, qh, kh, vh, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale
        )
    if kind == "efficient":
        full_lse, seed, offset = extra
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            grad_out, qh, kh, vh, bias, out, full_lse, seed, offset, 0.0, [True, True, True, False],
            causal, scale=scale,
        )
        return dq, dk, dv
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, qh, kh, vh, out, lse, 0.0, causal, attn_mask=bias, scale=scale
    )


class CausalAttentionFunction(torch.autograd.Function):
    """q (B, T, Hq, D), k/v (B, T, Hkv, D) → (B, T, Hq, D) causal softmax attention, optionally
    restricted to a sliding ``window`` and per-token ``key_start`` (B, T), and with the rotary
    embedding of q and k by ``cos``/``sin`` tables first."""

    @staticmethod
    def forward(ctx, q, k, v, scale, window, key_start, cos, sin):
        B, T, Hq, D = q.shape
        ctx.empty = q.numel() == 0 or k.numel() == 0
        if ctx.empty:  # B = 0, T = 0 (or no heads): nothing to attend; the CPU kernel would crash
            ctx.shapes, ctx.dtype = (q.shape, k.shape, v.shape), q.dtype
            return q.new_empty((B, T, Hq, D))
        ctx.rotary = cos is not None
        if ctx.rotary:
            cos, sin, ctx.period = flat_tables(cos, sin, B, T)
            # Rotated in the wider of the tables' dtype and q's, rounded back to q's.
            q, k = (rotate_tokens(t, cos, sin, ctx.period).to(t.dtype) for t in (q, k))
        masked = window is not None or key_start is not None
        # CUDA cuDNN and flash attention take grouped K/V heads natively; the others need them expanded.
        native_gqa = not masked and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        group = 1 if native_gqa else Hq // k.shape[2]
        qh = q.transpose(1, 2)  # (B, Hq, T, D)
        kh = _expand_kv(k.transpose(1, 2), group)  # (B, Hq or Hkv, T, D)
        vh = _expand_kv(v.transpose(1, 2), group)
        bias = _mask_bias(q, Hq, window, key_start) if masked else None  # (B, Hq, T, T)
        out, lse, (kind, extra) = _flash_forward(qh, kh, vh, scale, bias)
        saved = extra if key_start is None else [*extra, key_start]
        saved = saved if cos is None else [*saved, cos, sin]  # the (P, R) tables
        result = out.transpose(1, 2).contiguous()  # (B, T, Hq, D); no copy when the kernel wrote that layout
        # The output is saved once, as returned; the backwards read it through a transposed view.
        ctx.save_for_backward(q, k, v, result, lse, *(t for t in saved if not isinstance(t, int)))
        ctx.ints = [t for t in extra if isinstance(t, int)]  # flash's and cuDNN's max_q, max_k
        ctx.kind, ctx.scale, ctx.group = kind, scale, group
        ctx.window, ctx.has_key_start = window, key_start is not None
        return result

    @staticmethod
    def backward(ctx, grad):
        if ctx.empty:
            zeros = (torch.zeros(s, dtype=ctx.dtype, device=grad.device) for s in ctx.shapes)
            return *zeros, None, None, None, None, None
        q, k, v, result, lse, *extra = ctx.saved_tensors
        tables = (extra.pop(-2), extra.pop()) if ctx.rotary else None  # (P, R) cos, sin
        out = result.transpose(1, 2)  # (B, Hq, T, D) view
        key_start = extra.pop() if ctx.has_key_start else None
        extra = list(extra) + ctx.ints
        window = ctx.window
        B, T, Hq, D = q.shape
        grad = layer_grad(grad, 2)
        if is_partial(grad):
            n, Hkv, index = grad.index.numel(), k.shape[2], grad.index
            offsets = index_derived(index, ("offsets", B, T), lambda: sequence_offsets(index, B, T))
            # One (n, Hq + 2 Hkv, D) buffer: the rows of a fused q/k/v projection's gradient.
            qkv = q.new_empty((n, Hq + 2 * Hkv, D))
            dq, dk, dv = qkv.split([Hq, Hkv, Hkv], dim=1)
            masked_attention_backward(
                q, k, v, result, lse, grad.values.reshape(n, Hq, D), index, offsets=offsets,
                scale=ctx.scale, window=window, key_start=key_start, validate=False, into=(dq, dk, dv),
            )
            if ctx.rotary:  # back through the rotation, in place, dQ and dK (adjacent heads) at once
                dqk = qkv[:, : Hq + Hkv]  # (n, Hq + Hkv, D)
                rotary_backward(dqk, *tables, kept_table_rows(index, ctx.period), validate=False, into=dqk)
            sparse = (grad.rows_like(dq, q.shape, 2), grad.rows_like(dk, k.shape, 2), grad.rows_like(dv, v.shape, 2))
            return *sparse, None, None, None, None, None
        if isinstance(grad, TokenSparseTensor):  # every row kept: the ordinary dense backward
            grad = grad.values.reshape(q.shape)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        kh, vh = _expand_kv(kh, ctx.group), _expand_kv(vh, ctx.group)
        masked = window is not None or key_start is not None
        bias = _mask_bias(q, Hq, window, key_start) if masked else None  # rebuilt, not saved
        dq, dk, dv = _dense_backward(grad.transpose(1, 2), qh, kh, vh, out, lse, ctx.kind, extra, ctx.scale, bias)
        dk, dv = _reduce_kv(dk, ctx.group), _reduce_kv(dv, ctx.group)
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)  # (B, T, H, D)
        if ctx.rotary:
            dq, dk = (unrotate_tokens(t, *tables, ctx.period) for t in (dq, dk))
        return dq, dk, dv, None, None, None, None, None


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    window: int | None = None,
    key_start: torch.Tensor | None = None,
    validate: bool = True,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention over (B, T, H, D) tensors with grouped-query K/V; returns (B, T, Hq, D).

    Query ``t`` of sequence ``b`` sees the keys ``j`` with
    ``max(key_start[b, t], t - window + 1) <= j <= t``.

    Args:
        q: (B, T, Hq, D) queries; k, v: (B, T, Hkv, D), ``Hq % Hkv == 0``.
        scale: softmax scale, default ``1/sqrt(D)``.
        window: sliding window as transformers defines it for Mistral/Qwen2 (``sliding_window``):
            the number of keys a query sees, itself included. None: unlimited.
        key_start: optional (B, T) int64/int32 first key position each query may see, e.g. the
            start of its document when documents are packed in one row (``0 <= key_start[b, t]
            <= t``, non-decreasing in ``t``).
        validate: check the values of ``key_start`` (a device synchronisation on CUDA; a model
            that checked them once per batch passes False to its layers). Its shape, dtype and
            device, and ``window``, are always checked.
        rotary: optional ``(cos, sin)`` tables, (T, R) shared by the batch or (B, T, R) per
            sequence, ``R`` even and ``<= D``, any float dtype: q and k (after autocast's cast)
            are first rotated on their first ``R`` dims as :func:`~collider_autograd.apply_rotary`
            does, in the wider of their dtype and the tables', and rounded back to their dtype
            (the values of rotating first and letting autocast cast the result); the gradients
            returned for q and k are those of the unrotated inputs. The kept-rows backward then
            writes dQ, dK and dV into one buffer.

    Under ``torch.autocast`` q, k and v are cast to the autocast dtype, as for a matmul. B = 0
    or T = 0 gives an empty result.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, T, H, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        want = f"({q.shape[0]}, {q.shape[1]}, Hkv, {q.shape[3]})"
        raise ValueError(f"k and v must be {want}, got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    B, T = q.shape[:2]
    check_attention_masks(B, T, q.device, window=window, key_start=key_start, validate=validate)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    q, k, v = cast_for_matmul(q, k, v)
    cos = sin = None
    if rotary is not None:
        cos, sin = rotary
        check_tables("rotary", cos, sin, B, T, q.shape[3])
        if cos.device != q.device:
            raise TypeError(f"rotary tables must be on q's device {q.device}, got {cos.device}")
    with autocast_off(q.device.type):
        return CausalAttentionFunction.apply(q, k, v, scale, window, key_start, cos, sin)
