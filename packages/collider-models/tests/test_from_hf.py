"""``from_hf``: a Collider model over the parameters of a ``transformers`` model — shared storage,
the gradient contract (see the Design page) computed on the very same ``transformers`` model,
frozen parameters without weight-gradient GEMMs, and clear refusals."""

import collections
import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from collider_autograd import filtered_mean
from collider_kernels import backends
from collider_models import from_hf, from_preset
from collider_models.blocks import Attention
from collider_models.reference import detach_filtered_kv, masked_mean

transformers = pytest.importorskip("transformers", reason="from_hf converts transformers models")

ARCHS = ["llama", "qwen2", "phi"]
B, T = 3, 11


def _batch(vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    labels = torch.randint(0, vocab, (B, T), generator=gen)  # aligned with positions
    labels[2, -3:] = -100
    keep = (torch.rand(B, T, generator=gen) < 0.6) & (labels != -100)
    keep[0, :2] = False
    return ids, labels, keep


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _collider_grads(ours, ids, labels, keep):
    ours.zero_grad(set_to_none=True)
    filtered_mean(ours.token_loss(ids, labels), keep, labels=labels).backward()
    return _grads(ours)


def _contract_grads(hf, ids, labels, keep, detach=True):
    """Dense contract on the transformers model: filtered K/V detached, masked mean."""
    hf.zero_grad(set_to_none=True)
    with detach_filtered_kv(hf, keep if detach else torch.ones_like(keep)):
        logits = hf(ids).logits  # (B, T, V)
        token_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(B, T)
        masked_mean(token_loss, keep).backward()
    return _grads(hf)


@pytest.mark.parametrize("arch", ARCHS)
def test_shares_the_parameters(arch, make_hf):
    hf = make_hf(arch, seed=0).train()
    ours = from_hf(hf)
    for name, p in hf.named_parameters(remove_duplicate=False):
        assert ours.get_parameter(name) is p, name
        assert ours.get_parameter(name).data_ptr() == p.data_ptr(), name
    tied = ours.lm_head.weight is ours.model.embed_tokens.weight
    assert tied == (arch == "qwen2") == (hf.lm_head.weight is hf.model.embed_tokens.weight)
    assert ours.training and not from_hf(hf.eval()).training
    V = ours.config.vocab_size
    ids, labels, keep = _batch(V, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)
    # An optimizer built on the transformers model trains the Collider model: one parameter set.
    opt = torch.optim.SGD(hf.parameters(), lr=0.5)
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    filtered_mean(ours.token_loss(ids, labels), keep).backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in hf.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_keeps_dtype_and_moves_with_the_transformers_model(dtype, make_hf):
    hf = make_hf("llama", seed=2, dtype=dtype)
    ours = from_hf(hf)
    assert ours.config.dtype == dtype and {p.dtype for p in ours.parameters()} == {dtype}
    hf.to(torch.float32)  # the same Parameter objects now hold fp32 data, in both models
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    assert ours.model.embed_tokens.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_equal_the_contract_on_the_same_transformers_model(arch, dtype, make_hf):
    hf = make_hf(arch, seed=3, dtype=dtype).train()
    ours = from_hf(hf)
    ids, labels, keep = _batch(ours.config.vocab_size, seed=4)
    got = _collider_grads(ours, ids, labels, keep)
    ref = _contract_grads(hf, ids, labels, keep)
    assert got.keys() == ref.keys() == {n for n, _ in hf.named_parameters()}
    # fp64: transformers' RMSNorm normalises in fp32 even in an fp64 model (Llama, Qwen2 agree to
    # fp32 rounding), Phi's LayerNorm to fp64 rounding. fp32: a few ulps of the largest entry.
    rel = {torch.float32: 1e-5, torch.float64: 1e-12 if arch == "phi" else 2e-6}[dtype]
    for name, r in ref.items():
        err = (got[name] - r).abs().max().item()
        assert err <= rel * r.abs().max().item() + 1e-12, f"{name}: max error {err:.3g}"
    # The tolerance separates the contract from dense masked-loss training (K/V not detached).
    dense = _contract_grads(hf, ids, labels, keep, detach=False)
    name = "model.layers.0.self_attn.v_proj.weight"
    assert (dense[name] - got[name]).abs().max() > 100 * rel * got[name].abs().max()


def _count_calls(monkeypatch, op):
    """Record the output shape of every call of kernel ``op`` (all backends)."""
    calls = []
    for backend, impl in list(backends._REGISTRY[op].items()):
        def counted(*args, _fn=impl.fn, **kwargs):
            out = _fn(*args, **kwargs)
            calls.append(tuple(out.shape))
            return out

        monkeypatch.setitem(backends._REGISTRY[op], backend, dataclasses.replace(impl, fn=counted))
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_parameters_get_no_gradient_and_no_weight_gemm(arch, make_hf, monkeypatch):
    hf = make_hf(arch, seed=5).train()
    frozen = ("model.embed_tokens.", "model.layers.0.", "model.layers.1.self_attn.q_proj.")
    for name, p in hf.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    ours = from_hf(hf)
    ids, labels, keep = _batch(ours.config.vocab_size, seed=6)
    ref = _contract_grads(hf, ids, labels, keep)
    gemms = _count_calls(monkeypatch, "gathered_weight_grad")
    scatters = _count_calls(monkeypatch, "scatter_add_rows")
    got = _collider_grads(ours, ids, labels, keep)
    trainable = {n for n, p in hf.named_parameters() if p.requires_grad}
    assert got.keys() == ref.keys() == trainable
    assert all(p.grad is None for p in hf.parameters() if not p.requires_grad)
    for name in trainable:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # One weight-gradient GEMM per trainable linear weight (the LM head's vocab fits one chunk),
    # none for frozen ones, and no embedding scatter-add: the embedding is frozen.
    linear = [tuple(m.weight.shape) for m in ours.modules()
              if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
    assert len(linear) < sum(isinstance(m, torch.nn.Linear) for m in ours.modules())
    for attn in (m for m in ours.modules() if isinstance(m, Attention)):  # trainable q/k/v: one fused GEMM
        qkv = [tuple(p.weight.shape) for p in (attn.q_proj, attn.k_proj, attn.v_proj) if p.weight.requires_grad]
        if len(qkv) == 3:
            for shape in qkv:
                linear.remove(shape)
            linear.append((sum(s[0] for s in qkv), qkv[0][1]))
    assert collections.Counter(gemms) == collections.Counter(linear)
    assert scatters == []


def _set_flag(hf):
    # named activation checkpointing in recent transformers releases
    (getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable)()


def _add_adapter(hf):
    hf.model.layers[0].self_attn.q_proj.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2, 4)))


def _quantize(hf):
    w = hf.model.layers[0].mlp.up_proj
    w.weight = torch.nn.Parameter(w.weight.detach().to(torch.int8), requires_grad=False)


def _attn_impl(hf):
    hf.config._attn_implementation_internal = "my_custom_kernel"


REFUSALS = {
    "gradient checkpointing": (_set_flag, {}, ValueError, "gradient checkpointing"),
    "adapter": (_add_adapter, {}, ValueError, "lora_A"),
    "quantized": (_quantize, {}, ValueError, "int8"),
    "attention implementation": (_attn_impl, {}, ValueError, "my_custom_kernel"),
    "dropout": (None, {"attention_dropout": 0.1}, ValueError, "attention_dropout"),
    "activation": (None, {"hidden_act": "gelu"}, ValueError, "hidden_act"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refuses_what_it_cannot_train_the_same(case, make_hf):
    edit, overrides, error, words = REFUSALS[case]
    hf = make_hf("llama", seed=7, **overrides)
    if edit is not None:
        edit(hf)
    with pytest.raises(error, match=words):
        from_hf(hf)


def test_refuses_other_models(tiny_dict):
    with pytest.raises(TypeError, match="transformers"):
        from_hf(from_preset("tinyllama-tiny"))
    config = transformers.AutoConfig.for_model(**tiny_dict("llama"))
    with pytest.raises(TypeError, match="LlamaModel"):
        from_hf(transformers.AutoModel.from_config(config))  # no LM head
    bert = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, is_decoder=True)
    with pytest.raises(TypeError, match="model_type 'bert'"):
        from_hf(transformers.BertLMHeadModel(bert))
    with torch.device("meta"):
        unloaded = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="meta device"):
        from_hf(unloaded)


def test_importing_needs_no_transformers():
    """collider_models (and its hf package) import without transformers; the kernels and autograd
    packages never import it; ColliderTrainer then says what to install."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import collider_kernels, collider_autograd, collider_models, collider_models.hf\n"
        "try:\n    collider_models.hf.ColliderTrainer\nexcept ImportError as e:\n    print('ImportError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ImportError")
    code = "import sys, collider_models, collider_models.hf; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def _check_on_device(arch, make_hf, device):
    """fp32 gradients equal the contract on ``device``; in bf16 our logits are within twice
    transformers' own bf16 error of the fp32 logits."""
    hf = make_hf(arch, seed=20).train().to(device)
    ours = from_hf(hf)
    assert ours.model.embed_tokens.weight.device.type == torch.device(device).type
    ids, labels, keep = (t.to(device) for t in _batch(ours.config.vocab_size, seed=21))
    got, ref = _collider_grads(ours, ids, labels, keep), _contract_grads(hf, ids, labels, keep)
    for name, r in ref.items():
        err = (got[name] - r).abs().max().item()
        assert err <= 1e-4 * r.abs().max().item() + 1e-7, f"{name}: max error {err:.3g}"
    with torch.no_grad():
        exact = hf(ids).logits.double()
        hf.to(torch.bfloat16)  # and so ours
        ours_err = (ours(ids).logits.double() - exact).abs().max().item()
        hf_err = (hf(ids).logits.double() - exact).abs().max().item()
    assert ours_err <= 2 * hf_err + 1e-3, (ours_err, hf_err)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_on_gpu_fp32_contract_and_bf16_forward(arch, make_hf):
    _check_on_device(arch, make_hf, "cuda")
