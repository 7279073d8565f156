"""The fused add + RMSNorm equals ``h = x + residual; rms_norm(h)``: both outputs and every
gradient, dense and sparse (shared kept rows, different kept rows, one output unused)."""

import pytest
import torch
from autograd_testing import assert_all_close, kept_index, outputs_and_grads, sparse_grad

from collider_autograd import RMSNorm, TokenSparseTensor, add_rms_norm, rms_norm

B, T, H = 3, 7, 10
EPS = 1e-6


def _leaves(gen, dtype=torch.float64):
    x = torch.randn(B, T, H, generator=gen, dtype=dtype).requires_grad_()
    r = torch.randn(B, T, H, generator=gen, dtype=dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(H, generator=gen, dtype=dtype)).requires_grad_()
    return x, r, w


def _unfused(x, r, w):
    h = x + r
    return rms_norm(h, w, EPS), h


def _sparse(gen, index):
    return sparse_grad(gen, index, (B, T), H)


def _index(gen, share):
    return kept_index(gen, B * T, share)


def _run(fn, leaves, grads):
    return outputs_and_grads(fn(*leaves), leaves, grads)


def _grads(kind, gen):
    if kind == "dense":
        return [torch.randn(B, T, H, generator=gen, dtype=torch.float64) for _ in range(2)]
    if kind in ("sparse", "none kept"):
        index = _index(gen, 0.5 if kind == "sparse" else 0.0)
        return [_sparse(gen, index), _sparse(gen, index)]
    if kind == "norm only":
        return [_sparse(gen, _index(gen, 0.5)), None]
    if kind == "sum only":
        return [None, _sparse(gen, _index(gen, 0.5))]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["dense", "sparse", "none kept", "norm only", "sum only"])
def test_equals_add_then_norm(kind):
    gen = torch.Generator().manual_seed(0)
    leaves = _leaves(gen)
    grads = _grads(kind, gen)
    want = _run(_unfused, leaves, grads)
    assert_all_close(_run(lambda x, r, w: add_rms_norm(x, r, w, EPS), leaves, grads), want)


def test_sparse_gradient_keeps_its_rows():
    gen = torch.Generator().manual_seed(1)
    x, r, w = _leaves(gen)
    index = _index(gen, 0.4)
    seen = {}
    x_in = x * 1.0
    x_in.register_hook(lambda g: seen.setdefault("grad", g))
    y, h = add_rms_norm(x_in, r, w, EPS)
    torch.autograd.backward([y, h], [_sparse(gen, index), _sparse(gen, index)])
    assert isinstance(seen["grad"], TokenSparseTensor) and seen["grad"].index is index


def test_different_kept_rows_behave_as_the_unfused_sum():
    """Gradients of y and h keeping different rows are summed as autograd sums them (here the
    union of the rows: hand-made gradients belong to no filtered_mean term)."""
    gen = torch.Generator().manual_seed(2)
    leaves = _leaves(gen)
    grads = [_sparse(gen, _index(gen, 0.5)), _sparse(gen, _index(gen, 0.5))]
    want = _run(_unfused, leaves, grads)
    got = _run(lambda x, r, w: add_rms_norm(x, r, w, EPS), leaves, grads)
    assert all(w is not None for w in want)
    assert_all_close(got, want)


def test_frozen_weight_and_module_form():
    gen = torch.Generator().manual_seed(3)
    x, r, _ = _leaves(gen)
    norm = RMSNorm(H, eps=EPS).double().requires_grad_(False)
    y, h = norm(x, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, norm(x + r))
    (y.sum() + h.sum()).backward()
    assert norm.weight.grad is None and x.grad is not None and torch.equal(x.grad, r.grad)


def test_mixed_dtypes_promote_as_plus_does():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, H, generator=gen, requires_grad=True)  # an fp32 stream
    a = torch.randn(B, T, H, generator=gen).bfloat16().requires_grad_()  # a bf16 branch (autocast)
    w = torch.ones(H)
    y, h = add_rms_norm(x, a, w, EPS)
    assert h.dtype == y.dtype == torch.float32
    torch.testing.assert_close(h, x + a)
    y.sum().backward()
    assert a.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.float32


def test_bad_residual_shape_is_named():
    x = torch.randn(B, T, H)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        add_rms_norm(x, torch.randn(B, T, H + 1), torch.ones(H), EPS)
