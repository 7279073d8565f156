"""Shared building blocks: attention, MLPs, decoder layers and the causal LM around them.

Parameter names follow the Hugging Face checkpoints of each architecture (the ``names``
of :class:`ModelConfig`-driven blocks), so ``state_dict()`` keys equal checkpoint keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from collider_autograd import (
    Embedding,
    LayerNorm,
    Linear,
    RMSNorm,
    apply_rotary,
    causal_attention,
    gelu_new,
    linear_cross_entropy,
    rotary_tables,
    swiglu,
)
from collider_models.config import ModelConfig


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    if cfg.norm == "layer":
        return LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    raise ValueError(f"norm must be 'rms' or 'layer', got {cfg.norm!r}")


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary on the first ``rot_dim`` dims."""

    def __init__(self, cfg: ModelConfig, out_name: str = "o_proj"):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.out_name = out_name
        setattr(self, out_name, Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.out_bias))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, layer: int = 0):
        """(B, T, hidden) → (B, T, hidden). With a ``cache`` (inference, see
        :class:`collider_models.generate.KVCache`) the new keys/values are appended to layer
        ``layer`` of it and the queries attend to everything cached."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, Hq, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = causal_attention(q, k, v) if cache is None else cache.attend(layer, q, k, v)  # (B, T, Hq, D)
        return getattr(self, self.out_name)(out.reshape(B, T, -1))  # (B, T, hidden)


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Llama, Qwen2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class GeluMLP(nn.Module):
    """``fc2(gelu_new(fc1(x)))`` (Phi)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_new(self.fc1(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: sequential (attn then MLP, two norms) or parallel (one shared norm)."""

    def __init__(self, cfg: ModelConfig, attn_out_name: str = "o_proj"):
        super().__init__()
        self.parallel = cfg.parallel_block
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, out_name=attn_out_name)
        self.mlp = SwiGLUMLP(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)
        if not self.parallel:
            self.post_attention_layernorm = make_norm(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, layer: int = 0):
        if self.parallel:
            h = self.input_layernorm(x)
            return x + self.self_attn(h, cos, sin, cache, layer) + self.mlp(h)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (the checkpoint's ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig, final_norm_name: str = "norm", attn_out_name: str = "o_proj"):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, attn_out_name) for _ in range(cfg.num_layers))
        self.final_norm_name = final_norm_name
        setattr(self, final_norm_name, make_norm(cfg))

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """(B, T) ids → (B, T, hidden) final hidden states; with a ``cache`` the ids continue
        the cached positions, which the cache then includes."""
        B, T = input_ids.shape
        start = 0 if cache is None else cache.length
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        positions = torch.arange(start, start + T, device=input_ids.device)
        cos, sin = rotary_tables(positions, self.cfg.rot_dim, self.cfg.rope_theta, x.dtype)  # (T, rot_dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        if cache is not None:
            cache.length = start + T
        return getattr(self, self.final_norm_name)(x)


@dataclass
class CausalLMOutput:
    """What :meth:`CausalLM.forward` returns (field names as in ``transformers``' outputs).

    Attributes:
        logits: (B, T, V), when no labels were given; else ``None``.
        loss: 0-dim mean loss over non-ignored positions, when labels were given.
        token_loss: (B, T) fp32 per-position losses, when labels were given.
        labels: (B, T) the shifted labels ``token_loss`` was computed against.
    """

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None
    labels: torch.Tensor | None = None


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T) labels as ``transformers`` takes them → aligned with positions: ``out[:, t] =
    labels[:, t + 1]``, the last position ``ignore_index``."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"labels must be a (B, T) tensor, got {getattr(labels, 'shape', type(labels))}")
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


class CausalLM(nn.Module):
    """Decoder + LM head. ``forward`` follows ``transformers`` (logits, or losses with
    ``labels``); ``token_loss`` gives the per-position CE against aligned labels."""

    def __init__(self, cfg: ModelConfig, final_norm_name: str = "norm", attn_out_name: str = "o_proj"):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, final_norm_name, attn_out_name)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init as Hugging Face does: normal(0, initializer_range), zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (RMSNorm, LayerNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, ignore_index: int = -100
    ) -> CausalLMOutput:
        """The model's forward, in the ``transformers`` convention.

        Without ``labels``: ``(B, T, V)`` logits in ``output.logits``. With ``labels`` (B, T),
        as ``transformers`` takes them (normally the input ids, shifted inside: position t
        predicts ``labels[:, t + 1]``): the per-token losses in ``output.token_loss`` (B, T)
        fp32, the shifted labels they were computed against in ``output.labels`` (the last
        position and ``ignore_index`` entries are ``ignore_index``, loss 0), and the plain mean
        over non-ignored positions in ``output.loss``. The LM head is fused into the loss, so
        no logits are made then. Use ``filtered_mean(output.token_loss, keep)`` for Collider.

        Calling the model (not :meth:`token_loss`) is what arms ``DistributedDataParallel``'s
        and FSDP's hooks.
        """
        if labels is None:
            logits = self.lm_head(self.model(_check_ids(input_ids, self.config.vocab_size)))  # (B, T, V)
            return CausalLMOutput(logits=logits)
        shifted = shift_labels(labels, ignore_index)  # (B, T)
        token_loss = self.token_loss(input_ids, shifted, ignore_index)  # (B, T) fp32
        valid = shifted != ignore_index
        count = valid.sum()
        total = token_loss.sum()  # ignored positions hold 0
        loss = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
        return CausalLMOutput(loss=loss, token_loss=token_loss, labels=shifted)

    def token_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """(B, T) float32 cross-entropy of position t against ``labels[:, t]`` (labels already
        aligned with positions, unlike :meth:`forward`); ignored → 0. Under data-parallel
        wrappers call the wrapper (``ddp(ids, labels=...)``), not this method."""
        hidden = self.model(_check_ids(input_ids, self.config.vocab_size))  # (B, T, hidden)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        return linear_cross_entropy(hidden, self.lm_head.weight, labels, self.lm_head.bias, ignore_index)

    def save_pretrained(self, path) -> None:
        """Write a Hugging Face checkpoint folder (see :func:`collider_models.checkpoint.save_pretrained`)."""
        from collider_models.checkpoint import save_pretrained

        save_pretrained(self, path)


def _check_ids(input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64/int32 tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise IndexError(f"input_ids must lie in [0, {vocab})")
    return input_ids
