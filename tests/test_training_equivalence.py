"""A whole training run with Collider equals the same run with the dense contract reference:
same loss at every step and the same final parameters (fp64, every architecture)."""

import copy

import pytest
import torch

import collider_models
from collider_autograd import densify_counts, filtered_mean, reset_densify_counts, select_top_k
from collider_models.data import SyntheticCorpus
from collider_models.reference import detach_filtered_kv, masked_mean


def _train(model, corpus_seed, collider: bool, steps=4, B=3, T=16):
    corpus = SyntheticCorpus(model.config.vocab_size, seed=corpus_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        ids, labels = corpus.batch(B, T)
        with torch.no_grad():
            keep = select_top_k(model.token_loss(ids, labels), 0.5 if step % 2 else 0.25, per="sequence",
                                valid=labels != -100)
        opt.zero_grad(set_to_none=True)
        if collider:
            loss = filtered_mean(model.token_loss(ids, labels), keep)
            loss.backward()
        else:
            with detach_filtered_kv(model, keep):
                loss = masked_mean(model.token_loss(ids, labels), keep)
                loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("preset", ["tinyllama-tiny", "qwen2.5-tiny", "phi-tiny"])
def test_training_run_matches_dense_reference(preset):
    torch.manual_seed(0)
    model = collider_models.from_preset(preset).double()
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model)
    reset_densify_counts()
    losses = _train(model, 7, collider=True)
    assert densify_counts() == {}
    ref_losses = _train(reference, 7, collider=False)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=1e-12)
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-8, atol=1e-10, msg=name)
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), initial.parameters(), strict=True))
    assert moved > 1e-3  # the run really trained
