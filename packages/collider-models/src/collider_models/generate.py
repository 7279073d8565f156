"""Text generation with a key/value cache: greedy decoding and top-p sampling.

Inference only. The cached forward runs the model's own blocks with a :class:`KVCache`:
each attention layer hands its new keys and values to :meth:`KVCache.attend`, which appends
them and attends the new queries over the cached positions with
:func:`torch.nn.functional.scaled_dot_product_attention`, masking padding and each layer's
sliding window. Padded prompts follow ``transformers``: rotary positions count the real
tokens of each prompt (``attention_mask.cumsum(-1) - 1``, padding at 0) and every new token
takes the position after the previous one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from collider_models.masks import Layout, layout, shared_rows


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
        real: (B, max_length) bool, False at cached padding.
        last_position: (B,) rotary position of each sequence's last cached token.
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
        self.real = torch.ones(batch, max_length, dtype=torch.bool, device=device)
        self.last_position = torch.full((batch,), -1, dtype=torch.int64, device=device)
        self.batch, self.max_length, self.length = batch, max_length, 0
        self.padded = False
        self._masks: dict = {}

    def _mask(self, T: int, window: int | None):
        """(B, 1, T, end) bool mask of the keys each new query sees and (B, 1, T, 1) queries that
        see none (or ``None``); ``None`` for plain causal attention."""
        start, end = self.length, self.length + T
        if not self.padded and (window is None or window >= end):
            return None
        key = (start, T, window)
        if any(k[0] != start for k in self._masks):
            self._masks = {}  # masks of an earlier step
        if key not in self._masks:
            q = torch.arange(start, end, device=self.real.device)[:, None]  # (T, 1)
            k = torch.arange(end, device=self.real.device)[None, :]  # (1, end)
            visible = k <= q
            if window is not None:
                visible = visible & (q - k < window)
            mask = visible[None] & self.real[:, None, :end]  # (B, T, end)
            # A query with no real key in view (padding) gets a zero output, as from PyTorch's SDPA
            # in transformers; it only feeds padding or a prediction made at a padded position.
            empty = ~mask.any(-1, keepdim=True)  # (B, T, 1)
            self._masks[key] = ((mask | empty)[:, None], empty[:, None] if bool(empty.any()) else None)
        return self._masks[key]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor:
        """Append new keys/values (B, T, Hkv, D) at positions ``length ..`` of ``layer`` and
        attend the new queries (B, T, Hq, D) over the cached positions they see (causal,
        not padding, within ``window`` if given); → (B, T, Hq, D)."""
        B, T, Hq, _ = q.shape
        start, end = self.length, self.length + T
        self.keys[layer][:, :, start:end] = k.transpose(1, 2)
        self.values[layer][:, :, start:end] = v.transpose(1, 2)
        keys = self.keys[layer][:, :, :end]  # (B, Hkv, end, D)
        values = self.values[layer][:, :, :end]
        group = Hq // keys.shape[1]
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)  # (B, Hq, end, D)
            values = values.repeat_interleave(group, dim=1)
        qh = q.transpose(1, 2)  # (B, Hq, T, D)
        masks = self._mask(T, window)
        if masks is not None:
            mask, empty = masks
            out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask)
            if empty is not None:
                out = out.masked_fill(empty, 0.0)
        elif start == 0:
            out = F.scaled_dot_product_attention(qh, keys, values, is_causal=True)
        elif T == 1:
            out = F.scaled_dot_product_attention(qh, keys, values)
        else:
            pos_q = torch.arange(start, end, device=q.device)
            causal = pos_q[:, None] >= torch.arange(end, device=q.device)[None, :]  # (T, end)
            out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=causal)
        return out.transpose(1, 2)  # (B, T, Hq, D)


@torch.no_grad()
def cached_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    cache: KVCache,
    *,
    attention_mask: torch.Tensor | None = None,
    last_only: bool = False,
) -> torch.Tensor:
    """Logits of new tokens that continue the cached ones; appends them to ``cache``.

    Args:
        model: a Collider causal LM.
        input_ids: (B, T) new token ids, at cache slots ``cache.length .. cache.length + T - 1``.
        cache: the :class:`KVCache` of the tokens so far (empty for a prompt).
        attention_mask: (B, T) 1 for tokens, 0 for padding (default: no padding). Rotary
            positions are ``attention_mask.cumsum(-1) - 1`` (padding at 0) for a prompt, and
            continue from each sequence's last position afterwards, as in ``transformers``.
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
    lay = layout((B, T), input_ids.device, attention_mask=attention_mask)
    real = lay.real
    if start == 0 and real is not None:
        positions = _prompt_positions(real)  # (B, T)
    else:
        positions = cache.last_position[:, None] + 1 + torch.arange(T, device=input_ids.device)  # (B, T)
    if real is not None:
        cache.real[:, start:start + T] = real
        cache.padded = True
    cache.last_position = positions[:, -1].clone() if T else cache.last_position
    x = model.model(input_ids, cache, Layout(shared_rows(positions)))  # advances cache.length
    if last_only:
        x = x[:, -1:]
    return model.lm_head(x)


def _prompt_positions(real: torch.Tensor) -> torch.Tensor:
    """(B, T) bool real tokens of padded prompts → rotary positions as ``transformers`` gives
    them: the count of real tokens before each one, padding at 0."""
    return (real.long().cumsum(-1) - 1).masked_fill(~real, 0)


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
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    top_p: float = 1.0,
    temperature: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Prompts of different lengths are padded, on the left as for ``transformers``' generation
    (``tokenizer.padding_side = "left"``), and marked by ``attention_mask``; padding is never
    attended to and rotary positions count real tokens only, as ``transformers`` does. Once a
    sequence emits an end-of-sequence token it is padded with that token (the first of
    ``eos_token_id``); decoding stops early when every sequence has finished.

    Args:
        model: a Collider causal LM.
        input_ids: (B, T) int64 prompt ids, T >= 1 (B = 0 returns them unchanged).
        max_new_tokens: most tokens to add (>= 0).
        attention_mask: (B, T) 1 for prompt tokens, 0 for padding; default: no padding.
        do_sample: sample (with ``temperature`` and ``top_p``) instead of greedy argmax.
        top_p: nucleus size in (0, 1]; 1 keeps the whole vocabulary.
        temperature: logits are divided by it before sampling (> 0).
        eos_token_id: an id or ids that end a sequence.
        generator: random generator for sampling (on the model's device).
        use_cache: decode with a :class:`KVCache`; ``False`` recomputes the whole prefix at
            every step with the model's forward (the reference the cache is tested against;
            it takes left or right padding, not padding followed by new tokens).

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
    mask = None
    if attention_mask is not None:
        mask = layout((B, T), device, attention_mask=attention_mask).real  # validated; None if all ones
    if max_new_tokens == 0 or B == 0:
        return ids
    eos_t = torch.tensor(eos, dtype=torch.int64, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(model, B, T + max_new_tokens) if use_cache else None
    if mask is not None and not use_cache:
        positions = _prompt_positions(mask)  # (B, T)
    out = [ids]
    step_ids, step_mask = ids, mask
    for _ in range(max_new_tokens):
        if use_cache:
            logits = cached_forward(model, step_ids, cache, attention_mask=step_mask, last_only=True)[:, -1]  # (B, V)
        elif mask is None:
            logits = model(torch.cat(out, dim=1)).logits[:, -1]  # (B, V)
        else:
            full = torch.cat(out, dim=1)
            n = full.shape[1] - T
            steps = positions[:, -1:] + torch.arange(1, n + 1, device=device)  # (B, n)
            full_mask = torch.cat([mask, torch.ones(B, n, dtype=torch.bool, device=device)], dim=1)
            logits = model(full, attention_mask=full_mask, position_ids=torch.cat([positions, steps], 1)).logits[:, -1]
        nxt = _next_token(logits, do_sample, top_p, temperature, generator)  # (B,)
        if eos:
            nxt = torch.where(finished, eos_t[0], nxt)
            finished = finished | torch.isin(nxt, eos_t)
        step_ids, step_mask = nxt[:, None], None
        out.append(step_ids)
        if eos and bool(finished.all()):
            break
    return torch.cat(out, dim=1)
