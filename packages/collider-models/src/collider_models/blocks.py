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
    gelu_mlp,
    gelu_new,
    linear_cross_entropy,
    multi_linear,
    swiglu,
    swiglu_mlp,
)
from collider_kernels import check_label_values
from collider_models.config import ModelConfig
from collider_models.masks import Layout, layout
from collider_models.rope import Rotary


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    if cfg.norm == "layer":
        return LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    raise ValueError(f"norm must be 'rms' or 'layer', got {cfg.norm!r}")


def plain_linears(*modules: nn.Module) -> bool:
    """The modules are our :class:`~collider_autograd.Linear` with no forward hooks, so a fused
    layer may use their parameters without calling them. A replaced module (an adapter wrapping
    it) or a hook (the dense reference's detach) makes the block call each module instead."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return all(type(m) is Linear and not m._forward_hooks and not m._forward_pre_hooks for m in modules)


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary on the first ``rot_dim`` dims and an
    optional sliding ``window`` (a query sees itself and the ``window - 1`` keys before it)."""

    def __init__(self, cfg: ModelConfig, out_name: str = "o_proj", window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = window
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.out_name = out_name
        setattr(self, out_name, Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.out_bias))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, layer: int = 0,
                key_start: torch.Tensor | None = None):
        """(B, T, hidden) → (B, T, hidden). ``cos``/``sin``: (T, rot_dim) or (B, T, rot_dim);
        ``key_start``: (B, T) first key each query sees (padding, packed documents). With a
        ``cache`` (inference, see :class:`collider_models.generate.KVCache`) the new keys/values
        are appended to layer ``layer`` of it and the queries attend to what is cached."""
        B, T, _ = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if plain_linears(*projections):  # one GEMM: views of one (B, T, q+k+v) output
            q, k, v = multi_linear(x, [p.weight for p in projections], [p.bias for p in projections])
        else:
            q, k, v = (p(x) for p in projections)
        q = q.view(B, T, self.num_heads, self.head_dim)  # (B, T, Hq, D), rotated into new memory
        k = k.view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim).contiguous()  # its own memory: the fused output can go
        if cache is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            out = cache.attend(layer, q, k, v, self.window)  # (B, T, Hq, D)
        else:
            masks = {}
            if self.window is not None and self.window < T:
                masks["window"] = self.window
            if key_start is not None:
                masks.update(key_start=key_start, validate=False)  # valid by construction (masks.layout)
            # Rotated inside: the backward writes dQ, dK, dV into one buffer the q/k/v GEMM reads.
            out = causal_attention(q, k, v, rotary=(cos, sin), **masks)  # (B, T, Hq, D)
        return getattr(self, self.out_name)(out.reshape(B, T, -1))  # (B, T, hidden)


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Llama, Qwen2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused layer (one gate/up GEMM, no saved activation); the three Linear modules hold
        # the parameters under their checkpoint names, and their forwards are not called.
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        if not plain_linears(gate, up, down):
            return down(swiglu(gate(x), up(x)))
        return swiglu_mlp(x, gate.weight, up.weight, down.weight, gate.bias, up.bias, down.bias)


class GeluMLP(nn.Module):
    """``fc2(gelu_new(fc1(x)))`` (Phi)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused layer (no saved activation); the Linear modules hold the parameters under
        # their checkpoint names, and their forwards are not called.
        fc1, fc2 = self.fc1, self.fc2
        if not plain_linears(fc1, fc2):
            return fc2(gelu_new(fc1(x)))
        return gelu_mlp(x, fc1.weight, fc2.weight, fc1.bias, fc2.bias)


class DecoderLayer(nn.Module):
    """Pre-norm block: sequential (attn then MLP, two norms) or parallel (one shared norm)."""

    def __init__(self, cfg: ModelConfig, attn_out_name: str = "o_proj", window: int | None = None):
        super().__init__()
        self.parallel = cfg.parallel_block
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, out_name=attn_out_name, window=window)
        self.mlp = SwiGLUMLP(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)
        if not self.parallel:
            self.post_attention_layernorm = make_norm(cfg)

    @property
    def fuses_adds(self) -> bool:
        """Sequential with RMSNorm: each residual add runs inside the next norm's pass
        (:func:`collider_autograd.add_rms_norm`)."""
        return not self.parallel and isinstance(self.input_layernorm, RMSNorm)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, layer: int = 0,
                key_start: torch.Tensor | None = None, pending: torch.Tensor | None = None, defer: bool = False):
        """(B, T, hidden) residual stream → the stream after this layer.

        With :attr:`fuses_adds`, ``pending`` is a branch output not yet added to ``x`` (the
        previous layer's MLP output), added inside this layer's first norm; ``defer`` returns
        ``(stream, mlp output)`` with the last add left to the next norm. Values are those of
        the unfused block."""
        if not self.fuses_adds:
            if pending is not None:
                x = x + pending
            if self.parallel:
                h = self.input_layernorm(x)
                out = x + self.self_attn(h, cos, sin, cache, layer, key_start) + self.mlp(h)
            else:
                x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, key_start)
                out = x + self.mlp(self.post_attention_layernorm(x))
            return (out, None) if defer else out
        h, x = self.input_layernorm(pending, residual=x) if pending is not None else (self.input_layernorm(x), x)
        a = self.self_attn(h, cos, sin, cache, layer, key_start)
        h, x = self.post_attention_layernorm(a, residual=x)  # x + a, and its norm, in one pass
        m = self.mlp(h)
        return (x, m) if defer else x + m


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (the checkpoint's ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig, final_norm_name: str = "norm", attn_out_name: str = "o_proj"):
        super().__init__()
        self.cfg = cfg
        self.rotary = Rotary(cfg.rope)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, attn_out_name, w) for w in cfg.layer_windows)
        self.final_norm_name = final_norm_name
        setattr(self, final_norm_name, make_norm(cfg))

    def forward(self, input_ids: torch.Tensor, cache=None, lay: Layout | None = None) -> torch.Tensor:
        """(B, T) ids → (B, T, hidden) final hidden states.

        ``lay`` (a :class:`~collider_models.masks.Layout`) gives the rotary positions and the
        keys each query sees; default: one document per row at positions ``0 .. T-1``. With a
        ``cache`` the ids continue the cached ones (the cache masks the keys) and are appended.
        """
        B, T = input_ids.shape
        if lay is None:
            lay = layout((B, T), input_ids.device, past=0 if cache is None else cache.length)
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        cos, sin = self.rotary.tables(lay.positions, x.dtype)  # (T, rot_dim) or (B, T, rot_dim)
        pending = None  # a layer's MLP output, added to the stream inside the next norm's pass
        for i, layer in enumerate(self.layers):
            x, pending = layer(x, cos, sin, cache, i, lay.key_start, pending=pending, defer=True)
        if cache is not None:
            cache.length += T
        norm = getattr(self, self.final_norm_name)  # pending only comes from RMSNorm layers (fuses_adds)
        return norm(x) if pending is None else norm(pending, residual=x)[0]


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

    def to_tuple(self) -> tuple:
        """The fields that are set, in order (``loss`` first when it is set), as ``transformers``'
        outputs index them."""
        order = ("loss", "logits", "token_loss", "labels")
        return tuple(getattr(self, k) for k in order if getattr(self, k) is not None)

    def __getitem__(self, key):
        """``output["loss"]`` or ``output[0]``, as code written for ``transformers`` reads outputs."""
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


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
    ``labels``); ``token_loss`` gives the per-position CE against aligned labels.

    Both take ``attention_mask`` (padding), ``position_ids`` (as ``transformers``; restarting
    positions mark packed documents) and ``document_ids`` (a document id per token), see
    :func:`collider_models.masks.layout`. Padded positions get no loss (their labels are
    ignored), so ``filtered_mean(..., labels=output.labels)`` refuses to keep them.
    """

    #: Keep the LM head's logits from the forward for the backward instead of recomputing them:
    #: one LM-head GEMM less per step for ``tokens * vocab`` elements held until the backward
    #: (e.g. 1 GiB for 16k tokens of a 32k vocabulary in bf16). Off by default.
    keep_logits: bool = False

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
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> CausalLMOutput:
        """The model's forward, in the ``transformers`` convention.

        Without ``labels``: ``(B, T, V)`` logits in ``output.logits``. With ``labels`` (B, T),
        as ``transformers`` takes them (normally the input ids, shifted inside: position t
        predicts ``labels[:, t + 1]``): the per-token losses in ``output.token_loss`` (B, T)
        fp32, the shifted labels they were computed against in ``output.labels``, and the
        plain mean over non-ignored positions in ``output.loss``. The LM head is fused into
        the loss, so no logits are made then. Use ``filtered_mean(output.token_loss, keep)``
        for Collider.

        A shifted label is ``ignore_index`` (loss 0) at the last position, where ``labels``
        holds ``ignore_index``, at padding, where the target token is padding and where the
        target begins another document (the last token of a document predicts nothing). So
        padded and cross-document targets never count, even if ``labels`` holds real ids
        there (``transformers`` would count them).

        Args:
            input_ids: (B, T) token ids.
            labels: (B, T) labels as ``transformers`` takes them, or ``None``.
            attention_mask: (B, T) 1 for tokens, 0 for padding.
            position_ids: (B, T) or (1, T) rotary positions; a position that does not follow
                the previous one by 1 starts a new document.
            document_ids: (B, T) document id per token; positions restart at each document
                unless ``position_ids`` are given.
            ignore_index: label value that contributes no loss.

        Calling the model (not :meth:`token_loss`) is what arms ``DistributedDataParallel``'s
        and FSDP's hooks.
        """
        ids = _check_ids(input_ids, self.config.vocab_size)
        lay = layout(ids.shape, ids.device, attention_mask=attention_mask, position_ids=position_ids,
                     document_ids=document_ids)
        if labels is None:
            if ids.numel() == 0:
                empty = self._empty((*ids.shape, self.config.vocab_size), self.lm_head.weight.dtype)
                return CausalLMOutput(logits=empty)
            return CausalLMOutput(logits=self.lm_head(self._hidden(ids, lay)))  # (B, T, V)
        _check_labels(labels, ids, self.config.vocab_size, ignore_index)
        shifted = _ignore_outside(shift_labels(labels, ignore_index), lay, ignore_index, shifted=True)  # (B, T)
        token_loss = self._token_loss(ids, shifted, lay, ignore_index)  # (B, T) fp32
        count = (shifted != ignore_index).sum()
        total = token_loss.sum()  # ignored positions hold 0
        loss = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
        return CausalLMOutput(loss=loss, token_loss=token_loss, labels=shifted)

    def token_loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int = -100,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) float32 cross-entropy of position t against ``labels[:, t]`` (labels already
        aligned with positions, unlike :meth:`forward`); ignored and padded positions → 0.
        ``attention_mask``, ``position_ids`` and ``document_ids`` as in :meth:`forward`. Under
        data-parallel wrappers call the wrapper (``ddp(ids, labels=...)``), not this method."""
        ids = _check_ids(input_ids, self.config.vocab_size)
        _check_labels(labels, ids, self.config.vocab_size, ignore_index)
        lay = layout(ids.shape, ids.device, attention_mask=attention_mask, position_ids=position_ids,
                     document_ids=document_ids)
        return self._token_loss(ids, _ignore_outside(labels, lay, ignore_index, shifted=False), lay, ignore_index)

    def _hidden(self, ids: torch.Tensor, lay: Layout) -> torch.Tensor:
        if self.config.dropout and self.training and torch.is_grad_enabled():
            fields = ", ".join(f"{k}={v}" for k, v in sorted(self.config.dropout.items()))
            raise ValueError(
                f"the config asks for dropout ({fields}), which Collider models do not apply; call "
                "model.config.train_without_dropout() to train without it, or model.eval() for inference"
            )
        return self.model(ids, lay=lay)  # (B, T, hidden)

    def _token_loss(self, ids, labels, lay, ignore_index) -> torch.Tensor:
        if ids.numel() == 0:
            return self._empty(tuple(ids.shape), torch.float32)
        hidden = self._hidden(ids, lay)  # (B, T, hidden)
        # labels were checked on entry, before the forward was queued (no sync at its end)
        return linear_cross_entropy(hidden, self.lm_head.weight, labels, self.lm_head.bias, ignore_index,
                                    keep_logits=self.keep_logits, validate=False)

    def _empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """Zeros of an empty batch (B = 0 or T = 0), connected to every parameter so that a
        backward gives each one a zero gradient, as a step that keeps nothing does."""
        zero = sum(p.reshape(-1)[:1].sum() for p in self.parameters()) * 0  # 0-dim
        return torch.zeros(shape, dtype=dtype, device=self.lm_head.weight.device) + zero.to(dtype)

    def save_pretrained(self, path, **kwargs) -> None:
        """Write a Hugging Face checkpoint folder (see :func:`collider_models.checkpoint.save_pretrained`)."""
        from collider_models.checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)


def _check_ids(input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64/int32 tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if input_ids.numel():
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one device sync
        if lo < 0 or hi >= vocab:
            raise IndexError(f"input_ids must lie in [0, {vocab})")
    return input_ids


def _check_labels(labels, ids: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64/int32 tensor, got {getattr(labels, 'dtype', type(labels))}")
    if labels.shape != ids.shape:
        raise ValueError(f"labels must have input_ids' shape {tuple(ids.shape)}, got {tuple(labels.shape)}")
    if labels.device != ids.device:
        raise ValueError(f"labels must be on input_ids' device {ids.device}, got {labels.device}")
    check_label_values(labels, vocab, ignore_index)


def loss_labels(
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The (B, T) shifted labels :meth:`CausalLM.forward` computes its losses against (its
    ``output.labels``), from the labels and masks alone: padded positions, padded targets and
    targets in the next document are ``ignore_index``. Counting ``!= ignore_index`` gives the
    positions that can be kept, e.g. for a normaliser known before the forward."""
    lay = layout(labels.shape, labels.device, attention_mask=attention_mask, position_ids=position_ids,
                 document_ids=document_ids)
    return _ignore_outside(shift_labels(labels, ignore_index), lay, ignore_index, shifted=True)


def _ignore_outside(labels: torch.Tensor, lay: Layout, ignore_index: int, *, shifted: bool) -> torch.Tensor:
    """``labels`` with padded positions (and, for shifted labels, padded or next-document
    targets) set to ``ignore_index``."""
    drop = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    if lay.real is not None:
        drop |= ~lay.real
        if shifted:
            drop[:, :-1] |= ~lay.real[:, 1:]
    if shifted and lay.new_doc is not None:
        drop[:, :-1] |= lay.new_doc[:, 1:]
    return labels.masked_fill(drop, ignore_index) if bool(drop.any()) else labels
