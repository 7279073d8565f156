"""Named presets: the real model shapes and small test/demo sizes of each architecture."""

from __future__ import annotations

import copy

_LLAMA = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
    bos_token_id=1, eos_token_id=2, initializer_range=0.02,
)
_QWEN2 = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu", max_position_embeddings=32768,
    rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
    bos_token_id=151643, eos_token_id=151643, initializer_range=0.02,
)
_MISTRAL = dict(
    model_type="mistral", architectures=["MistralForCausalLM"], hidden_act="silu", max_position_embeddings=32768,
    rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False, sliding_window=None,
    bos_token_id=1, eos_token_id=2, initializer_range=0.02,
)
_LLAMA3 = dict(
    _LLAMA, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
    eos_token_id=128001,
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)
_PHI = dict(
    model_type="phi", architectures=["PhiForCausalLM"], hidden_act="gelu_new", max_position_embeddings=2048,
    layer_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.5, tie_word_embeddings=False,
    qk_layernorm=False, bos_token_id=None, eos_token_id=None, initializer_range=0.02,
)

PRESETS: dict[str, dict] = {
    "tinyllama-1.1b": {**_LLAMA, "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
                       "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4},
    "qwen2.5-1.5b": {**_QWEN2, "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                     "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2},
    "llama-3.2-1b": {**_LLAMA3, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
    "mistral-7b": {**_MISTRAL, "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128},
    "phi-1.5": {**_PHI, "vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192,
                "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32},
    # A ~95M-parameter Llama (with an 8192-token vocabulary) for the learning study on one GPU.
    "llama-100m": {**_LLAMA, "vocab_size": 8192, "hidden_size": 768, "intermediate_size": 2048,
                   "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4},
    # Small sizes of the same architectures, for tests and the CPU demo.
    "tinyllama-tiny": {**_LLAMA, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 344,
                       "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2},
    "tinyllama-small": {**_LLAMA, "vocab_size": 128, "hidden_size": 256, "intermediate_size": 688,
                        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2},
    "qwen2.5-tiny": {**_QWEN2, "vocab_size": 512, "hidden_size": 96, "intermediate_size": 256,
                     "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2},
    # Llama 3 rope scaling on a short original context, so that every band of it shows.
    "llama3-tiny": {**_LLAMA3, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 344,
                    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
                    "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 512,
                    "rope_scaling": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=64)},
    # A sliding window shorter than typical test sequences, so that it matters.
    "mistral-tiny": {**_MISTRAL, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
                     "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "sliding_window": 8},
    "phi-tiny": {**_PHI, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 512,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4},
}


def preset_config(name: str) -> dict:
    """A copy of the Hugging Face config dict of preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
