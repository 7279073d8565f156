"""Every config field transformers accepts is honoured, rejected unless it has a supported
value, refused for training (dropout) or declared free of effect on the math; honoured fields
compute what transformers computes with them."""

import pytest
import torch

import collider_models
from collider_models.config import DROPOUT, HONOURED, NO_MATH, REJECTED_UNLESS
from collider_models.registry import ARCHITECTURE_FIELDS

transformers = pytest.importorskip("transformers", reason="transformers is needed for parity tests")

CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "phi": transformers.PhiConfig,
}

# Non-default values of every honoured field, each compared with transformers (logits).
_LINEAR = {"rope_type": "linear", "factor": 2.0}
_SHAPE = {"vocab_size": 77, "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 2}
_ROPE_CASES = [
    {"rope_theta": 777.0},
    {"rope_parameters": {**_LINEAR, "rope_theta": 500.0}, "rope_theta": None},
    {"rope_scaling": {"type": "dynamic", "factor": 3.0}, "max_position_embeddings": 6},
    {"rope_scaling": {"rope_type": "yarn", "factor": 3.0}, "original_max_position_embeddings": 5,
     "max_position_embeddings": 20},
]
HONOURED_CASES = {
    "llama": [_SHAPE, {"attention_bias": True}, {"mlp_bias": True}, {"head_dim": 32}, {"tie_word_embeddings": True},
              {"rms_norm_eps": 0.5}, {"num_key_value_heads": 8}, {"partial_rotary_factor": 1.0}, *_ROPE_CASES],
    "mistral": [_SHAPE, {"sliding_window": 5}, {"sliding_window": None}, {"head_dim": 32},
                {"tie_word_embeddings": True}, {"rms_norm_eps": 0.5}, *_ROPE_CASES],
    "qwen2": [_SHAPE, {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
              {"use_sliding_window": True, "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"]},
              {"head_dim": 32}, {"tie_word_embeddings": False}, {"rms_norm_eps": 0.5}, *_ROPE_CASES],
    "phi": [{**_SHAPE, "num_key_value_heads": 4}, {"head_dim": 16}, {"tie_word_embeddings": True},
            {"layer_norm_eps": 0.5}, {"partial_rotary_factor": 0.25}, *_ROPE_CASES],
}
# Honoured fields checked elsewhere: the architecture itself, the random init (below) and the
# load dtype (test_checkpoint.py).
HONOURED_ELSEWHERE = {"model_type", "initializer_range", "dtype", "torch_dtype"}
# A value each rejected-unless field does not accept.
BAD_VALUES = {"hidden_act": "gelu", "is_encoder_decoder": True, "qk_layernorm": True, "partial_rotary_factor": 0.5,
              "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}


@pytest.mark.parametrize("arch", list(CONFIG_CLASSES))
def test_every_transformers_field_is_classified(arch, tiny_dict):
    fields = ARCHITECTURE_FIELDS[arch]
    cls = CONFIG_CLASSES[arch]
    keys = set(cls().to_dict()) | set(cls(**tiny_dict(arch)).to_dict())
    unclassified = sorted(keys - set(fields))
    assert not unclassified, f"{arch}: classify these config fields in collider_models.{arch}: {unclassified}"
    assert {f.kind for f in fields.values()} <= {HONOURED, REJECTED_UNLESS, DROPOUT, NO_MATH}


@pytest.mark.parametrize("arch", list(CONFIG_CLASSES))
def test_every_honoured_field_has_a_parity_case(arch):
    honoured = {k for k, f in ARCHITECTURE_FIELDS[arch].items() if f.kind == HONOURED}
    covered = set().union(*HONOURED_CASES[arch]) | HONOURED_ELSEWHERE
    assert honoured <= covered, f"{arch}: add parity cases for {sorted(honoured - covered)}"


@pytest.mark.parametrize("arch, case", [(a, i) for a, cases in HONOURED_CASES.items() for i in range(len(cases))])
def test_honoured_fields_match_transformers(arch, case, make_ours, make_hf):
    overrides = HONOURED_CASES[arch][case]
    if "rope_parameters" in overrides or "rope_scaling" in overrides:
        overrides = {"rope_parameters": None, "rope_scaling": None, **overrides}
    ours = make_ours(arch, seed=case, **overrides)
    hf = make_hf(arch, seed=case, **overrides)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected
    ids = torch.randint(0, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(case))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", list(CONFIG_CLASSES))
def test_rejected_fields_name_themselves(arch, tiny_dict):
    rejected = {k: f for k, f in ARCHITECTURE_FIELDS[arch].items() if f.kind == REJECTED_UNLESS}
    assert rejected.keys() <= BAD_VALUES.keys()
    for key, spec in rejected.items():
        for good in spec.allowed:  # every accepted value builds
            collider_models.from_config(tiny_dict(arch, **{key: good}))
        with pytest.raises(ValueError, match=f"config {key}="):
            collider_models.from_config(tiny_dict(arch, **{key: BAD_VALUES[key]}))


@pytest.mark.parametrize("arch", list(CONFIG_CLASSES))
def test_dropout_is_refused_for_training(arch, tiny_dict):
    drops = [k for k, f in ARCHITECTURE_FIELDS[arch].items() if f.kind == DROPOUT]
    assert "attention_dropout" in drops
    for key in drops:
        model = collider_models.from_config(tiny_dict(arch, **{key: 0.1}))
        ids = torch.randint(0, model.config.vocab_size, (1, 5))
        with pytest.raises(ValueError, match=f"{key}=0.1"):
            model(ids, labels=ids)
        with torch.no_grad():
            model(ids)  # no gradient: no training step
        model.eval()
        model(ids)  # inference
        model.train()
        model.config.train_without_dropout()
        model(ids, labels=ids).loss.backward()
        collider_models.from_config(tiny_dict(arch, **{key: 0.0}))(ids, labels=ids)
        with pytest.raises(ValueError, match=key):
            collider_models.from_config(tiny_dict(arch, **{key: 1.5}))


def test_unknown_keys_are_ignored_as_transformers_does(tiny_dict):
    model = collider_models.from_config(tiny_dict("llama", some_future_key=3))
    assert model.config.hf_config["some_future_key"] == 3


def test_architecture_defaults_follow_transformers():
    # Absent keys take transformers' defaults for the architecture, not another's.
    base = {"vocab_size": 64, "hidden_size": 128, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 32}
    for arch, cls in CONFIG_CLASSES.items():
        cfg = collider_models.from_config({"model_type": arch, **base}).config
        ref = cls(**base)
        assert cfg.num_kv_heads == ref.num_key_value_heads, arch
        assert cfg.rope_theta == ref.rope_parameters["rope_theta"], arch
        assert cfg.rot_dim == int(cfg.head_dim * ref.rope_parameters.get("partial_rotary_factor", 1.0)), arch
        assert cfg.norm_eps == getattr(ref, "rms_norm_eps", getattr(ref, "layer_norm_eps", None)), arch
        assert cfg.tie_word_embeddings == ref.tie_word_embeddings, arch
    assert collider_models.from_config({"model_type": "mistral", **base}).config.layer_windows == (4096,)


@pytest.mark.parametrize("arch", list(CONFIG_CLASSES))
def test_initializer_range_is_honoured(arch, tiny_dict):
    torch.manual_seed(0)
    model = collider_models.from_config(tiny_dict(arch, initializer_range=0.2))
    std = model.model.layers[0].mlp.state_dict()
    w = next(v for k, v in std.items() if k.endswith("weight"))
    assert abs(w.std().item() - 0.2) < 0.02


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "multiple of num_key_value_heads"),
        ({"hidden_size": "128"}, "hidden_size must be an integer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be an integer >= 1"),
        ({"vocab_size": None}, "missing required keys \\['vocab_size'\\]"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a number"),
        ({"sliding_window": 0}, "sliding_window must be a positive integer"),
    ],
)
def test_malformed_values(overrides, match, tiny_dict):
    with pytest.raises(ValueError, match=match):
        collider_models.from_config(tiny_dict("mistral", **overrides))


def test_qwen2_sliding_layers_need_a_window(tiny_dict):
    with pytest.raises(ValueError, match="no sliding window"):
        collider_models.from_config(tiny_dict("qwen2", layer_types=["sliding_attention", "full_attention"]))
    with pytest.raises(ValueError, match="one type per layer"):
        collider_models.from_config(tiny_dict("qwen2", layer_types=["full_attention"]))
    with pytest.raises(ValueError, match="chunked_attention"):
        collider_models.from_config(tiny_dict("qwen2", layer_types=["chunked_attention"] * 2))


def test_mistral_layer_types_must_agree(tiny_dict):
    collider_models.from_config(tiny_dict("mistral", layer_types=["sliding_attention"] * 2))
    with pytest.raises(ValueError, match="layer_types disagrees"):
        collider_models.from_config(tiny_dict("mistral", layer_types=["full_attention", "sliding_attention"]))
