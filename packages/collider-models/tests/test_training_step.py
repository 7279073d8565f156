"""One step on one process with the built-in selection rules: the kept tokens are the rule's,
the normaliser counts every kept token of every micro-batch, and the gradients equal the
masked mean of the whole step's batch."""

import torch

import collider_models
from collider_autograd import excess_loss, select_top_k
from collider_models.reference import detach_filtered_kv
from collider_models.training.distributed import Dist
from collider_models.training.step import Selection, accumulate_gradients


def _model(seed):
    torch.manual_seed(seed)
    return collider_models.from_preset("tinyllama-tiny").double()


def _batches(K=2, B=2, T=10):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 512, (B, T), generator=gen) for _ in range(K)]


def test_excess_selection_over_micro_batches_equals_the_whole_batch():
    model, reference = _model(0), _model(1).requires_grad_(False).eval()
    micro = _batches()
    stats = accumulate_gradients(model, micro, Selection("excess", 0.4, reference), Dist())
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    # The dense contract reference: top-k of the excess loss within each micro-batch, filtered
    # K/V rows detached, masked sum over the step's total kept count.
    expected = _model(0)
    keeps = []
    for ids in micro:
        valid = torch.ones_like(ids, dtype=torch.bool)
        valid[:, -1] = False
        with torch.no_grad():
            scores = excess_loss(expected(ids, labels=ids).token_loss, reference(ids, labels=ids).token_loss)
        keeps.append(select_top_k(scores, 0.4, valid=valid))
    total = sum(int(k.sum()) for k in keeps)
    for ids, keep in zip(micro, keeps, strict=True):
        with detach_filtered_kv(expected, keep):
            ((expected(ids, labels=ids).token_loss * keep).sum() / total).backward()
    assert stats.kept == sum(round(0.4 * 2 * 9) for _ in micro) == total
    assert stats.predicted == 2 * 2 * 9
    for name, p in expected.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-10, atol=1e-13, msg=name)


def test_random_selection_is_fixed_by_seed_step_and_rank():
    valids = [torch.ones(4, 12, dtype=torch.bool) for _ in range(2)]
    sel = Selection("random", 0.5, seed=3)
    counts = sel.plan(valids, step=5, rank=0)
    masks = list(sel._masks)
    assert counts == [int(m.sum()) for m in masks] and 0 < sum(counts) < 96
    again = Selection("random", 0.5, seed=3)
    again.plan(valids, step=5, rank=0)
    assert all(torch.equal(a, b) for a, b in zip(masks, again._masks, strict=True))
    other = Selection("random", 0.5, seed=3)
    other.plan(valids, step=5, rank=1)
    assert not all(torch.equal(a, b) for a, b in zip(masks, other._masks, strict=True))


def test_loss_selection_keeps_the_highest_losses():
    model = _model(0)
    (ids,) = _batches(K=1)
    stats = accumulate_gradients(model, [ids], Selection("loss", 0.25), Dist())
    with torch.no_grad():
        token_loss = _model(0)(ids, labels=ids).token_loss[:, :-1]
    top = token_loss.reshape(-1).topk(round(0.25 * token_loss.numel())).values
    assert stats.kept == top.numel()
    assert abs(stats.loss - float(top.mean())) < 1e-9


def test_masked_loss_baseline_has_the_dense_masked_mean_gradient():
    model = _model(0)
    micro = _batches()
    stats = accumulate_gradients(model, micro, Selection("loss", 0.5), Dist(), masked_loss=True)
    expected = _model(0)
    keeps = []
    for ids in micro:
        with torch.no_grad():
            token_loss = expected(ids, labels=ids).token_loss
        valid = torch.ones_like(ids, dtype=torch.bool)
        valid[:, -1] = False
        keeps.append(select_top_k(token_loss, 0.5, valid=valid))
    total = sum(int(k.sum()) for k in keeps)
    for ids, keep in zip(micro, keeps, strict=True):  # no K/V detached: the plain masked mean
        ((expected(ids, labels=ids).token_loss * keep).sum() / total).backward()
    assert stats.kept == total
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=name)


def test_marked_tokens_are_counted_by_the_labels_they_are():
    model = _model(0)
    (ids,) = _batches(K=1)
    marked = torch.zeros_like(ids, dtype=torch.bool)
    marked[0, 3:7] = True  # tokens 3..6 are predicted at positions 2..5
    stats = accumulate_gradients(model, [ids], Selection("loss", 1.0), Dist(), marked=[marked])
    assert stats.marked == 4 and stats.kept_marked == 4
    marked[:, 0] = True  # the first token is never predicted
    stats = accumulate_gradients(model, [ids], Selection("loss", 1.0), Dist(), marked=[marked])
    assert stats.marked == 4
