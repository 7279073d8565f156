"""Dense references of every op: the plain definition, used by tests and benchmarks alike.

Each reference computes in the dtype of its inputs; callers upcast for an fp32/fp64 truth.
"""

from __future__ import annotations

import math

import torch

# Constants of the tanh-approximated GELU (``gelu_new``): sqrt(2 / pi) and the cubic coefficient.
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_COEF = 0.044715

def gather_matmul_reference(x, index, weight, bias=None):
    """``x[index] @ weightᵀ (+ bias)``; (M, K), (n,), (N, K) → (n, N)."""
    rows = x if index is None else x[index]
    y = rows @ weight.t()
    return y if bias is None else y + bias


def gathered_weight_grad_reference(grad_out, x, index):
    """``grad_outᵀ @ x[index]``; (n, N), (M, K), (n,) → (N, K)."""
    rows = x if index is None else x[index]
    return grad_out.t() @ rows


def scatter_add_rows_reference(src, index, num_rows):
    """Dense one-hot product: ``onehot(index)ᵀ @ src``; (n, F), (n,) → (num_rows, F)."""
    onehot = torch.zeros(src.shape[0], num_rows, dtype=src.dtype, device=src.device)
    onehot[torch.arange(src.shape[0], device=src.device), index] = 1
    return onehot.t() @ src


def key_lower_bound(seqlen, window=None, key_start=None, device=None):
    """First key position each query sees: ``max(key_start[b, t], t - window + 1, 0)``.

    ``window`` counts the keys a query sees, itself included (the transformers convention for
    Mistral/Qwen2: key ``j`` is visible from query ``t`` when ``t - window < j <= t``).
    Returns (B, T) int64, or (1, T) when ``key_start`` is None.
    """
    if key_start is not None:
        device = key_start.device
    t = torch.arange(seqlen, device=device)  # (T,)
    lo = torch.zeros(1, seqlen, dtype=torch.int64, device=device)
    if window is not None:
        lo = (t - window + 1).clamp_min(0)[None, :]  # (1, T)
    if key_start is not None:
        lo = torch.maximum(lo, key_start.to(torch.int64))  # (B, T)
    return lo


def attention_visibility(seqlen, window=None, key_start=None, device=None):
    """(B or 1, T, T) bool: query ``t`` sees key ``j`` iff ``key_lower_bound[t] <= j <= t``."""
    lo = key_lower_bound(seqlen, window, key_start, device)  # (B, T)
    j = torch.arange(seqlen, device=lo.device)
    return (j[None, None, :] <= j[None, :, None]) & (j[None, None, :] >= lo[:, :, None])


def attention_forward_reference(q, k, v, scale=None, *, window=None, key_start=None):
    """Causal attention by its definition; (B, T, Hq, D), (B, T, Hkv, D) → out, lse (B, Hq, T).

    ``window`` and ``key_start`` restrict the keys each query sees (:func:`attention_visibility`).
    """
    B, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qh = q.transpose(1, 2)  # (B, Hq, T, D)
    kh = k.transpose(1, 2).repeat_interleave(group, 1)  # (B, Hq, T, D)
    vh = v.transpose(1, 2).repeat_interleave(group, 1)
    scores = scale * qh @ kh.transpose(-1, -2)  # (B, Hq, T, T)
    visible = attention_visibility(T, window, key_start, q.device)[:, None]  # (B or 1, 1, T, T)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)  # (B, Hq, T)
    out = torch.exp(scores - lse[..., None]) @ vh  # (B, Hq, T, D)
    return out.transpose(1, 2), lse


def masked_attention_backward_reference(q, k, v, grad_out, keep, scale=None, *, window=None, key_start=None):
    """Dense gradients of the contract: K and V rows of filtered positions detached.

    Args:
        q, k, v: (B, T, H*, D) forward inputs.
        grad_out: (B, T, Hq, D) dense output gradient (zero rows where ``keep`` is False).
        keep: (B, T) bool.
        scale, window, key_start: as :func:`attention_forward_reference`.

    Returns:
        Dense ``(dq, dk, dv)`` with the shapes of ``q, k, v``.
    """
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    v = v.detach().requires_grad_()
    m = keep[..., None, None]
    k_eff = torch.where(m, k, k.detach())
    v_eff = torch.where(m, v, v.detach())
    out, _ = attention_forward_reference(q, k_eff, v_eff, scale, window=window, key_start=key_start)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return dq, dk, dv


def swiglu_forward_reference(gate, up):
    """``gate * sigmoid(gate) * up``; (M, I), (M, I) → (M, I)."""
    return gate * torch.sigmoid(gate) * up


def swiglu_backward_reference(grad, gate, up, index=None):
    """Autograd of ``silu(gate) * up`` on the rows ``index``; (n, I), (M, I), (M, I) → dgate, dup (n, I)."""
    rows_g = (gate if index is None else gate[index]).detach().requires_grad_()
    rows_u = (up if index is None else up[index]).detach().requires_grad_()
    y = swiglu_forward_reference(rows_g, rows_u)
    dgate, dup = torch.autograd.grad(y, (rows_g, rows_u), grad)
    return dgate, dup


def rms_norm_forward_reference(x, weight, eps):
    """``weight * x / sqrt(mean(x²) + eps)`` over the last dim; (M, H), (H,) → (M, H), no
    intermediate cast to a narrower dtype."""
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rms_norm_backward_reference(grad, x, weight, eps, index=None):
    """Autograd of :func:`rms_norm_forward_reference` on the rows ``index``.

    (n, H), (M, H), (H,) → dx (n, H), dweight (H,); no intermediate cast to a narrower dtype.
    """
    rows = (x if index is None else x[index]).detach().requires_grad_()
    w = weight.detach().requires_grad_()
    y = rms_norm_forward_reference(rows, w, eps)
    dx, dweight = torch.autograd.grad(y, (rows, w), grad)
    return dx, dweight


def layer_norm_backward_reference(grad, x, weight, eps, index=None):
    """Autograd of ``F.layer_norm(x, (H,), weight, bias, eps)`` on the rows ``index``.

    (n, H), (M, H), (H,) → dx (n, H), dweight (H,), dbias (H,).
    """
    rows = (x if index is None else x[index]).detach().requires_grad_()
    w = weight.detach().requires_grad_()
    b = torch.zeros_like(w, requires_grad=True)
    y = torch.nn.functional.layer_norm(rows, (rows.shape[-1],), w, b, eps)
    dx, dweight, dbias = torch.autograd.grad(y, (rows, w, b), grad)
    return dx, dweight, dbias


def gelu_new_reference(x):
    """``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x³)))`` (the tanh GELU), elementwise."""
    return 0.5 * x * (1 + torch.tanh(SQRT_2_OVER_PI * (x + GELU_COEF * x**3)))


def gelu_new_backward_reference(grad, x, index=None):
    """Autograd of :func:`gelu_new_reference` on the rows ``index``.

    (n, F), (M, F) → dx (n, F).
    """
    rows = (x if index is None else x[index]).detach().requires_grad_()
    (dx,) = torch.autograd.grad(gelu_new_reference(rows), (rows,), grad)
    return dx


def rotary_forward_reference(x, cos, sin, positions):
    """Rotate each pair ``(x[d], x[d + R/2])``, ``d < R/2``, of the first ``R`` dims of every head
    by the angle of its row's position; the rest passes through.

    ``y[d] = x[d] cos[p, d] - x[d+h] sin[p, d]`` and ``y[d+h] = x[d+h] cos[p, d+h] + x[d] sin[p, d+h]``
    with ``h = R/2``, ``p = positions[row]`` (``x * cos + rotate_half(x) * sin``).
    (n, H, D), (T, R), (T, R), (n,) → y (n, H, D).
    """
    h = cos.shape[1] // 2
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]  # (n, 1, R)
    x1, x2 = x[..., :h], x[..., h : 2 * h]  # (n, H, h) each
    y1 = x1 * c[..., :h] - x2 * s[..., :h]
    y2 = x2 * c[..., h:] + x1 * s[..., h:]
    return torch.cat([y1, y2, x[..., 2 * h :]], dim=-1)


def rotary_backward_reference(grad, cos, sin, positions):
    """Autograd of :func:`rotary_forward_reference`; (n, H, D), (T, R), (T, R), (n,) → dx (n, H, D)."""
    x = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
    (dx,) = torch.autograd.grad(rotary_forward_reference(x, cos, sin, positions), (x,), grad)
    return dx


def cross_entropy_forward_reference(logits, labels, ignore_index=-100):
    """Per-row ``F.cross_entropy(..., reduction="none")`` and ``logsumexp`` of ``logits``.

    (n, V), (n,) → loss (n,) (0 where ``labels == ignore_index``), lse (n,).
    """
    loss = torch.nn.functional.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none")
    return loss, torch.logsumexp(logits, dim=-1)


def cross_entropy_backward_reference(logits, labels, scale, ignore_index=-100):
    """Autograd of ``sum(scale * cross_entropy(logits, labels))`` (per-row losses as
    :func:`cross_entropy_forward_reference`); (n, V), (n,), (n,) → dlogits (n, V)."""
    z = logits.detach().requires_grad_()
    loss, _ = cross_entropy_forward_reference(z, labels, ignore_index)
    (dlogits,) = torch.autograd.grad(loss, (z,), scale.to(loss.dtype))
    return dlogits
