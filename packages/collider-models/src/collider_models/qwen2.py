"""Qwen2 / Qwen2.5: Llama blocks with q/k/v bias, usually tied embeddings, and sliding-window
attention on the layers ``transformers`` assigns it to."""

from __future__ import annotations

from collider_models.blocks import CausalLM
from collider_models.config import (
    COMMON_FIELDS,
    ModelConfig,
    as_float,
    base_fields,
    honoured,
    layer_windows_of,
    no_math,
    only,
    resolve,
    sliding_window_of,
)
from collider_models.registry import register_architecture

QWEN2_FIELDS = {
    **COMMON_FIELDS,
    "num_key_value_heads": honoured(32),
    "max_position_embeddings": honoured(32768),
    "rms_norm_eps": honoured(1e-6),
    "hidden_act": only("silu"),
    "partial_rotary_factor": only(1.0),  # transformers rotates whole heads of this architecture
    "use_sliding_window": honoured(False),
    "sliding_window": honoured(4096),
    "max_window_layers": honoured(28),
    "layer_types": honoured(),
    "use_mrope": no_math(False),  # a Qwen2-VL key; transformers' Qwen2 ignores it
}


def qwen2_config(cfg: dict) -> ModelConfig:
    c = resolve(cfg, QWEN2_FIELDS)
    base = base_fields(cfg, QWEN2_FIELDS)
    # As transformers: the window applies only with use_sliding_window, to the layers from
    # max_window_layers on unless layer_types says which.
    window = sliding_window_of(c) if c["use_sliding_window"] else None
    types = c["layer_types"]
    if types is None:
        first = c["max_window_layers"]
        if isinstance(first, bool) or not isinstance(first, int):
            raise ValueError(f"config max_window_layers must be an integer, got {first!r}")
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(base["num_layers"])]
    return ModelConfig(
        **base,
        norm="rms",
        norm_eps=as_float(c, "rms_norm_eps"),
        mlp="swiglu",
        qkv_bias=True,
        layer_windows=layer_windows_of(types, window, base["num_layers"]),
    )


@register_architecture("qwen2", QWEN2_FIELDS)
def build_qwen2(cfg: dict) -> CausalLM:
    return CausalLM(qwen2_config(cfg))
