"""Padding, packed documents and sliding windows: parity with transformers (logits, losses,
greedy generation), the gradient contract against transformers, and the contract per document."""

import pytest
import torch
import torch.nn.functional as F

import collider_models
from collider_autograd import densify_counts, filtered_mean, reset_densify_counts
from collider_models.masks import layout
from collider_models.reference import detach_filtered_kv, masked_mean

transformers = pytest.importorskip("transformers", reason="transformers is needed for parity tests")

# (arch, overrides): mistral-tiny has an 8-token window; the Qwen2 case mixes full and sliding layers.
CASES = {
    "llama": ("llama", {}),
    "mistral-window": ("mistral", {}),
    "mistral-no-window": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {}),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "phi": ("phi", {}),
}
B, T = 3, 12
LENGTHS = [12, 9, 4]  # real tokens per row of the padded batches
DOCS = [[5, 4, 3], [12], [2, 7, 3]]  # document lengths per row of the packed batches


def _ids(V, seed, shape=(B, T)):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def _padding(side):
    mask = torch.zeros(B, T, dtype=torch.int64)
    for b, n in enumerate(LENGTHS):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, T - n:] = 1
    return mask


def _packing():
    """position_ids restarting per document and the matching document ids, (B, T) each."""
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in DOCS])
    docs = torch.cat([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])[None] for row in DOCS])
    return pos, docs


def _pair(case, make_ours, make_hf, seed, dtype=torch.float32):
    arch, overrides = CASES[case]
    ours = make_ours(arch, seed=seed, **overrides).to(dtype)
    hf = make_hf(arch, seed=seed, dtype=dtype, **overrides)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected
    return ours, hf


def _case_params():
    return pytest.mark.parametrize("case", list(CASES))


def test_windows_are_read_per_layer(make_ours):
    assert make_ours("mistral").config.layer_windows == (8, 8)
    assert make_ours("mistral", sliding_window=None).config.layer_windows == (None, None)
    qwen = make_ours("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert qwen.config.layer_windows == (None, 4)
    assert make_ours("qwen2", sliding_window=4).config.layer_windows == (None, None)  # use_sliding_window off
    typed = make_ours("qwen2", use_sliding_window=True, sliding_window=4,
                      layer_types=["sliding_attention", "full_attention"])
    assert typed.config.layer_windows == (4, None)


@_case_params()
def test_unpadded_matches_transformers(case, make_ours, make_hf):
    # Sequences longer than the windows: the sliding window is exercised without any mask.
    ours, hf = _pair(case, make_ours, make_hf, seed=1)
    ids = _ids(ours.config.vocab_size, 2)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


def test_window_changes_the_model(make_ours):
    windowed, full = make_ours("mistral", seed=3), make_ours("mistral", seed=3, sliding_window=None)
    ids = _ids(512, 4)
    with torch.no_grad():
        a, b = windowed(ids).logits, full(ids).logits
    assert torch.equal(a[:, :8], b[:, :8])  # within the window nothing changes
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
@_case_params()
def test_padding_matches_transformers(case, side, make_ours, make_hf):
    ours, hf = _pair(case, make_ours, make_hf, seed=5)
    V = ours.config.vocab_size
    ids, mask = _ids(V, 6), _padding(side)
    real = mask.bool()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        logits = ours(ids, attention_mask=mask).logits
        out = ours(ids, labels=ids, attention_mask=mask)
    torch.testing.assert_close(logits[real], ref[real], rtol=0, atol=1e-5)
    # forward with labels: a position counts iff it and its target are real tokens
    counted = torch.zeros(B, T, dtype=torch.bool)
    counted[:, :-1] = real[:, :-1] & real[:, 1:]
    assert torch.equal(out.labels != -100, counted)
    ref_tok = F.cross_entropy(ref[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(B, T - 1)
    torch.testing.assert_close(out.token_loss[:, :-1][counted[:, :-1]], ref_tok[counted[:, :-1]], rtol=0, atol=1e-5)
    assert torch.equal(out.token_loss[~counted], torch.zeros(int((~counted).sum())))
    torch.testing.assert_close(out.loss, ref_tok[counted[:, :-1]].mean(), rtol=0, atol=1e-5)
    if side == "right":  # there transformers' own loss counts the same positions once padding is -100
        hf_labels = ids.masked_fill(~real, -100)
        torch.testing.assert_close(out.loss, hf(ids, attention_mask=mask, labels=hf_labels).loss.detach(),
                                   rtol=0, atol=1e-5)
    # token_loss with aligned labels ignores the padded positions
    with torch.no_grad():
        tl = ours.token_loss(ids, ids, attention_mask=mask)
    assert torch.equal(tl[~real], torch.zeros(int((~real).sum())))


@pytest.mark.parametrize("how", ["position_ids", "document_ids"])
@_case_params()
def test_packed_matches_transformers(case, how, make_ours, make_hf):
    # transformers isolates packed documents given by restarting position_ids only without an
    # attention_mask and without a cache (use_cache=False); Collider always does.
    ours, hf = _pair(case, make_ours, make_hf, seed=7)
    V = ours.config.vocab_size
    ids = _ids(V, 8)
    pos, docs = _packing()
    kwargs = {"position_ids": pos} if how == "position_ids" else {"document_ids": docs}
    with torch.no_grad():
        ref = hf(ids, position_ids=pos, use_cache=False).logits
        logits = ours(ids, **kwargs).logits
        out = ours(ids, labels=ids, **kwargs)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
    # the last token of a document predicts nothing
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    counted = torch.ones(B, T, dtype=torch.bool)
    counted[:, -1] = False
    counted[:, :-1] &= ~starts[:, 1:]
    assert torch.equal(out.labels != -100, counted)
    ref_tok = F.cross_entropy(ref[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(B, T - 1)
    torch.testing.assert_close(out.token_loss[:, :-1][counted[:, :-1]], ref_tok[counted[:, :-1]], rtol=0, atol=1e-5)


@_case_params()
def test_packed_document_equals_the_document_alone(case, make_ours):
    # No token attends across a boundary and positions restart: each document's logits are
    # those of the document run on its own.
    arch, overrides = CASES[case]
    model = make_ours(arch, seed=9, **overrides)
    ids = _ids(model.config.vocab_size, 10)
    _, docs = _packing()
    with torch.no_grad():
        packed = model(ids, document_ids=docs).logits
        for b, row in enumerate(DOCS):
            start = 0
            for n in row:
                alone = model(ids[b:b + 1, start:start + n]).logits[0]
                torch.testing.assert_close(packed[b, start:start + n], alone, rtol=0, atol=1e-5)
                start += n


def _contract_grads(model, ids, labels, keep, **kwargs):
    model.zero_grad(set_to_none=True)
    filtered_mean(model.token_loss(ids, labels, **kwargs), keep, labels=labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _hf_grads(hf, ids, labels, keep, **kwargs):
    hf.zero_grad(set_to_none=True)
    V = hf.config.vocab_size
    with detach_filtered_kv(hf, keep):
        logits = hf(ids, **kwargs).logits
        tl = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(labels.shape)
        masked_mean(tl, keep).backward()
    return {n: p.grad for n, p in hf.named_parameters()}


def _assert_grads(ours, ref, arch):
    rel = 1e-12 if arch == "phi" else 2e-6  # transformers' RMSNorm rounds through fp32
    assert ours.keys() == ref.keys()
    for name, r in ref.items():
        err = (ours[name] - r).abs().max().item()
        assert err <= rel * r.abs().max().item() + 1e-14, f"{name}: max error {err:.3g}"


@pytest.mark.parametrize("layout_kind", ["right", "left", "packed"])
@_case_params()
def test_gradient_contract_against_transformers(case, layout_kind, make_ours, make_hf):
    ours, hf = _pair(case, make_ours, make_hf, seed=11, dtype=torch.float64)
    hf.train()
    V = ours.config.vocab_size
    ids = _ids(V, 12)
    if layout_kind == "packed":
        pos, _ = _packing()
        ours_kw, hf_kw = {"position_ids": pos}, {"position_ids": pos, "use_cache": False}
    else:
        mask = _padding(layout_kind)
        ours_kw = hf_kw = {"attention_mask": mask}
    with torch.no_grad():
        labels = ours(ids, labels=_ids(V, 13), **ours_kw).labels  # shifted; padding and doc ends ignored
    keep = (torch.rand(B, T, generator=torch.Generator().manual_seed(14)) < 0.6) & (labels != -100)
    reset_densify_counts()
    grads = _contract_grads(ours, ids, labels, keep, **ours_kw)
    assert densify_counts() == {}
    _assert_grads(grads, _hf_grads(hf, ids, labels, keep, **hf_kw), CASES[case][0])


@_case_params()
def test_contract_per_document(case, make_ours):
    # The packed batch's Collider gradients are the sum of each document's own, with the
    # normaliser of the whole batch: documents do not interact, in the forward or the backward.
    arch, overrides = CASES[case]
    model = make_ours(arch, seed=15, **overrides).double()
    V = model.config.vocab_size
    ids, labels = _ids(V, 16), _ids(V, 17)
    _, docs = _packing()
    keep = torch.rand(B, T, generator=torch.Generator().manual_seed(18)) < 0.5
    keep[1] = False  # a document that keeps nothing
    keep[1, 3] = True
    n = keep.sum()

    model.zero_grad(set_to_none=True)
    filtered_mean(model.token_loss(ids, labels, document_ids=docs), keep, normalizer=n).backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for b, row in enumerate(DOCS):
        start = 0
        for length in row:
            sl = slice(start, start + length)
            model.zero_grad(set_to_none=True)
            filtered_mean(model.token_loss(ids[b:b + 1, sl], labels[b:b + 1, sl]), keep[b:b + 1, sl],
                          normalizer=n).backward()
            for k, p in model.named_parameters():
                total[k] += p.grad
            start += length
    for k in total:
        torch.testing.assert_close(packed[k], total[k], rtol=1e-10, atol=1e-13, msg=k)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", ["llama", "mistral-window", "qwen2-window", "phi"])
def test_padded_generation_matches_transformers(case, side, make_ours, make_hf):
    ours, hf = _pair(case, make_ours, make_hf, seed=19)
    ids, mask = _ids(ours.config.vocab_size, 20, (B, 7)), torch.zeros(B, 7, dtype=torch.int64)
    for b, n in enumerate([7, 5, 2]):
        if side == "left":
            mask[b, 7 - n:] = 1
        else:
            mask[b, :n] = 1
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    got = collider_models.generate(ours, ids, 9, attention_mask=mask)
    assert torch.equal(got, ref)
    if side == "left":  # the recomputing reference takes left padding too
        assert torch.equal(collider_models.generate(ours, ids, 9, attention_mask=mask, use_cache=False), ref)


# ----------------------------------------------------------------------------- layouts and errors


def test_layout_of_right_padding_needs_no_mask():
    lay = layout((2, 5), "cpu", attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert lay.key_start is None and lay.new_doc is None
    assert torch.equal(lay.positions, torch.arange(5))
    assert layout((2, 5), "cpu", attention_mask=torch.ones(2, 5)).real is None


def test_layout_of_left_padding_and_documents():
    lay = layout((2, 5), "cpu", attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    assert lay.key_start.tolist() == [[0, 0, 2, 2, 2], [0, 0, 0, 0, 0]]
    lay = layout((1, 7), "cpu", document_ids=torch.tensor([[4, 4, 1, 1, 1, 9, 9]]),
                 attention_mask=torch.tensor([[1, 1, 1, 1, 0, 1, 0]]))
    assert lay.positions.tolist() == [0, 1, 0, 1, 2, 0, 1]
    assert lay.key_start.tolist() == [[0, 0, 2, 2, 2, 5, 5]]  # padding trails its segment
    assert lay.new_doc.tolist() == [[False, False, True, False, False, True, False]]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"attention_mask": torch.tensor([[1, 0, 1, 1]])}, ValueError, "pads inside a document"),
        ({"attention_mask": torch.tensor([[1, 2, 2, 0]])}, ValueError, "document_ids"),
        ({"attention_mask": torch.ones(2, 4)}, ValueError, r"attention_mask must have input_ids' shape \(1, 4\)"),
        ({"attention_mask": torch.tensor([[1.0, 0.5, 1.0, 1.0]])}, ValueError, "must hold 1"),
        ({"attention_mask": torch.ones(1, 4, dtype=torch.complex64)}, TypeError, "attention_mask must be"),
        ({"position_ids": torch.tensor([[0, 1, -1, 0]])}, ValueError, "position_ids must be >= 0"),
        ({"document_ids": [[0, 0, 1, 1]]}, TypeError, "document_ids must be a tensor"),
    ],
)
def test_layout_errors(kwargs, error, match, make_ours):
    model = make_ours("llama")
    with pytest.raises(error, match=match):
        model(torch.zeros(1, 4, dtype=torch.int64), **kwargs)


def test_padding_between_documents_is_allowed():
    lay = layout((1, 6), "cpu", attention_mask=torch.tensor([[1, 1, 0, 1, 1, 0]]),
                 document_ids=torch.tensor([[0, 0, 0, 1, 1, 1]]))
    assert lay.key_start.tolist() == [[0, 0, 0, 3, 3, 3]]
    # the padding may carry either document's id
    lay = layout((1, 6), "cpu", attention_mask=torch.tensor([[1, 1, 0, 0, 1, 1]]),
                 document_ids=torch.tensor([[0, 0, 1, 1, 1, 1]]))
    assert lay.key_start.tolist() == [[0, 0, 2, 2, 4, 4]]
    with pytest.raises(ValueError, match="sequence 0, position 4"):
        layout((1, 6), "cpu", attention_mask=torch.tensor([[1, 1, 0, 0, 1, 1]]),
               document_ids=torch.tensor([[0, 0, 0, 0, 0, 1]]))


def test_padded_positions_cannot_be_kept(make_ours):
    model = make_ours("llama")
    ids, mask = _ids(512, 21, (1, 6)), torch.tensor([[1, 1, 1, 1, 0, 0]])
    out = model(ids, labels=ids, attention_mask=mask)
    keep = torch.ones(1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="ignore_index"):
        filtered_mean(out.token_loss, keep, labels=out.labels)


@pytest.mark.parametrize("case", ["left padding", "right padding", "packed documents"])
def test_loss_labels_are_the_forwards_labels(case):
    # The normaliser a trainer counts before the forward must see the positions the forward keeps.
    model = collider_models.from_preset("tinyllama-tiny")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 512, (2, 12), generator=gen)
    extra = {}
    if case == "left padding":
        extra["attention_mask"] = (torch.arange(12) >= torch.tensor([[3], [0]])).long()
    elif case == "right padding":
        extra["attention_mask"] = (torch.arange(12) < torch.tensor([[9], [12]])).long()
    else:
        extra["document_ids"] = (torch.arange(12) >= torch.tensor([[5], [8]])).long()
    with torch.no_grad():
        out = model(ids, labels=ids, **extra)
    got = collider_models.loss_labels(ids, **extra)
    assert torch.equal(got, out.labels)
    assert int((got == -100).sum()) > 2  # the case really ignores positions beyond the last one
