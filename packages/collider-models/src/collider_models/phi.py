"""Phi-1.5 / Phi-2: LayerNorm with bias, parallel attention + MLP on one norm, partial rotary,
fc1 → gelu_new → fc2, biases everywhere including the LM head."""

from __future__ import annotations

from collider_models.blocks import CausalLM
from collider_models.config import COMMON_FIELDS, ModelConfig, as_float, base_fields, dropout, honoured, only, resolve
from collider_models.registry import register_architecture

PHI_FIELDS = {
    **COMMON_FIELDS,
    "max_position_embeddings": honoured(2048),
    "layer_norm_eps": honoured(1e-5),
    "hidden_act": only("gelu_new", "gelu_pytorch_tanh"),  # the same tanh approximation of GELU
    "qk_layernorm": only(False),
    "resid_pdrop": dropout(),
    "embd_pdrop": dropout(),
}


def phi_config(cfg: dict) -> ModelConfig:
    c = resolve(cfg, PHI_FIELDS)
    return ModelConfig(
        **base_fields(cfg, PHI_FIELDS, default_partial=0.5, allow_partial=True),
        norm="layer",
        norm_eps=as_float(c, "layer_norm_eps"),
        mlp="gelu_new",
        parallel_block=True,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        lm_head_bias=True,
    )


@register_architecture("phi", PHI_FIELDS)
def build_phi(cfg: dict) -> CausalLM:
    return CausalLM(phi_config(cfg), final_norm_name="final_layernorm", attn_out_name="dense")
