"""The Collider gradient contract (the Design page, docs/design.rst), end to end through every
architecture."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import collider_models
from collider_autograd import TokenSparseTensor, densify_counts, filtered_mean, reset_densify_counts
from collider_models.reference import detach_filtered_kv, masked_mean

ARCHS = ["tinyllama-tiny", "llama3-tiny", "mistral-tiny", "qwen2.5-tiny", "phi-tiny"]
B, T = 3, 12


def _keep_cases(gen):
    vocab_mask = torch.rand(B, T, generator=gen) < 0.5
    vocab_mask[0] = True  # one sequence keeps everything
    vocab_mask[1] = False
    vocab_mask[1, 7] = True  # one sequence keeps a single token
    return {
        "ragged": vocab_mask,
        "all": torch.ones(B, T, dtype=torch.bool),
        "none": torch.zeros(B, T, dtype=torch.bool),
        "single": torch.zeros(B, T, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True) & (
            torch.arange(B)[:, None] == 2
        ),
    }


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _run(model, ids, labels, keep, collider: bool):
    model.zero_grad(set_to_none=True)
    if collider:
        loss = filtered_mean(model.token_loss(ids, labels), keep, labels=labels)
        loss.backward()
    else:
        with detach_filtered_kv(model, keep):
            loss = masked_mean(model.token_loss(ids, labels), keep)
            loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", ["ragged", "all", "none", "single"])
def test_gradients_equal_dense_reference(arch, case):
    gen = torch.Generator().manual_seed(hash((arch, case)) % 2**31)
    torch.manual_seed(hash((arch, case)) % 2**31)
    model = collider_models.from_preset(arch).double()
    V = model.config.vocab_size
    ids = torch.randint(0, V, (B, T), generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[2, -3:] = -100  # ignored labels are never kept
    keep = _keep_cases(gen)[case] & (labels != -100)
    reset_densify_counts()
    loss_c, grads_c = _run(model, ids, labels, keep, collider=True)
    assert densify_counts() == {}
    loss_r, grads_r = _run(model, ids, labels, keep, collider=False)
    torch.testing.assert_close(loss_c, loss_r, rtol=1e-12, atol=1e-12)
    assert grads_c.keys() == grads_r.keys()
    for name in grads_r:
        torch.testing.assert_close(grads_c[name], grads_r[name], rtol=1e-9, atol=1e-11, msg=name)
    if case == "none":
        # A rank that keeps nothing still produces a (zero) gradient for every parameter, so a
        # data-parallel all-reduce over the gradients has every bucket and hangs nothing.
        assert loss_c.item() == 0.0
        model.zero_grad(set_to_none=True)
        filtered_mean(model.token_loss(ids, labels), keep).backward()
        assert all(p.grad is not None and p.grad.abs().max() == 0 for p in model.parameters())
    else:
        assert any(g.abs().max() > 0 for g in grads_c.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_unchanged_and_filtered_activations_get_zero_gradient(arch):
    torch.manual_seed(0)
    model = collider_models.from_preset(arch).double()
    V = model.config.vocab_size
    ids = torch.randint(0, V, (B, T))
    labels = torch.randint(0, V, (B, T))
    keep = torch.rand(B, T) < 0.4
    keep[0, 3] = True
    # Capture the residual stream after the first layer and its gradient.
    captured = {}

    def hook(_m, _i, out):
        stream = out[0] if isinstance(out, tuple) else out  # (stream, MLP output) when the adds are fused
        if stream.requires_grad:
            stream.retain_grad()
            captured["h"] = stream

    handle = model.model.layers[0].register_forward_hook(hook)
    token_loss = model.token_loss(ids, labels)
    with torch.no_grad():
        dense_loss = model.token_loss(ids, labels)
    assert torch.equal(token_loss.detach(), dense_loss)  # forward is bit-for-bit the dense one
    filtered_mean(token_loss, keep).backward()
    handle.remove()
    grad = captured["h"].grad
    assert isinstance(grad, TokenSparseTensor)  # sparsity flowed by type through the model
    dense = grad.to_dense()
    assert dense[~keep].abs().max() == 0
    assert dense[keep].abs().max() > 0


@settings(deadline=None, max_examples=12)
@given(
    arch=st.sampled_from(ARCHS),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([4, 8]),
    layers=st.integers(1, 2),
    vocab=st.integers(5, 40),
    intermediate=st.integers(3, 24),
    batch=st.integers(1, 3),
    seqlen=st.integers(1, 10),
    p_keep=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_random_configs_match_the_dense_reference(arch, kv_heads, group, head_dim, layers, vocab, intermediate,
                                                   batch, seqlen, p_keep, seed):
    cfg = collider_models.preset_config(arch)
    heads = kv_heads * group
    if arch == "phi-tiny":
        kv_heads = heads  # Phi has no grouped-query attention
    cfg.update(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * head_dim,
               num_hidden_layers=layers, vocab_size=vocab, intermediate_size=intermediate)
    torch.manual_seed(seed)
    model = collider_models.from_config(cfg).double()
    with torch.no_grad():  # every parameter away from its init value (biases 0, norms 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seqlen), generator=gen)
    labels = torch.randint(0, vocab, (batch, seqlen), generator=gen)
    labels[torch.rand(batch, seqlen, generator=gen) < 0.15] = -100
    keep = (torch.rand(batch, seqlen, generator=gen) < p_keep) & (labels != -100)
    reset_densify_counts()
    loss_c, grads_c = _run(model, ids, labels, keep, collider=True)
    assert densify_counts() == {}
    loss_r, grads_r = _run(model, ids, labels, keep, collider=False)
    torch.testing.assert_close(loss_c, loss_r, rtol=1e-12, atol=1e-12)
    for name in grads_r:
        torch.testing.assert_close(grads_c[name], grads_r[name], rtol=1e-9, atol=1e-11, msg=name)
