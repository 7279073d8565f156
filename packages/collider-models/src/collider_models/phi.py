"""Phi-1.5: LayerNorm with bias, parallel attention + MLP on one norm, partial rotary,
fc1 → gelu_new → fc2, biases everywhere including the LM head."""

from __future__ import annotations

from collider_models.blocks import CausalLM
from collider_models.config import ModelConfig, common_fields, partial_rotary_of, rope_theta_of
from collider_models.registry import register_architecture


def phi_config(cfg: dict) -> ModelConfig:
    if cfg.get("qk_layernorm"):
        raise ValueError("phi configs with qk_layernorm=True are not supported")
    act = cfg.get("hidden_act", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"phi hidden_act must be 'gelu_new', got {act!r}")
    return ModelConfig(
        **common_fields(cfg),
        rope_theta=rope_theta_of(cfg, 10000.0),
        partial_rotary_factor=partial_rotary_of(cfg, 0.5),
        norm="layer",
        norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        mlp="gelu_new",
        parallel_block=True,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        lm_head_bias=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


@register_architecture("phi")
def build_phi(cfg: dict) -> CausalLM:
    return CausalLM(phi_config(cfg), final_norm_name="final_layernorm", attn_out_name="dense")
