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
