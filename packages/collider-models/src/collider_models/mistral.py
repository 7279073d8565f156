"""Mistral: Llama blocks without biases, with an optional sliding window on every layer
(``sliding_window: null`` is plain causal attention)."""

from __future__ import annotations

from collider_models.blocks import CausalLM
from collider_models.config import (
    COMMON_FIELDS,
    ModelConfig,
    as_float,
    base_fields,
    honoured,
    only,
    resolve,
    sliding_window_of,
)
from collider_models.registry import register_architecture

MISTRAL_FIELDS = {
    **COMMON_FIELDS,
    "num_key_value_heads": honoured(8),
    "max_position_embeddings": honoured(4096 * 32),
    "rms_norm_eps": honoured(1e-6),
    "hidden_act": only("silu"),
    "partial_rotary_factor": only(1.0),  # transformers rotates whole heads of this architecture
    "sliding_window": honoured(4096),
}


def mistral_config(cfg: dict) -> ModelConfig:
    c = resolve(cfg, MISTRAL_FIELDS)
    window = sliding_window_of(c)
    base = base_fields(cfg, MISTRAL_FIELDS)
    types = cfg.get("layer_types")
    if types is not None:
        # transformers' Mistral applies config.sliding_window to every layer and ignores layer_types.
        expected = ["sliding_attention" if window is not None else "full_attention"] * base["num_layers"]
        if list(types) != expected:
            raise ValueError(
                "config layer_types disagrees with sliding_window for model_type 'mistral', which applies "
                "sliding_window to every layer; remove layer_types or make them match"
            )
    return ModelConfig(
        **base,
        norm="rms",
        norm_eps=as_float(c, "rms_norm_eps"),
        mlp="swiglu",
        layer_windows=(window,) * base["num_layers"],
    )


@register_architecture("mistral", MISTRAL_FIELDS)
def build_mistral(cfg: dict) -> CausalLM:
    return CausalLM(mistral_config(cfg))
