"""Mixed precision through torch.autocast, whole models: the Collider gradients under CPU bf16
autocast are as close to the fp64 contract as transformers' own autocast computation of the same
contract (filtered K/V detached, masked mean) is."""

import copy

import pytest
import torch

from collider_autograd import filtered_mean
from collider_models import from_hf
from collider_models.reference import detach_filtered_kv, masked_mean

pytest.importorskip("transformers", reason="transformers is the reference of these tests")

B, T = 2, 24


def _hf_grads(hf, ids, labels, keep, autocast: bool):
    hf.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), detach_filtered_kv(hf, keep):
        logits = hf(ids).logits
        V = logits.shape[-1]
        tl = torch.nn.functional.cross_entropy(logits.float().view(-1, V), labels.view(-1), reduction="none")
        masked_mean(tl.view(B, T), keep).backward()
    return {n: p.grad.double() for n, p in hf.named_parameters()}


def _rel(got, want):
    return max(float((got[n] - want[n]).norm() / want[n].norm()) for n in want if want[n].norm() > 0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi"])
def test_bf16_autocast_gradients_as_close_as_transformers(arch, make_hf):
    hf = make_hf(arch, seed=11).train()
    V = hf.config.vocab_size
    gen = torch.Generator().manual_seed(12)
    ids = torch.randint(0, V, (B, T), generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    keep = torch.rand(B, T, generator=gen) < 0.6
    exact = _hf_grads(copy.deepcopy(hf).double(), ids, labels, keep, autocast=False)
    theirs = _hf_grads(hf, ids, labels, keep, autocast=True)
    ours_model = from_hf(hf)
    ours_model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        token_loss = ours_model.token_loss(ids, labels)
        loss = filtered_mean(token_loss, keep)
    loss.backward()
    assert token_loss.dtype == torch.float32  # losses stay fp32 under autocast
    ours = {n: p.grad.double() for n, p in ours_model.named_parameters()}
    assert {p.grad.dtype for p in ours_model.parameters()} == {torch.float32}  # fp32 master weights
    err_ours, err_theirs = _rel(ours, exact), _rel(theirs, exact)
    assert 1e-4 < err_theirs < 0.1  # autocast really ran in bf16
    assert err_ours <= 2 * err_theirs + 1e-3, (err_ours, err_theirs)
