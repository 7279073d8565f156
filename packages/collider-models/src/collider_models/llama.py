"""Llama (TinyLlama, Llama 2/3): RMSNorm, SwiGLU, grouped-query attention, untied LM head."""

from __future__ import annotations

from collider_models.blocks import CausalLM
from collider_models.config import COMMON_FIELDS, ModelConfig, as_float, base_fields, honoured, no_math, only, resolve
from collider_models.registry import register_architecture

LLAMA_FIELDS = {
    **COMMON_FIELDS,
    "max_position_embeddings": honoured(2048),
    "rms_norm_eps": honoured(1e-6),
    "hidden_act": only("silu"),
    "partial_rotary_factor": only(1.0),  # transformers rotates whole heads of this architecture
    "attention_bias": honoured(False),
    "mlp_bias": honoured(False),
    "pretraining_tp": no_math(1),  # transformers >= 5 ignores it; it only split the matmuls before
}


def llama_config(cfg: dict) -> ModelConfig:
    c = resolve(cfg, LLAMA_FIELDS)
    bias = bool(c["attention_bias"])
    return ModelConfig(
        **base_fields(cfg, LLAMA_FIELDS),
        norm="rms",
        norm_eps=as_float(c, "rms_norm_eps"),
        mlp="swiglu",
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bool(c["mlp_bias"]),
    )


@register_architecture("llama", LLAMA_FIELDS)
def build_llama(cfg: dict) -> CausalLM:
    return CausalLM(llama_config(cfg))
