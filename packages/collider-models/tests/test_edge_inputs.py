"""Empty batches (B = 0) and empty sequences (T = 0): empty results, zero gradients, clear
errors; never a crash or an obscure reshape error."""

import pytest
import torch

import collider_models
from collider_autograd import filtered_mean

ARCHS = ["llama", "mistral", "qwen2", "phi"]
SHAPES = [(0, 7), (3, 0), (0, 0)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_empty_forward_and_losses(arch, shape, make_ours):
    model = make_ours(arch)
    V = model.config.vocab_size
    ids = torch.zeros(shape, dtype=torch.int64)
    logits = model(ids).logits
    assert logits.shape == (*shape, V) and logits.dtype == torch.float32
    tl = model.token_loss(ids, ids)
    assert tl.shape == shape and tl.dtype == torch.float32
    out = model(ids, labels=ids, attention_mask=torch.ones(shape, dtype=torch.int64))
    assert out.loss.item() == 0.0 and out.token_loss.shape == shape and out.labels.shape == shape
    # A step on an empty batch gives every parameter a zero gradient (data-parallel ranks stay in step).
    model.zero_grad(set_to_none=True)
    filtered_mean(out.token_loss, torch.zeros(shape, dtype=torch.bool)).backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_generation(arch, make_ours):
    model = make_ours(arch)
    assert collider_models.generate(model, torch.zeros(0, 4, dtype=torch.int64), 5).shape == (0, 4)
    with pytest.raises(ValueError, match="at least one token"):
        collider_models.generate(model, torch.zeros(2, 0, dtype=torch.int64), 5)


def test_bad_inputs_get_clear_errors(make_ours):
    model = make_ours("llama")
    ids = torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(TypeError, match="input_ids must be an int64/int32 tensor"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
        model(ids[0])
    with pytest.raises(IndexError, match=r"input_ids must lie in \[0, 512\)"):
        model(ids + 512)
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model.token_loss(ids, ids[:, :3])
    with pytest.raises(TypeError, match="labels must be an int64/int32 tensor"):
        model(ids, labels=ids.float())
