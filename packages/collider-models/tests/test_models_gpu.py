"""The models on CUDA in bf16 with sliding windows, rope scaling, padding and packed documents:
Collider gradients against the fp64 dense reference of the contract, within twice the error of
the same reference computed in bf16."""

import pytest
import torch

import collider_models
from collider_autograd import densify_counts, filtered_mean, reset_densify_counts
from collider_models.reference import detach_filtered_kv, masked_mean

pytestmark = pytest.mark.gpu

B, T = 3, 256
CASES = {
    "mistral-window": ("mistral-tiny", {"sliding_window": 48}, {}),
    "qwen2-mixed-windows": ("qwen2.5-tiny", {"use_sliding_window": True, "sliding_window": 40,
                                             "max_window_layers": 1}, {}),
    "llama3-rope": ("llama3-tiny", {}, {}),
    "yarn-rope": ("tinyllama-tiny", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 64}}, {}),
    "left-padding": ("mistral-tiny", {"sliding_window": 48}, {"padding": "left"}),
    "right-padding": ("phi-tiny", {}, {"padding": "right"}),
    "packed": ("mistral-tiny", {"sliding_window": 48}, {"packed": True}),
}


def _inputs(V, kind):
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, V, (B, T), device="cuda", generator=gen)
    kwargs = {}
    if kind.get("padding"):
        mask = torch.ones(B, T, dtype=torch.int64, device="cuda")
        for b, n in enumerate([T, 200, 37]):
            if kind["padding"] == "left":
                mask[b, : T - n] = 0
            else:
                mask[b, n:] = 0
        kwargs["attention_mask"] = mask
    if kind.get("packed"):
        docs = torch.zeros(B, T, dtype=torch.int64, device="cuda")
        for b, cuts in enumerate([[100, 180], [], [5, 6, 150]]):
            for c in cuts:
                docs[b, c:] += 1
        kwargs["document_ids"] = docs
    return ids, kwargs


def _grads(model, ids, labels, keep, kwargs, collider):
    model.zero_grad(set_to_none=True)
    if collider:
        filtered_mean(model.token_loss(ids, labels, **kwargs), keep, labels=labels).backward()
    else:
        with detach_filtered_kv(model, keep):
            masked_mean(model.token_loss(ids, labels, **kwargs), keep).backward()
    return {n: p.grad.double() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_contract_on_cuda(case):
    preset, overrides, kind = CASES[case]
    cfg = collider_models.preset_config(preset)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = collider_models.from_config(cfg).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    V = model.config.vocab_size
    ids, kwargs = _inputs(V, kind)
    with torch.no_grad():
        labels = model(ids, labels=ids, **kwargs).labels  # shifted; padding and document ends ignored
    keep = (torch.rand(B, T, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) < 0.3)
    keep &= labels != -100

    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    exact = _grads(model.cpu().double(), ids.cpu(), labels.cpu(), keep.cpu(), cpu, collider=False)  # fp64 truth
    exact = {n: g.cuda() for n, g in exact.items()}
    model.cuda().bfloat16()
    same_dtype = _grads(model, ids, labels, keep, kwargs, collider=False)
    reset_densify_counts()
    ours = _grads(model, ids, labels, keep, kwargs, collider=True)
    assert densify_counts() == {}
    for name, ref in exact.items():
        bound = 2 * (same_dtype[name] - ref).abs().max().item() + 1e-6
        err = (ours[name] - ref).abs().max().item()
        assert err <= bound, f"{case} {name}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("case", ["mistral-window", "qwen2-mixed-windows", "left-padding"])
def test_cached_forward_on_cuda_matches_the_full_forward(case):
    from collider_models.generate import KVCache, cached_forward

    preset, overrides, _ = CASES[case]
    cfg = collider_models.preset_config(preset)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = collider_models.from_config(cfg).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 120), device="cuda")
    mask = torch.ones(2, 120, dtype=torch.int64, device="cuda")
    mask[1, :17] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
    cache = KVCache(model, 2, 120)
    parts = [cached_forward(model, ids[:, :50], cache, attention_mask=mask[:, :50])]
    parts += [cached_forward(model, ids[:, t:t + 1], cache) for t in range(50, 120)]
    got = torch.cat(parts, 1)
    real = mask.bool()
    torch.testing.assert_close(got[real], full[real], rtol=1e-4, atol=1e-4)
