"""Generation: the KV-cached forward equals the full forward; greedy, sampling and EOS."""

import pytest
import torch

from collider_models import KVCache, generate
from collider_models.generate import _top_p_filter, cached_forward

ARCHS = ["llama", "mistral", "qwen2", "phi"]


def _prompt(model, B=2, T=5, seed=0):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_forward_equals_full_forward(arch, make_ours):
    model = make_ours(arch).double()
    ids = _prompt(model, T=11)
    with torch.no_grad():
        full = model(ids).logits  # (B, T, V)
    cache = KVCache(model, batch=2, max_length=12)
    parts = [cached_forward(model, ids[:, :5], cache), cached_forward(model, ids[:, 5:6], cache),
             cached_forward(model, ids[:, 6:9], cache), cached_forward(model, ids[:, 9:], cache, last_only=True)]
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(parts[:3], 1), full[:, :9], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts[3], full[:, -1:], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="exceed"):
        cached_forward(model, ids[:, :2], cache)


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_cached_forward_equals_full_forward(arch, make_ours):
    # Left-padded prompts, fed in chunks: the cache masks the padding (and mistral-tiny's 8-token
    # window) exactly as the training forward does with the same positions.
    model = make_ours(arch).double()
    ids = _prompt(model, B=3, T=14)
    mask = torch.ones(3, 14, dtype=torch.int64)
    mask[1, :4] = 0
    mask[2, :9] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    real = mask.bool()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits  # (B, T, V)
    cache = KVCache(model, batch=3, max_length=14)
    parts = [cached_forward(model, ids[:, :10], cache, attention_mask=mask[:, :10]),
             cached_forward(model, ids[:, 10:11], cache), cached_forward(model, ids[:, 11:], cache)]
    got = torch.cat(parts, 1)
    torch.testing.assert_close(got[real], full[real], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_cache_equals_recompute(arch, make_ours):
    model = make_ours(arch)
    ids = _prompt(model)
    with_cache = generate(model, ids, 12)
    assert with_cache.shape == (2, 17) and torch.equal(with_cache[:, :5], ids)
    assert torch.equal(with_cache, generate(model, ids, 12, use_cache=False))


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_sampling_with_cache_equals_recompute(arch, make_ours):
    model = make_ours(arch)
    ids = _prompt(model)
    runs = [
        generate(model, ids, 10, do_sample=True, top_p=0.9, temperature=0.7,
                 generator=torch.Generator().manual_seed(3), use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
    again = generate(model, ids, 10, do_sample=True, top_p=0.9, temperature=0.7,
                     generator=torch.Generator().manual_seed(3))
    assert torch.equal(runs[0], again)
    # a vanishing nucleus keeps only the most likely token: sampling becomes greedy
    tiny_p = generate(model, ids, 10, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(tiny_p, generate(model, ids, 10))


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]]))
    kept = torch.isfinite(_top_p_filter(logits, 0.8))
    assert kept[0].tolist() == [True, False, True, False]  # 0.5 + 0.3 reach 0.8
    assert kept[1].tolist() == [True, True, True, True]  # 0.75 < 0.8 before the last token
    assert torch.equal(_top_p_filter(logits, 1.0), logits)
    # sampling never leaves the nucleus
    probs = _top_p_filter(logits[:1].expand(2000, 4), 0.8).softmax(-1)
    draws = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).squeeze(1)
    assert set(draws.tolist()) == {0, 2}


def test_eos_pads_and_stops(make_ours):
    model = make_ours("llama")
    ids = _prompt(model, B=2)
    free = generate(model, ids, 8)
    eos = int(free[0, 7])  # sequence 0 emits this at its third new token
    out = generate(model, ids, 8, eos_token_id=[eos, 10_000])
    first = (free[0, 5:] == eos).nonzero()[0].item() + 5
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first:] == eos).all()  # padded with the EOS id after finishing
    hits = (free[1, 5:] == eos).nonzero()
    if len(hits) == 0:  # sequence 1 never finishes: it runs to max_new_tokens
        assert out.shape[1] == 13 and torch.equal(out[1], free[1])
    # when every sequence finished, decoding stops early
    one = generate(model, ids[:1], 8, eos_token_id=eos)
    assert one.shape[1] == first + 1 and one[0, -1] == eos


def test_arguments(make_ours):
    model = make_ours("qwen2")
    ids = _prompt(model)
    assert torch.equal(generate(model, ids, 0), ids)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, 2, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, 2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, ids.float(), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, -1)
