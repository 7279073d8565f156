"""Qwen2 / Qwen2.5: Llama blocks with q/k/v bias, tied embeddings, rope θ 1e6."""

from __future__ import annotations

from collider_models.blocks import CausalLM
from collider_models.config import ModelConfig, common_fields, rope_theta_of
from collider_models.registry import register_architecture


def qwen2_config(cfg: dict) -> ModelConfig:
    return ModelConfig(
        **common_fields(cfg),
        rope_theta=rope_theta_of(cfg, 1000000.0),
        norm="rms",
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        qkv_bias=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


@register_architecture("qwen2")
def build_qwen2(cfg: dict) -> CausalLM:
    return CausalLM(qwen2_config(cfg))
