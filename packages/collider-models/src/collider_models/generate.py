"""Text generation with a key/value cache: greedy decoding and top-p sampling.

Inference only. The cached forward reuses the model's own modules (projections, norms,
MLPs, LM head) and replaces just the attention core: new queries attend to the cached keys
and values with :func:`torch.nn.functional.scaled_dot_product_attention`, with rotary
tables at the new tokens' absolute positions. The training path of the blocks is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from collider_autograd import apply_rotary, rotary_tables


class KVCache:
    """Keys and values of every layer, preallocated up to ``max_length`` positions.

    Args:
        model: the causal LM whose layers fill the cache.
        batch: number of sequences.
        max_length: largest number of positions the cache holds.
        dtype, device: of the cached tensors (default: the model's parameters').

    Attributes:
        keys, values: per layer, (B, Hkv, max_length, D) tensors; positions
            ``[0, length)`` are filled.
        length: number of positions cached so far.
    """

    def __init__(self, model: nn.Module, batch: int, max_length: int, dtype=None, device=None):
        cfg = model.config
        ref = model.lm_head.weight
        dtype = ref.dtype if dtype is None else dtype
        device = ref.device if device is None else device
        shape = (batch, cfg.num_kv_heads, max_length, cfg.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.batch, self.max_length, self.length = batch, max_length, 0


def _attention(attn: nn.Module, x: torch.Tensor, cos, sin, cache: KVCache, layer: int, start: int) -> torch.Tensor:
    """Attention of new tokens x (B, T, hidden) at positions ``start + t`` over the cache."""
    B, T, _ = x.shape
    Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, Hq, D)
    k = attn.k_proj(x).view(B, T, Hkv, D)
    v = attn.v_proj(x).view(B, T, Hkv, D)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    end = start + T
    cache.keys[layer][:, :, start:end] = k.transpose(1, 2)
    cache.values[layer][:, :, start:end] = v.transpose(1, 2)
    keys = cache.keys[layer][:, :, :end]  # (B, Hkv, end, D)
    values = cache.values[layer][:, :, :end]
    if Hq != Hkv:
        keys = keys.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, end, D)
        values = values.repeat_interleave(Hq // Hkv, dim=1)
    qh = q.transpose(1, 2)  # (B, Hq, T, D)
    if start == 0:
        out = F.scaled_dot_product_attention(qh, keys, values, is_causal=True)
    elif T == 1:
        out = F.scaled_dot_product_attention(qh, keys, values)
    else:
        pos_q = torch.arange(start, end, device=x.device)
        mask = pos_q[:, None] >= torch.arange(end, device=x.device)[None, :]  # (T, end)
        out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask)
    out = out.transpose(1, 2).reshape(B, T, Hq * D)
    return getattr(attn, attn.out_name)(out)  # (B, T, hidden)


def _layer(block: nn.Module, x: torch.Tensor, cos, sin, cache: KVCache, layer: int, start: int) -> torch.Tensor:
    if block.parallel:
        h = block.input_layernorm(x)
        return x + _attention(block.self_attn, h, cos, sin, cache, layer, start) + block.mlp(h)
    x = x + _attention(block.self_attn, block.input_layernorm(x), cos, sin, cache, layer, start)
    return x + block.mlp(block.post_attention_layernorm(x))


@torch.no_grad()
def cached_forward(
    model: nn.Module, input_ids: torch.Tensor, cache: KVCache, *, last_only: bool = False
) -> torch.Tensor:
    """Logits of new tokens that continue the cached ones; appends them to ``cache``.

    Args:
        model: a Collider causal LM.
        input_ids: (B, T) new token ids, at positions ``cache.length ..
            cache.length + T - 1``.
        cache: the :class:`KVCache` of the tokens so far (empty for a prompt).
        last_only: compute the logits of the last new position only.

    Returns:
        (B, T, V) logits, or (B, 1, V) with ``last_only``; in the model's dtype.
    """
    B, T = input_ids.shape
    if B != cache.batch:
        raise ValueError(f"input_ids has batch {B}, the cache {cache.batch}")
    start = cache.length
    if start + T > cache.max_length:
        raise ValueError(f"cache holds {cache.max_length} positions; {start} cached + {T} new exceed it")
    decoder, cfg = model.model, model.config
    x = decoder.embed_tokens(input_ids)  # (B, T, hidden)
    positions = torch.arange(start, start + T, device=input_ids.device)
    cos, sin = rotary_tables(positions, cfg.rot_dim, cfg.rope_theta, x.dtype)  # (T, rot_dim)
    for i, block in enumerate(decoder.layers):
        x = _layer(block, x, cos, sin, cache, i, start)
    x = getattr(decoder, decoder.final_norm_name)(x)
    cache.length = start + T
    if last_only:
        x = x[:, -1:]
    return model.lm_head(x)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) logits with the tail outside the smallest top-p nucleus set to -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= top_p  # the first token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _next_token(logits: torch.Tensor, do_sample: bool, top_p: float, temperature: float, generator) -> torch.Tensor:
    """(B, V) logits → (B,) next token ids."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1)
    logits = _top_p_filter(logits / temperature, top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    top_p: float = 1.0,
    temperature: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    All prompts have the same length (no padding). Once a sequence emits an
    end-of-sequence token it is padded with that token (the first of ``eos_token_id``);
    decoding stops early when every sequence has finished.

    Args:
        model: a Collider causal LM.
        input_ids: (B, T) int64 prompt ids, T >= 1.
        max_new_tokens: most tokens to add (>= 0).
        do_sample: sample (with ``temperature`` and ``top_p``) instead of greedy argmax.
        top_p: nucleus size in (0, 1]; 1 keeps the whole vocabulary.
        temperature: logits are divided by it before sampling (> 0).
        eos_token_id: an id or ids that end a sequence.
        generator: random generator for sampling (on the model's device).
        use_cache: decode with a :class:`KVCache`; ``False`` recomputes the whole prefix at
            every step (the reference the cache is tested against).

    Returns:
        (B, T + n) ids: the prompts followed by n <= ``max_new_tokens`` new tokens.
    """
    ok = isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2
    if not ok or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be a (B, T) int64/int32 tensor")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per sequence")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if do_sample and not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    device = model.lm_head.weight.device
    ids = input_ids.to(device=device, dtype=torch.int64)
    B, T = ids.shape
    if max_new_tokens == 0:
        return ids
    eos_t = torch.tensor(eos, dtype=torch.int64, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(model, B, T + max_new_tokens) if use_cache else None
    out = [ids]
    step_ids = ids
    for _ in range(max_new_tokens):
        if use_cache:
            logits = cached_forward(model, step_ids, cache, last_only=True)[:, -1]  # (B, V)
        else:
            logits = model(torch.cat(out, dim=1))[:, -1]  # (B, V)
        nxt = _next_token(logits, do_sample, top_p, temperature, generator)  # (B,)
        if eos:
            nxt = torch.where(finished, eos_t[0], nxt)
            finished = finished | torch.isin(nxt, eos_t)
        step_ids = nxt[:, None]
        out.append(step_ids)
        if eos and bool(finished.all()):
            break
    return torch.cat(out, dim=1)
