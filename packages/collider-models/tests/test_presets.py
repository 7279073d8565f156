"""Every preset is a config transformers builds the same model from: parameter names and shapes
(real sizes on the meta device), rotary settings and windows."""

import pytest
import torch

import collider_models

transformers = pytest.importorskip("transformers", reason="transformers is needed for parity tests")


@pytest.mark.parametrize("name", sorted(collider_models.PRESETS))
def test_preset_matches_transformers(name):
    cfg = collider_models.preset_config(name)
    with torch.device("meta"):
        ours = collider_models.from_config(cfg)
        hf_cfg = transformers.AutoConfig.for_model(**cfg)
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours_shapes == hf_shapes
    assert ours.config.rope.rope_type == hf_cfg.rope_parameters["rope_type"]
    assert ours.config.rope_theta == hf_cfg.rope_parameters["rope_theta"]
    assert ours.config.tie_word_embeddings == hf_cfg.tie_word_embeddings
    window = getattr(hf_cfg, "sliding_window", None)
    types = getattr(hf_cfg, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * len(
        ours.config.layer_windows)
    assert ours.config.layer_windows == tuple(window if t == "sliding_attention" else None for t in types)


def test_real_llama3_and_mistral_shapes():
    with torch.device("meta"):
        llama = collider_models.from_preset("llama-3.2-1b")
        mistral = collider_models.from_preset("mistral-7b")
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    assert round(sum(p.numel() for p in llama.parameters()) / 1e9, 2) == 1.24
    assert round(sum(p.numel() for p in mistral.parameters()) / 1e9, 2) == 7.25
    assert llama.config.rope.params["factor"] == 32.0 and mistral.config.layer_windows == (None,) * 32
