"""filtered_mean: the masked mean's value, a sparse gradient, and clear errors on bad input."""

import pytest
import torch

from collider_autograd import TokenSparseTensor, filtered_mean


def _inputs(seed=0, p=0.5):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(4, 9, generator=g, dtype=torch.float64) * 5
    keep = torch.rand(4, 9, generator=g) < p
    keep[0, 0] = True
    return loss.requires_grad_(), keep


def test_value_and_gradient_equal_masked_mean():
    loss, keep = _inputs()
    out = filtered_mean(loss, keep)
    ref = (loss * keep).sum() / keep.sum()
    torch.testing.assert_close(out, ref)
    (grad,) = torch.autograd.grad(out, loss)
    assert isinstance(grad, TokenSparseTensor)
    (ref_grad,) = torch.autograd.grad(ref, loss)
    torch.testing.assert_close(grad.to_dense(), ref_grad)


def test_everything_kept_gives_the_dense_gradient():
    loss, _ = _inputs(4)
    keep = torch.ones(4, 9, dtype=torch.bool)
    (grad,) = torch.autograd.grad(filtered_mean(loss, keep), loss)
    assert type(grad) is torch.Tensor
    torch.testing.assert_close(grad, torch.full_like(loss, 1 / 36))


def test_global_normalizer():
    loss, keep = _inputs(1)
    out = filtered_mean(loss, keep, normalizer=100.0)
    torch.testing.assert_close(out, (loss * keep).sum() / 100.0)
    (grad,) = torch.autograd.grad(out, loss)
    torch.testing.assert_close(grad.values, torch.full_like(grad.values, 0.01))


@pytest.mark.parametrize("normalizer", [None, 0.0])
def test_nothing_kept_is_zero_loss_and_zero_gradient(normalizer):
    loss, _ = _inputs(2)
    keep = torch.zeros(4, 9, dtype=torch.bool)
    out = filtered_mean(loss, keep, normalizer=normalizer)
    assert out.item() == 0.0
    (grad,) = torch.autograd.grad(out, loss)
    assert grad.to_dense().abs().max() == 0


def test_bad_inputs_name_the_argument():
    loss, keep = _inputs(3)
    with pytest.raises(TypeError, match="keep"):
        filtered_mean(loss, keep.float())
    with pytest.raises(ValueError, match="keep must have token_loss's shape"):
        filtered_mean(loss, keep[:, :-1])
    with pytest.raises(TypeError, match="token_loss"):
        filtered_mean(torch.ones(4, 9, dtype=torch.int64), keep)
    labels = torch.zeros(4, 9, dtype=torch.int64)
    labels[0, 0] = -100
    with pytest.raises(ValueError, match="ignore_index"):
        filtered_mean(loss, keep, labels=labels)
    bad = loss.detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        filtered_mean(bad, keep)
    with pytest.raises(ValueError, match="normalizer"):
        filtered_mean(loss, keep, normalizer=-1.0)
    # a NaN at a filtered position is not an error: it never enters the loss
    ok = loss.detach().clone()
    ok[~keep] = float("nan")
    assert torch.isfinite(filtered_mean(ok, keep))
