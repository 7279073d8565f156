"""Masked attention backward over kept tokens (the "restore-Q" rule of the
Design page, ``docs/design.rst``).

Given the dense causal forward (output and logsumexp) and the output gradient of the kept
query rows only, compute

* dQ for kept queries, summing over **all** causally visible keys (kept and filtered);
* dK, dV for kept keys only, summing over kept queries only (the keys and values of
  filtered positions are detached), reduced over the query heads of each KV group.

Kept tokens are given as a sorted flat index into the ``B*T`` token grid; every sequence may
keep a different number of tokens, including none. A sliding window and per-token document
starts restrict the keys each query sees.
"""

from __future__ import annotations

import math

import torch

from collider_kernels._checks import check_attention_masks, check_index, check_into, check_tensor
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import FLOAT_DTYPES
from collider_kernels.reference import attention_visibility, key_lower_bound


def sequence_offsets(index: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """(B+1,) int64 offsets of each sequence's kept tokens in a sorted flat ``index``.

    Sequence ``b`` owns ``index[offsets[b]:offsets[b+1]]`` (the cu_seqlens convention).
    """
    starts = torch.arange(batch + 1, dtype=index.dtype, device=index.device) * seqlen  # (B+1,)
    return torch.searchsorted(index, starts).to(torch.int64)  # no host sync, unlike bincount


def masked_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    index: torch.Tensor,
    *,
    offsets: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    key_start: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
    into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention backward restricted to kept tokens.

    A kept query at position ``t`` of sequence ``b`` sees the keys ``j`` with
    ``max(key_start[b, t], t - window + 1) <= j <= t``
    (:func:`collider_kernels.reference.key_lower_bound`). dQ of kept queries sums over every
    visible key (kept and filtered); dK/dV exist for kept keys only and sum over the kept queries
    that see them. With ``window`` and ``key_start`` both None this is plain causal attention.

    Args:
        q: (B, T, Hq, D) queries of the forward (after rotary), any strides.
        k, v: (B, T, Hkv, D) keys and values; ``Hq % Hkv == 0`` (grouped-query attention).
        out: (B, T, Hq, D) forward output.
        lse: (B, Hq, T) float32 natural-log logsumexp of the scaled scores under the same mask,
            as the forward returns it (``logsumexp`` of PyTorch's flash/efficient attention ops).
        grad_out: (n, Hq, D) output gradient of the kept rows, in ``index`` order.
        index: (n,) sorted flat token index ``b * T + t`` of the kept rows.
        offsets: optional (B+1,) int64 :func:`sequence_offsets` of ``index`` (computed if
            omitted; checked against it when ``validate``).
        scale: softmax scale, default ``1/sqrt(D)``.
        window: sliding window as transformers defines it for Mistral/Qwen2: the number of keys a
            query sees, itself included (query ``t`` sees ``t - window < j <= t``; flash
            attention's ``window_size = (window - 1, 0)``). None: unlimited.
        key_start: optional (B, T) int64/int32 first key position visible to each query (the
            start of its document when documents are packed in one row); ``0 <= key_start[b, t]
            <= t`` and non-decreasing in ``t``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check index range and order, ``offsets`` and ``key_start`` values (costs a
            device sync on CUDA).
        into: optional ``(dq, dk, dv)`` tensors of the result's shapes and dtype, each with unit
            last stride, to write the result into (e.g. views of one (n, Hq + 2 Hkv, D) buffer,
            as the rows of a fused q/k/v projection's gradient); every element is overwritten.

    Returns:
        ``(dq, dk, dv)`` of shapes (n, Hq, D), (n, Hkv, D), (n, Hkv, D) for the kept rows,
        in ``q.dtype`` (the ``into`` tensors when given).
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, T, Hq, D = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=(q.dtype,), device=q.device)
        if t.shape[0] != B or t.shape[1] != T or t.shape[3] != D:
            raise ValueError(f"{name} must be ({B}, {T}, Hkv, {D}), got {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    check_tensor("out", out, ndim=4, dtypes=(q.dtype,), device=q.device)
    if out.shape != q.shape:
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    check_tensor("lse", lse, ndim=3, dtypes=(torch.float32, torch.float64), device=q.device)
    if tuple(lse.shape) != (B, Hq, T):
        raise ValueError(f"lse must be ({B}, {Hq}, {T}), got {tuple(lse.shape)}")
    check_index("index", index, B * T, q.device, validate=validate)
    n = index.shape[0]
    check_tensor("grad_out", grad_out, ndim=3, dtypes=(q.dtype,), device=q.device)
    if tuple(grad_out.shape) != (n, Hq, D):
        raise ValueError(f"grad_out must be ({n}, {Hq}, {D}) (kept rows), got {tuple(grad_out.shape)}")
    if validate and n > 1 and not bool((index[1:] > index[:-1]).all()):
        raise ValueError("index must be strictly increasing (sorted, no repeats)")
    check_attention_masks(B, T, q.device, window=window, key_start=key_start, validate=validate)
    if offsets is None:
        offsets = sequence_offsets(index, B, T)
    else:
        check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int64,), device=q.device)
        if tuple(offsets.shape) != (B + 1,):
            raise ValueError(f"offsets must be ({B + 1},), got {tuple(offsets.shape)}")
        if validate and not torch.equal(offsets, sequence_offsets(index, B, T)):
            raise ValueError("offsets must equal sequence_offsets(index, B, T) (each sequence's kept rows)")
    if into is not None:
        if not isinstance(into, (tuple, list)) or len(into) != 3:
            raise TypeError(f"into must be a (dq, dk, dv) tuple of tensors, got {type(into).__name__}")
        inputs = {"q": q, "k": k, "v": v, "out": out, "lse": lse, "grad_out": grad_out}
        for name, t, h in zip(("into[0] (dq)", "into[1] (dk)", "into[2] (dv)"), into, (Hq, Hkv, Hkv), strict=True):
            check_into(name, t, (n, h, D), q.dtype, q.device, inputs)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    fn = resolve_backend("masked_attention_backward", backend, q.device, (q.dtype,))
    return fn(q, k, v, out, lse, grad_out, index, offsets, scale, window, key_start, into=into)


# Kept queries per block of the torch backend: each block only reads keys up to its last
# query's position, so the work follows the causal triangle.
_TORCH_QUERY_BLOCK = 128


# On CPU, PyTorch's fused flash backward over all rows beats the kept-rows torch math once this
# share of tokens is kept (measured on 2 cores: equal at ~0.4, the masked math 2.4x slower at 1.0).
_CPU_DENSE_KEEP_SHARE = 0.4


def attention_bias(seqlen: int, dtype: torch.dtype, *, window=None, key_start=None, device=None) -> torch.Tensor:
    """(B or 1, 1, T, T) additive mask in ``dtype``: 0 where a query sees a key, -inf elsewhere."""
    visible = attention_visibility(seqlen, window, key_start, device)  # (B or 1, T, T)
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill_(~visible, float("-inf"))[:, None]


def _dense_flash_backward_cpu(q, k, v, out, lse, grad_out, index, scale, window, key_start):
    """The same gradients from the dense CPU flash backward: filtered queries get dO = 0, so they
    add nothing to any dK/dV; the rows of kept tokens are then gathered."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    dout = grad_out.new_zeros((B * T, Hq, D)).index_copy_(0, index, grad_out)  # (B*T, Hq, D)
    kh = k.transpose(1, 2).repeat_interleave(group, 1)  # (B, Hq, T, D)
    vh = v.transpose(1, 2).repeat_interleave(group, 1)
    masked = window is not None or key_start is not None
    mask = attention_bias(T, q.dtype, window=window, key_start=key_start) if masked else None
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.view(B, T, Hq, D).transpose(1, 2), q.transpose(1, 2), kh, vh, out.transpose(1, 2), lse,
        0.0, not masked, attn_mask=mask, scale=scale,
    )  # (B, Hq, T, D) each
    dk = dk.view(B, Hkv, group, T, D).sum(2)  # (B, Hkv, T, D)
    dv = dv.view(B, Hkv, group, T, D).sum(2)

    def rows(t):  # (B, H, T, D) → kept rows (n, H, D)
        return t.transpose(1, 2).reshape(B * T, t.shape[1], D).index_select(0, index)

    return rows(dq), rows(dk), rows(dv)


@register("masked_attention_backward", "torch")
def _masked_attention_backward_torch(q, k, v, out, lse, grad_out, index, offsets, scale, window=None,
                                     key_start=None, into=None):
    grads = _masked_attention_backward_math(q, k, v, out, lse, grad_out, index, offsets, scale, window, key_start)
    if into is None:
        return grads
    for dst, src in zip(into, grads, strict=True):
        dst.copy_(src)
    return tuple(into)


def _masked_attention_backward_math(q, k, v, out, lse, grad_out, index, offsets, scale, window, key_start):
    B, T, Hq, D = q.shape
    if q.device.type == "cpu" and index.numel() >= _CPU_DENSE_KEEP_SHARE * B * T and lse.dtype == (
        torch.float64 if q.dtype == torch.float64 else torch.float32
    ):
        return _dense_flash_backward_cpu(q, k, v, out, lse, grad_out, index, scale, window, key_start)
    Hkv = k.shape[2]
    group = Hq // Hkv
    n = index.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = grad_out.new_empty((n, Hq, D))
    dk = grad_out.new_zeros((n, Hkv, D), dtype=acc)
    dv = grad_out.new_zeros((n, Hkv, D), dtype=acc)
    masked = window is not None or key_start is not None
    lower = key_lower_bound(T, window, key_start, q.device).expand(B, T) if masked else None  # (B, T)
    bounds = offsets.tolist()
    for b in range(B):
        s, e = bounds[b], bounds[b + 1]
        if s == e:
            continue
        pos = index[s:e] - b * T  # (m,) kept positions of this sequence, increasing
        lo = None if lower is None else lower[b].index_select(0, pos)  # (m,) first key each sees
        m = e - s
        L = int(pos[-1]) + 1  # keys beyond the last kept query are never visible
        kb = k[b, :L].transpose(0, 1).to(acc).repeat_interleave(group, 0)  # (Hq, L, D)
        vb = v[b, :L].transpose(0, 1).to(acc).repeat_interleave(group, 0)  # (Hq, L, D)
        dk_b = torch.zeros(Hq, m, D, dtype=acc, device=q.device)  # kept keys, per query head
        dv_b = torch.zeros(Hq, m, D, dtype=acc, device=q.device)
        for qs in range(0, m, _TORCH_QUERY_BLOCK):
            qe = min(qs + _TORCH_QUERY_BLOCK, m)
            qpos = pos[qs:qe]  # (c,)
            Lq = int(qpos[-1]) + 1  # keys this block can see: [k0, Lq)
            k0 = 0 if lo is None else int(lo[qs])  # lower bounds never decrease along a sequence
            nk0 = 0 if lo is None else int(torch.searchsorted(pos, k0))  # kept keys from k0 on
            nk = int(torch.searchsorted(pos, qpos[-1], right=True))  # ... up to the block's last query
            qb = q[b].index_select(0, qpos).transpose(0, 1).to(acc)  # (Hq, c, D)
            ob = out[b].index_select(0, qpos).transpose(0, 1).to(acc)  # (Hq, c, D)
            dob = grad_out[s + qs : s + qe].transpose(0, 1).to(acc)  # (Hq, c, D)
            lb = lse[b].index_select(1, qpos).to(acc)  # (Hq, c)
            keys = torch.arange(k0, Lq, device=q.device)  # (Lk,)
            visible = keys[None, :] <= qpos[:, None]  # (c, Lk)
            if lo is not None:
                visible &= keys[None, :] >= lo[qs:qe, None]
            kw, vw = kb[:, k0:Lq], vb[:, k0:Lq]  # (Hq, Lk, D)
            scores = scale * (qb @ kw.transpose(1, 2))  # (Hq, c, Lk)
            p = torch.exp(scores - lb[..., None]).masked_fill(~visible, 0.0)
            dp = dob @ vw.transpose(1, 2)  # (Hq, c, Lk)
            delta = (dob * ob).sum(-1, keepdim=True)  # (Hq, c, 1)
            ds = p * (dp - delta)  # (Hq, c, Lk)
            dq[s + qs : s + qe] = (scale * (ds @ kw)).transpose(0, 1).to(dq.dtype)
            kpos = pos[nk0:nk] - k0  # kept keys visible to this block, as columns of ds
            dk_b[:, nk0:nk] += scale * (ds.index_select(2, kpos).transpose(1, 2) @ qb)  # (Hq, nk-nk0, D)
            dv_b[:, nk0:nk] += p.index_select(2, kpos).transpose(1, 2) @ dob
        dk[s:e] = dk_b.view(Hkv, group, m, D).sum(1).transpose(0, 1)
        dv[s:e] = dv_b.view(Hkv, group, m, D).sum(1).transpose(0, 1)
    return dq, dk.to(q.dtype), dv.to(q.dtype)
