"""TokenSparseTensor: compact rules equal their dense meaning; an op without a rule raises by default
and densifies (warned, counted) only under allow_densify(); leaves get dense gradients."""

import warnings

import pytest
import torch

from collider_autograd import (
    SparseGradientError,
    TokenSparseTensor,
    allow_densify,
    densify_allowed,
    densify_counts,
    filtered_mean,
    linear,
    reset_densify_counts,
)


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


@pytest.mark.parametrize("shape", [(21, 4), (3, 7, 2, 2), (21, 2, 2), (3, 7, 4), (3, 28), (84,)])
def test_views_over_token_or_feature_dims_stay_sparse(shape):
    reset_densify_counts()
    s = _random_sparse()
    out = s.view(shape)
    assert isinstance(out, TokenSparseTensor)
    torch.testing.assert_close(out.to_dense(), s.to_dense().view(shape))
    assert densify_counts() == {}


def test_views_and_permutes_mixing_token_and_feature_dims_make_those_dims_token_dims():
    reset_densify_counts()
    s = _random_sparse()
    for out, ref in ((s.view(3, 28), s.to_dense().view(3, 28)), (s.transpose(1, 2), s.to_dense().transpose(1, 2))):
        assert isinstance(out, TokenSparseTensor)
        torch.testing.assert_close(out.to_dense(), ref)
    assert s.transpose(1, 2).token_shape == (3, 4, 7)  # each entry of a kept row is kept
    assert densify_counts() == {}


def test_unknown_op_raises_naming_it_and_densifies_once_warned_when_allowed():
    reset_densify_counts()
    s = _random_sparse(seed=3)
    with pytest.raises(SparseGradientError, match="op 'cos' has no sparse rule") as info:
        torch.cos(s)
    message = str(info.value)
    assert "plain masked mean" in message and "allow_densify" in message and ".to_dense()" in message
    assert not densify_allowed()
    with allow_densify(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert densify_allowed()
        out1 = torch.cos(s)
        out2 = torch.cos(s)  # the warning is shown once per op, the count grows
    assert not densify_allowed()
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


def _terms(s, *terms):
    return TokenSparseTensor(s.values, s.index, s.token_shape, terms)


def test_sums_of_terms_exact_or_a_clear_error():
    a = _terms(_random_sparse(seed=6), 1)
    same_rows = TokenSparseTensor(torch.randn_like(a.values), a.index.clone(), a.token_shape, {2})
    out = a + same_rows  # two terms, the same kept rows: every term detaches the same keys/values
    assert isinstance(out, TokenSparseTensor) and out.terms == {1, 2}
    torch.testing.assert_close(out.to_dense(), a.to_dense() + same_rows.to_dense())
    other_rows = _terms(_random_sparse(seed=7), 2)
    with pytest.raises(SparseGradientError, match="two filtered_mean terms with different kept sets.*retain_graph"):
        a + other_rows
    union = a + _terms(_random_sparse(seed=7), 1)  # one term along two branches: the union of rows
    assert union.terms == {1}
    torch.testing.assert_close(union.to_dense(), a.to_dense() + _random_sparse(seed=7).to_dense())
    dense = torch.randn(a.shape, dtype=a.dtype)
    with pytest.raises(SparseGradientError, match="meets a dense gradient.*retain_graph"):
        a + dense
    reset_densify_counts()  # (its warning is shown once per process, so count instead)
    with allow_densify():
        torch.testing.assert_close(dense + a, dense + a.to_dense())
    assert sum(densify_counts().values()) >= 1
    empty = TokenSparseTensor(a.values[:0], a.index[:0], a.token_shape, {3})
    torch.testing.assert_close(empty + dense, dense)  # a term that keeps nothing adds nothing
    assert (empty + other_rows).terms == {2}
    full = _random_sparse(p=1.1, seed=8)  # every row kept: detaches nothing, sums like a dense tensor
    assert full.is_full
    got = full + dense
    assert type(got) is torch.Tensor
    torch.testing.assert_close(got, full.to_dense() + dense)


def test_in_place_ops_work_or_raise_never_silently_nothing():
    s = _random_sparse(seed=9)
    ref = s.to_dense()
    s.mul_(3.0)
    torch.testing.assert_close(s.to_dense(), ref * 3)
    s.div_(torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(s.to_dense(), ref * 1.5)
    s.add_(s.clone())
    torch.testing.assert_close(s.to_dense(), ref * 3)
    s.zero_()
    assert s.to_dense().abs().max() == 0 and s.index.numel() == 0
    for op in (lambda t: t.clamp_(-1, 1), lambda t: t.add_(torch.ones(t.shape, dtype=t.dtype)), lambda t: t.exp_()):
        with pytest.raises(SparseGradientError, match="in-place"):
            op(_random_sparse(seed=10))
        with allow_densify(), pytest.raises(SparseGradientError, match="in-place"):
            op(_random_sparse(seed=10))


def test_leaves_get_dense_grads_that_in_place_ops_act_on():
    gen = torch.Generator().manual_seed(0)
    per_token = torch.nn.Parameter(torch.rand(4, 6, generator=gen, dtype=torch.float64) + 0.5)
    loss = torch.rand(4, 6, generator=gen, dtype=torch.float64)
    keep = torch.rand(4, 6, generator=gen) < 0.5
    keep[0, 0] = True
    filtered_mean(loss * per_token, keep).backward()
    grad = per_token.grad
    assert type(grad) is torch.Tensor  # not a TokenSparseTensor
    torch.testing.assert_close(grad, loss * keep / keep.sum())
    norm = torch.nn.utils.clip_grad_norm_([per_token], max_norm=1e-3)
    torch.testing.assert_close(norm, (loss * keep / keep.sum()).norm())
    torch.testing.assert_close(per_token.grad.norm(), torch.tensor(1e-3, dtype=torch.float64))
    clipped = per_token.grad.clone()
    filtered_mean(loss * per_token, keep).backward()  # accumulates into the dense .grad in place
    assert per_token.grad is grad
    torch.testing.assert_close(per_token.grad, clipped + loss * keep / keep.sum())
    opt = torch.optim.SGD([per_token], lr=0.1)
    opt.zero_grad(set_to_none=False)
    assert per_token.grad is not None and per_token.grad.abs().max() == 0
    filtered_mean(loss * per_token, keep).backward()
    torch.testing.assert_close(per_token.grad, loss * keep / keep.sum())


def test_index_derived_once_per_index_and_again_after_an_in_place_change():
    from collider_autograd.layers._rows import index_derived

    index = torch.tensor([1, 4, 6, 9])
    calls = []

    def offsets():
        calls.append(1)
        return index // 5

    first = index_derived(index, ("offsets", 2, 5), offsets)
    assert index_derived(index, ("offsets", 2, 5), offsets) is first and len(calls) == 1
    assert torch.equal(index_derived(index, ("positions", 5), lambda: index % 5), torch.tensor([1, 4, 1, 4]))
    index[0] = 2  # in place: the version moves on, the derived value is made again
    again = index_derived(index, ("offsets", 2, 5), offsets)
    assert len(calls) == 2 and torch.equal(again, torch.tensor([0, 0, 1, 1]))
    other = torch.tensor([1, 4, 6, 9])  # an equal but different tensor has its own
    assert torch.equal(index_derived(other, ("offsets", 2, 5), lambda: other // 5), torch.tensor([0, 0, 1, 1]))
