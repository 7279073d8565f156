"""Token selection rules."""

import pytest
import torch

from collider_autograd import excess_loss, select_random, select_threshold, select_top_k


def test_top_k_per_batch_keeps_the_highest_scores():
    scores = torch.randn(4, 50, dtype=torch.float64)
    keep = select_top_k(scores, 0.3)
    assert keep.sum() == 60
    assert scores[keep].min() >= scores[~keep].max()


def test_top_k_per_sequence_keeps_the_same_share_in_each_row_and_respects_valid():
    scores = torch.randn(3, 20)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1, 10:] = False
    keep = select_top_k(scores, 0.5, per="sequence", valid=valid)
    assert keep.sum(1).tolist() == [10, 5, 10]
    assert not (keep & ~valid).any()
    for b in range(3):
        kept, dropped = scores[b][keep[b]], scores[b][valid[b] & ~keep[b]]
        assert kept.min() >= dropped.max()


def test_threshold_random_and_excess_loss():
    scores = torch.tensor([[0.1, 0.5, 0.9]])
    assert select_threshold(scores, 0.5).tolist() == [[False, False, True]]
    keep = select_random((100, 100), 0.4, generator=torch.Generator().manual_seed(0))
    assert 0.37 < keep.float().mean() < 0.43
    a, b = torch.rand(2, 3), torch.rand(2, 3)
    torch.testing.assert_close(excess_loss(a, b), a - b)


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        select_top_k(torch.tensor([[float("nan"), 1.0]]), 0.5)
    with pytest.raises(ValueError, match="fraction"):
        select_top_k(torch.rand(2, 3), 1.5)
    with pytest.raises(ValueError, match="per"):
        select_top_k(torch.rand(2, 3), 0.5, per="token")
    with pytest.raises(ValueError, match="reference_loss"):
        excess_loss(torch.rand(2, 3), torch.rand(3, 2))


INF = float("inf")


@pytest.mark.parametrize("per", ["batch", "sequence"])
def test_invalid_positions_are_never_kept_even_when_valid_scores_are_minus_inf(per):
    scores = torch.tensor([[-INF, -INF, 1.0, -INF, 2.0], [-INF, 0.0, -INF, -INF, -INF]])
    valid = torch.tensor([[True, False, False, True, False], [True, True, False, False, True]])
    keep = select_top_k(scores, 1.0, per=per, valid=valid)
    assert torch.equal(keep, valid)  # everything valid, nothing else, -inf scores included
    keep = select_top_k(scores, 0.5, per=per, valid=valid)
    assert not (keep & ~valid).any()
    assert keep[1, 1]  # the one finite valid score of row 1 ranks first
    nan_invalid = scores.masked_fill(~valid, float("nan"))  # NaN where invalid is allowed
    assert torch.equal(select_top_k(nan_invalid, 1.0, per=per, valid=valid), valid)


def test_ties_infinities_and_extremes():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5, INF, -INF]])
    assert select_top_k(scores, 0.5).tolist() == [[True, True, False, False, True, False]]  # ties: earlier first
    assert select_top_k(scores, 0.0).sum() == 0
    assert select_top_k(scores, 1.0).all()
    nothing_valid = torch.zeros_like(scores, dtype=torch.bool)
    for per in ("batch", "sequence"):
        assert select_top_k(scores, 1.0, per=per, valid=nothing_valid).sum() == 0
        assert select_top_k(torch.empty(0, 4), 0.5, per=per).shape == (0, 4)
        assert select_top_k(torch.empty(3, 0), 0.5, per=per).shape == (3, 0)
    # per sequence: each row keeps round(fraction * its valid count), half to even
    scores = torch.randn(2, 6, dtype=torch.float64)
    valid = torch.tensor([[True] * 6, [True] * 5 + [False]])
    assert select_top_k(scores, 0.5, per="sequence", valid=valid).sum(1).tolist() == [3, 2]
    assert select_top_k(scores.to(torch.bfloat16), 0.5, valid=valid).sum() == 6


def test_more_bad_inputs():
    with pytest.raises(ValueError, match="fraction"):
        select_top_k(torch.rand(2, 3), float("nan"))
    with pytest.raises(ValueError, match="fraction"):
        select_top_k(torch.rand(2, 3), "0.5")
    with pytest.raises(ValueError, match="valid"):
        select_top_k(torch.rand(2, 3), 0.5, valid=torch.ones(2, 3))
    with pytest.raises(ValueError, match="valid"):
        select_random((2, 3), 0.5, valid=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        select_top_k(torch.tensor([[float("nan"), 1.0]]), 0.5, per="sequence")


@pytest.mark.parametrize("per", ["batch", "sequence"])
def test_top_k_counts_round_half_to_even_like_python(per):
    # 0.5 * 5 = 2.5 rounds to 2 and 0.5 * 7 = 3.5 to 4, as Python's round() does
    scores = torch.randn(2, 7, dtype=torch.float64)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[0, 5:] = False  # row 0: 5 valid positions, row 1: 7
    keep = select_top_k(scores, 0.5, per=per, valid=valid)
    if per == "batch":
        assert int(keep.sum()) == round(0.5 * 12)
    else:
        assert keep.sum(1).tolist() == [round(0.5 * 5), round(0.5 * 7)] == [2, 4]


def test_top_k_without_validation_skips_the_nan_check_and_ranks_nan_as_zero():
    scores = torch.tensor([[3.0, float("nan"), -1.0, 2.0]])
    with pytest.raises(ValueError, match="NaN"):
        select_top_k(scores, 0.5)
    keep = select_top_k(scores, 0.75, validate=False)
    assert keep.tolist() == [[True, True, False, True]]  # NaN (as 0) ranks above -1


@pytest.mark.parametrize("per", ["batch", "sequence"])
def test_top_k_counts_are_what_select_top_k_keeps(per):
    from collider_autograd import top_k_counts

    g = torch.Generator().manual_seed(3)
    for fraction in (0.0, 0.35, 0.5, 0.6, 1.0):
        valid = torch.rand(5, 13, generator=g) < 0.7
        keep = select_top_k(torch.randn(5, 13, generator=g), fraction, per=per, valid=valid)
        want = keep.sum().reshape(1) if per == "batch" else keep.sum(1)
        assert top_k_counts(valid, fraction, per=per).long().tolist() == want.tolist()
    with pytest.raises(ValueError, match="per must be"):
        top_k_counts(valid, 0.5, per="token")
    with pytest.raises(ValueError, match="fraction"):
        top_k_counts(valid, 1.5)
