"""Parity with ``transformers``: logits, per-token losses, greedy generation, checkpoints
both ways, and the gradient contract (the Design page, docs/design.rst) computed on the
``transformers`` model."""

import json

import pytest
import torch
import torch.nn.functional as F

from collider_autograd import filtered_mean
from collider_models import from_pretrained, generate, save_pretrained
from collider_models.reference import detach_filtered_kv, masked_mean

transformers = pytest.importorskip("transformers", reason="transformers is needed for parity tests")

ARCHS = ["llama", "mistral", "qwen2", "phi"]
B, T = 2, 13


def _ids(vocab, seed=0, shape=(B, T)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


def _labels(vocab, seed=1):
    labels = _ids(vocab, seed)
    labels[1, -4:] = -100
    return labels


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_token_losses_match(arch, hf_checkpoint):
    folder, hf = hf_checkpoint(arch)
    ours = from_pretrained(folder)
    V = ours.config.vocab_size
    ids, labels = _ids(V), _labels(V)
    ref = _hf_logits(hf, ids)
    with torch.no_grad():
        logits = ours(ids).logits
        losses = ours.token_loss(ids, labels)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
    ref_losses = F.cross_entropy(ref.reshape(-1, V), labels.reshape(-1), reduction="none").view(B, T)
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_with_labels_follows_transformers(arch, hf_checkpoint):
    # labels as transformers takes them (shifted inside), -100 ignored: same mean loss, and the
    # per-token losses are transformers' shifted cross-entropy, aligned with positions.
    folder, hf = hf_checkpoint(arch)
    ours = from_pretrained(folder)
    V = ours.config.vocab_size
    ids = _ids(V)
    labels = ids.clone()
    labels[0, 3:6] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels)
        out = ours(ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-5)
    ref_tok = F.cross_entropy(ref.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(out.token_loss[:, :-1], ref_tok.view(B, T - 1), rtol=0, atol=1e-5)
    assert torch.equal(out.token_loss[:, -1], torch.zeros(B))
    assert torch.equal(out.labels[:, :-1], labels[:, 1:]) and bool((out.labels[:, -1] == -100).all())


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches(arch, hf_checkpoint):
    folder, hf = hf_checkpoint(arch)
    ours = from_pretrained(folder)
    ids = _ids(ours.config.vocab_size, seed=2, shape=(2, 6))
    eos = hf.generation_config.eos_token_id
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          pad_token_id=eos if eos is not None else 0)
    got = generate(ours, ids, 12, eos_token_id=eos)
    assert torch.equal(got, ref)
    assert torch.equal(generate(ours, ids, 12, eos_token_id=eos, use_cache=False), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_our_checkpoint_loads_in_transformers(arch, make_ours, tmp_path):
    ours = make_ours(arch, seed=3)
    save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.dtype == torch.float32
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, _hf_logits(hf, ids), rtol=0, atol=1e-5)
    tied = arch == "qwen2"
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    # and back: what transformers writes again loads in ours unchanged
    hf.save_pretrained(tmp_path / "again")
    again = from_pretrained(tmp_path / "again")
    for (name, p), (_, q) in zip(ours.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_our_sharded_checkpoint_loads_in_transformers(arch, make_ours, tmp_path):
    ours = make_ours(arch, seed=3)
    save_pretrained(ours, tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, _hf_logits(hf, ids), rtol=0, atol=1e-5)


def test_bf16_checkpoint_loads_in_transformers(make_ours, tmp_path):
    ours = make_ours("llama", seed=4).to(torch.bfloat16)
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.dtype == torch.bfloat16
    for name, p in ours.named_parameters():
        assert torch.equal(hf.get_parameter(name), p), name


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_transformers_sharded_checkpoint(arch, make_hf, tmp_path):
    hf = make_hf(arch, seed=5)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = from_pretrained(tmp_path)
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, _hf_logits(hf, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_old_config_format_matches_transformers(arch, make_hf, tmp_path):
    """A config in the older format (top-level rope_theta / partial_rotary_factor /
    torch_dtype, num_key_value_heads null) reads the same in both libraries."""
    overrides = {"rope_theta": 3000.0}
    if arch == "phi":
        overrides["partial_rotary_factor"] = 0.75
    hf = make_hf(arch, seed=6, **overrides)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    assert params["rope_theta"] == 3000.0
    cfg["rope_theta"] = params["rope_theta"]
    if "partial_rotary_factor" in params:
        cfg["partial_rotary_factor"] = params["partial_rotary_factor"]
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype")
    if arch == "phi":
        cfg["num_key_value_heads"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = from_pretrained(tmp_path)
    assert ours.config.rope_theta == 3000.0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(ours.config.vocab_size)
    ref = _hf_logits(reloaded, ids)
    torch.testing.assert_close(_hf_logits(hf, ids), ref, rtol=0, atol=1e-6)  # transformers read it the same
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref, rtol=0, atol=1e-5)


def _hf_contract_grads(hf, ids, labels, keep, detach=True):
    hf.zero_grad(set_to_none=True)
    V = hf.config.vocab_size
    with detach_filtered_kv(hf, keep if detach else torch.ones_like(keep)):
        logits = hf(ids).logits
        token_loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(B, T)
        masked_mean(token_loss, keep).backward()
    return {n: p.grad for n, p in hf.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_contract_against_transformers(arch, make_ours, make_hf):
    """Collider gradients (filtered_mean) equal the dense contract computed on the
    ``transformers`` model: filtered K/V rows detached, masked-mean loss (fp64)."""
    ours = make_ours(arch, seed=7).double()
    hf = make_hf(arch, seed=7, dtype=torch.float64).train()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not missing
    V = ours.config.vocab_size
    ids, labels = _ids(V, seed=8), _labels(V, seed=9)
    keep = (torch.rand(B, T, generator=torch.Generator().manual_seed(10)) < 0.6) & (labels != -100)
    keep[0, :3] = False

    filtered_mean(ours.token_loss(ids, labels), keep, labels=labels).backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    hf_grads = _hf_contract_grads(hf, ids, labels, keep)
    assert ours_grads.keys() == hf_grads.keys()
    # transformers' RMSNorm normalises in fp32 even in an fp64 model, so Llama and Qwen2
    # agree to fp32 rounding (~1e-7 relative); Phi's LayerNorm path agrees to fp64 rounding.
    rel = 1e-12 if arch == "phi" else 2e-6
    for name, ref in hf_grads.items():
        assert ref is not None, name
        err = (ours_grads[name] - ref).abs().max().item()
        assert err <= rel * ref.abs().max().item() + 1e-14, f"{name}: max error {err:.3g}"
    # The tolerance separates the contract from dense training: without detaching the
    # filtered K/V rows, the K and V projection gradients are far off.
    dense = _hf_contract_grads(hf, ids, labels, keep, detach=False)
    name = "model.layers.0.self_attn.v_proj.weight"
    assert (dense[name] - ours_grads[name]).abs().max() > 1e3 * rel * ours_grads[name].abs().max()
