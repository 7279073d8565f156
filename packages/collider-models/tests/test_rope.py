"""Rotary scaling as transformers computes it: every rope type, both config formats, every
architecture; logits, per-token losses, greedy generation and the gradient contract."""

import pytest
import torch
import torch.nn.functional as F

import collider_models
from collider_autograd import densify_counts, filtered_mean, reset_densify_counts
from collider_models.reference import detach_filtered_kv, masked_mean
from collider_models.rope import ROPE_TYPES, rope_spec

transformers = pytest.importorskip("transformers", reason="transformers is needed for parity tests")

ARCHS = ["llama", "mistral", "qwen2", "phi"]
MAX_POS = 8  # short, so that T = 13 runs past it (dynamic and longrope switch there)


def _rope(kind: str, dim: int) -> dict:
    """rope parameters of ``kind`` for a model rotating ``dim`` dims of each head."""
    half = dim // 2
    return {
        "linear": {"rope_type": "linear", "factor": 2.5},
        "dynamic": {"rope_type": "dynamic", "factor": 3.0},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16},
        "yarn-mscale": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 32,
                        "mscale": 1.3, "mscale_all_dim": 0.7, "truncate": False},
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 6},
        "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 6, "factor": 2.0,
                     "short_factor": [1.0 + 0.1 * i for i in range(half)],
                     "long_factor": [1.5 + 0.7 * i for i in range(half)]},
    }[kind]


KINDS = ["linear", "dynamic", "yarn", "yarn-mscale", "llama3", "longrope"]


def _overrides(arch, kind, fmt, theta=5000.0):
    """Config overrides asking for rope ``kind`` in the old (rope_scaling) or new format."""
    dim = 16  # every tiny preset rotates 16 dims per head
    params = _rope(kind, dim)
    out = {"max_position_embeddings": MAX_POS}
    if fmt == "old":
        params = dict(params)
        params["type"] = params.pop("rope_type")
        out.update(rope_scaling=params, rope_theta=theta, rope_parameters=None)
    else:
        out.update(rope_parameters={**params, "rope_theta": theta}, rope_scaling=None)
        out.pop("rope_theta", None)
        if arch == "phi":
            out["rope_parameters"]["partial_rotary_factor"] = 0.5
    if arch == "mistral":
        out["sliding_window"] = None  # windows are tested elsewhere
    return out


def _ids(V, seed, shape=(2, 13)):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def test_every_rope_type_is_covered():
    assert {_rope(k, 16)["rope_type"] for k in KINDS} | {"default"} == set(ROPE_TYPES)


@pytest.mark.parametrize("fmt", ["new", "old"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_losses_match_transformers(arch, kind, fmt, make_ours, make_hf):
    overrides = _overrides(arch, kind, fmt)
    if fmt == "new":
        overrides["rope_theta"] = None  # only inside rope_parameters
    ours = make_ours(arch, seed=3, **overrides)
    assert ours.config.rope.rope_type == _rope(kind, 16)["rope_type"]
    assert ours.config.rope_theta == 5000.0
    V = ours.config.vocab_size
    for T in (13, 5):  # past the pretraining length and within it
        hf = make_hf(arch, seed=3, **overrides)  # fresh: transformers remembers the longest length seen
        hf.load_state_dict(ours.state_dict(), strict=False)
        ids, labels = _ids(V, 1, (2, T)), _ids(V, 2, (2, T))
        with torch.no_grad():
            ref = hf(ids).logits
            logits = ours(ids).logits
            losses = ours.token_loss(ids, labels)
        torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
        ref_losses = F.cross_entropy(ref.reshape(-1, V), labels.reshape(-1), reduction="none").view(2, T)
        torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_rope_changes_the_model(kind, make_ours):
    # A scaled rope must not compute the plain-rope model (the parity above would then be vacuous).
    plain = make_ours("llama", seed=4, max_position_embeddings=MAX_POS)
    scaled = make_ours("llama", seed=4, **_overrides("llama", kind, "old", theta=10000.0))
    ids = _ids(plain.config.vocab_size, 5)
    with torch.no_grad():
        assert (plain(ids).logits - scaled(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_greedy_generation_matches_transformers(arch, kind, make_ours, make_hf):
    # The prompt fits the pretraining length, the continuation runs past it: dynamic and
    # longrope switch frequencies mid-generation, with the cached keys keeping theirs.
    overrides = _overrides(arch, kind, "new")
    ours = make_ours(arch, seed=6, **overrides)
    hf = make_hf(arch, seed=6, **overrides)
    hf.load_state_dict(ours.state_dict(), strict=False)
    ids = _ids(ours.config.vocab_size, 7, (2, 5))
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    assert torch.equal(collider_models.generate(ours, ids, 10), ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_gradient_contract_against_transformers(arch, kind, make_ours, make_hf):
    overrides = _overrides(arch, kind, "new")
    ours = make_ours(arch, seed=8, **overrides).double()
    hf = make_hf(arch, seed=8, dtype=torch.float64, **overrides).train()
    hf.load_state_dict(ours.state_dict(), strict=False)
    V, (B, T) = ours.config.vocab_size, (2, 13)
    ids, labels = _ids(V, 9), _ids(V, 10)
    keep = torch.rand(B, T, generator=torch.Generator().manual_seed(11)) < 0.5
    reset_densify_counts()
    filtered_mean(ours.token_loss(ids, labels), keep).backward()
    assert densify_counts() == {}
    with detach_filtered_kv(hf, keep):
        logits = hf(ids).logits
        masked_mean(F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(B, T),
                    keep).backward()
    rel = 1e-12 if arch == "phi" else 2e-6  # transformers' RMSNorm rounds through fp32
    for name, p in ours.named_parameters():
        ref = hf.get_parameter(name).grad
        err = (p.grad - ref).abs().max().item()
        assert err <= rel * ref.abs().max().item() + 1e-14, f"{name}: {err:.3g}"


# ----------------------------------------------------------------------------- reading configs


def _spec(cfg, **kw):
    kw.setdefault("head_dim", 16)
    kw.setdefault("default_partial", None)
    kw.setdefault("allow_partial", False)
    return rope_spec(cfg, **kw)


def test_old_format_takes_precedence_and_theta_inside_wins():
    # As transformers: a non-empty rope_scaling replaces rope_parameters; rope_theta inside the
    # dict beats the top-level key.
    cfg = {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "dynamic"},
           "rope_theta": 123.0, "max_position_embeddings": 16}
    spec = _spec(cfg)
    assert (spec.rope_type, spec.theta, spec.params["factor"]) == ("linear", 123.0, 2.0)
    cfg = {"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}, "rope_theta": 123.0}
    assert _spec(cfg).theta == 7.0
    assert _spec({}).theta == 10000.0 and _spec({}).rope_type == "default"


def test_original_max_position_embeddings_priority():
    # transformers lets a top-level original_max_position_embeddings (Phi-3 style) override the
    # one inside the rope parameters; absent both, it is max_position_embeddings.
    params = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}
    assert _spec({"rope_parameters": params, "max_position_embeddings": 64}).original_max == 32
    top = {"rope_parameters": params, "max_position_embeddings": 64, "original_max_position_embeddings": 8}
    assert _spec(top).original_max == 8
    bare = {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}, "max_position_embeddings": 64}
    assert _spec(bare).original_max == 64


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"rope_parameters": {"rope_type": "proportional"}}, "rope_type 'proportional'"),
        ({"rope_scaling": {"type": "su", "factor": 2.0}}, "rope_type 'su'"),
        ({"rope_parameters": {"rope_type": "linear"}, "max_position_embeddings": 8}, "needs 'factor'"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0},
          "max_position_embeddings": 8}, "needs 'high_freq_factor'"),
        ({"rope_parameters": {"rope_type": "linear", "factor": "2"}, "max_position_embeddings": 8}, "factor"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "needs max_position_embeddings"),
        ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
          "max_position_embeddings": 8}, "list of 8 numbers"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per-layer-type"),
        ({"rope_scaling": "linear"}, "must be a dict"),
        ({"rope_theta": None}, "rope_theta"),
        ({"partial_rotary_factor": 0.5}, "rotates whole heads"),
    ],
)
def test_rope_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        _spec({"model_type": "llama", **cfg})


def test_partial_rotary_dims_must_be_even():
    assert _spec({"partial_rotary_factor": 0.5}, allow_partial=True).dim == 8
    with pytest.raises(ValueError, match="must be even"):
        _spec({"partial_rotary_factor": 0.2}, allow_partial=True, head_dim=16)  # int(3.2) = 3


def test_llama3_preset_matches_transformers():
    # The tiny preset's llama3 scaling, read as transformers reads it.
    cfg = collider_models.preset_config("llama3-tiny")
    ours = collider_models.from_config(cfg)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg)).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    ids = _ids(cfg["vocab_size"], 12, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)
