"""TokenSparseTensor: compact rules equal their dense meaning; everything else densifies, counted."""

import warnings

import pytest
import torch

from collider_autograd import TokenSparseTensor, densify_counts, reset_densify_counts


def _random_sparse(B=3, T=7, F=(4,), p=0.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B * T, generator=g) < p
    index = keep.nonzero().squeeze(1)
    values = torch.randn((index.numel(),) + F, generator=g, dtype=dtype)
    return TokenSparseTensor(values, index, (B, T))


def test_to_dense_places_rows_and_zeros_elsewhere():
    s = _random_sparse()
    d = s.to_dense()
    assert d.shape == s.shape == (3, 7, 4)
    flat = d.view(21, 4)
    torch.testing.assert_close(flat[s.index], s.values)
    mask = torch.ones(21, dtype=torch.bool)
    mask[s.index] = False
    assert flat[mask].abs().max() == 0


def test_add_same_and_different_index_stays_sparse():
    reset_densify_counts()
    a = _random_sparse(seed=1)
    b = a.with_values(torch.randn_like(a.values))
    c = _random_sparse(seed=2)
    for x, y in ((a, b), (a, c)):
        out = torch.ops.aten.add.Tensor(x, y)
        assert isinstance(out, TokenSparseTensor)
        torch.testing.assert_close(out.to_dense(), x.to_dense() + y.to_dense())
        assert bool((out.index[1:] > out.index[:-1]).all())
    assert densify_counts() == {}


@pytest.mark.parametrize("shape", [(21, 4), (3, 7, 2, 2), (21, 2, 2), (3, 7, 4)])
def test_views_over_token_or_feature_dims_stay_sparse(shape):
    reset_densify_counts()
    s = _random_sparse()
    out = s.view(shape)
    assert isinstance(out, TokenSparseTensor)
    torch.testing.assert_close(out.to_dense(), s.to_dense().view(shape))
    assert densify_counts() == {}


def test_view_mixing_token_and_feature_dims_densifies_with_warning_and_count():
    reset_densify_counts()
    s = _random_sparse()
    with pytest.warns(UserWarning, match="densified"):
        out = s.view(3, 28)  # merges T with features: no sparse rule
    assert not isinstance(out, TokenSparseTensor)
    torch.testing.assert_close(out, s.to_dense().view(3, 28))
    assert sum(densify_counts().values()) == 1


def test_unknown_op_densifies_correctly_and_warns_once():
    reset_densify_counts()
    s = _random_sparse(seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = torch.cos(s)
        out2 = torch.cos(s)  # the warning is shown once per op, the count grows
    assert [str(w.message).split("'")[1] for w in caught] == ["cos"]
    torch.testing.assert_close(out1, torch.cos(s.to_dense()))
    torch.testing.assert_close(out2, out1)
    assert densify_counts() == {"cos": 2}


def test_scalar_mul_detach_clone_cast_stay_sparse():
    reset_densify_counts()
    s = _random_sparse(seed=4)
    torch.testing.assert_close((s * 2.5).to_dense(), s.to_dense() * 2.5)
    assert isinstance(s.detach(), TokenSparseTensor)
    c = s.clone()
    assert isinstance(c, TokenSparseTensor) and c.values.data_ptr() != s.values.data_ptr()
    f = s.to(torch.float32)
    assert isinstance(f, TokenSparseTensor) and f.dtype == torch.float32
    torch.testing.assert_close(f.to_dense(), s.to_dense().float())
    assert densify_counts() == {}


def test_autograd_accepts_it_as_a_gradient_and_sums_branches():
    x = torch.randn(3, 7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, dtype=torch.float64)
    from collider_autograd import linear

    h = linear(x, w)
    y = h + linear(h, w)  # residual: two sparse gradients meet at h
    s = _random_sparse(seed=5)
    reset_densify_counts()
    y.backward(s)
    dense_x = x.detach().clone().requires_grad_()
    hd = dense_x @ w.t()
    (hd + hd @ w.t()).backward(s.to_dense())
    got = x.grad.to_dense() if isinstance(x.grad, TokenSparseTensor) else x.grad
    torch.testing.assert_close(got, dense_x.grad)
    assert densify_counts() == {}


def test_repr_names_kept_count():
    assert "kept=" in repr(_random_sparse())


def test_views_keep_the_token_dims_when_sizes_are_one():
    # B = T = 1 and one head: (1, 1, 4) -> (1, 1, 1, 4) must keep (B, T) as the token dims
    s = TokenSparseTensor(torch.randn(1, 4, dtype=torch.float64), torch.tensor([0]), (1, 1))
    v = s.view(1, 1, 1, 4)
    assert isinstance(v, TokenSparseTensor) and v.token_shape == (1, 1) and v.values.shape == (1, 1, 4)


def test_rows_like_shapes_from_the_target_and_checks_token_count():
    s = _random_sparse(B=2, T=3, F=(8,))
    r = s.rows_like(torch.randn(s.index.numel(), 2, 4, dtype=torch.float64), (2, 3, 2, 4), feature_ndim=2)
    assert r.token_shape == (2, 3) and r.shape == (2, 3, 2, 4) and r.index is s.index
    with pytest.raises(ValueError, match="tokens"):
        s.rows_like(s.values, (5, 8))
