"""Llama (TinyLlama): RMSNorm, SwiGLU, grouped-query attention, untied LM head."""

from __future__ import annotations

from collider_models.blocks import CausalLM
from collider_models.config import ModelConfig, common_fields, rope_theta_of
from collider_models.registry import register_architecture


def llama_config(cfg: dict) -> ModelConfig:
    bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        **common_fields(cfg),
        rope_theta=rope_theta_of(cfg, 10000.0),
        norm="rms",
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


@register_architecture("llama")
def build_llama(cfg: dict) -> CausalLM:
    return CausalLM(llama_config(cfg))
