"""filtered_mean: the masked mean's value, a sparse gradient, and clear errors on bad input."""

import pytest
import torch

from collider_autograd import TokenSparseTensor, filtered_mean, linear


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


def test_everything_kept_gives_a_full_gradient_that_layers_treat_as_dense():
    loss, _ = _inputs(4)
    keep = torch.ones(4, 9, dtype=torch.bool)
    (grad,) = torch.autograd.grad(filtered_mean(loss, keep), loss)
    assert isinstance(grad, TokenSparseTensor) and grad.is_full
    torch.testing.assert_close(grad.to_dense(), torch.full_like(loss, 1 / 36))
    # A layer runs its ordinary dense backward on it and returns dense gradients ...
    x = torch.randn(4, 9, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 5, dtype=torch.float64)
    (dx,) = torch.autograd.grad(filtered_mean(linear(x, w).squeeze(-1), keep), x)
    assert type(dx) is torch.Tensor
    torch.testing.assert_close(dx, (w / 36).expand(4, 9, 5))
    # ... while a slice of it keeps the other tokens out (their keys/values stay detached).
    (grad,) = torch.autograd.grad(filtered_mean(loss[:, 1:], keep[:, 1:]), loss)
    assert isinstance(grad, TokenSparseTensor) and not grad.is_full
    assert set(grad.index.tolist()) == {b * 9 + t for b in range(4) for t in range(1, 9)}


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_losses_count_and_divide_in_fp32(dtype):
    n = 70_000  # more than fp16's largest finite value (65504) kept positions
    loss = torch.full((2, n), 0.5, dtype=dtype, requires_grad=True)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, : n - 257] = False  # n + 257 kept: bf16 would round the count
    out = filtered_mean(loss, keep)
    assert out.dtype == dtype and out.item() == 0.5
    (grad,) = torch.autograd.grad(out, loss)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.values.float(), torch.full((n + 257,), 1 / (n + 257)), rtol=2e-2, atol=0)
    assert bool((grad.values > 0).all())
    ones = torch.ones(1, 257, dtype=dtype)
    assert filtered_mean(ones, torch.ones(1, 257, dtype=torch.bool)).item() == 1.0  # 257 is not a bf16 number


def test_normalizer_errors_and_its_gradient():
    loss, keep = _inputs(5)
    with pytest.raises(ValueError, match="normalizer is 0 but .* positions are kept"):
        filtered_mean(loss, keep, normalizer=0)
    with pytest.raises(ValueError, match="normalizer is 0"):
        filtered_mean(loss, keep, normalizer=torch.tensor(0.0))
    for bad in ("10", [3.0], True, object()):
        with pytest.raises(TypeError, match="normalizer must be a number"):
            filtered_mean(loss, keep, normalizer=bad)
    with pytest.raises(TypeError, match="0-dim"):
        filtered_mean(loss, keep, normalizer=torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="finite"):
        filtered_mean(loss, keep, normalizer=float("nan"))
    # Without validation a zero tensor normalizer is not checked, but the loss is loud, not zero.
    assert torch.isinf(filtered_mean(loss, keep, normalizer=torch.tensor(0.0), validate=False))
    # Integer counts (e.g. all-reduced keep.sum()) work as they are.
    count = torch.tensor(50)
    torch.testing.assert_close(filtered_mean(loss, keep, normalizer=count), (loss * keep).sum() / 50)
    # A normalizer that requires grad gets its gradient.
    norm = torch.tensor(40.0, dtype=torch.float64, requires_grad=True)
    g_loss, g_norm = torch.autograd.grad(filtered_mean(loss, keep, normalizer=norm), (loss, norm))
    norm_ref = norm.detach().clone().requires_grad_()
    ref_loss, ref_norm = torch.autograd.grad((loss * keep).sum() / norm_ref, (loss, norm_ref))
    torch.testing.assert_close(g_norm, ref_norm)
    torch.testing.assert_close(g_loss.to_dense(), ref_loss)
    nothing = torch.zeros_like(keep)
    (g_norm,) = torch.autograd.grad(filtered_mean(loss, nothing, normalizer=norm), norm)
    assert g_norm.item() == 0.0


def test_zero_dim_loss_is_an_error():
    with pytest.raises(ValueError, match="token"):
        filtered_mean(torch.tensor(1.0), torch.tensor(True))


def test_kept_count_gives_the_same_loss_and_gradient_and_is_checked():
    loss, keep = _inputs(7)
    n = int(keep.sum())
    ref = filtered_mean(loss, keep)
    (grad_ref,) = torch.autograd.grad(ref, loss)
    for validate in (True, False):
        out = filtered_mean(loss, keep, kept_count=n, validate=validate)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        (grad,) = torch.autograd.grad(out, loss)
        assert torch.equal(grad.index, grad_ref.index)
        torch.testing.assert_close(grad.to_dense(), grad_ref.to_dense(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="kept_count is 3 but keep has"):
        filtered_mean(loss, keep, kept_count=3)
    for bad in (-1, keep.numel() + 1, True, 2.0):
        with pytest.raises(ValueError, match="kept_count must be an integer"):
            filtered_mean(loss, keep, kept_count=bad)
    nothing = torch.zeros_like(keep)
    out = filtered_mean(loss, nothing, normalizer=5.0, kept_count=0, validate=False)
    assert out.item() == 0
    (grad,) = torch.autograd.grad(out, loss)
    assert grad.to_dense().abs().sum() == 0
