"""The fused GELU MLP equals the two-layer composition (Linear, gelu_new, Linear): outputs and
every gradient, dense and sparse, with and without biases; frozen weights cost no GEMM; the
activation is not saved for the backward."""

import importlib

import pytest
import torch
from autograd_testing import assert_all_close

from collider_autograd import TokenSparseTensor, gelu_mlp, gelu_new, linear

B, T, H, I = 3, 7, 12, 20
gelu_mlp_module = importlib.import_module("collider_autograd.layers.gelu_mlp")  # the module, not the function


def _params(gen, bias, dtype=torch.float64):
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    ws = [r(I, H), r(H, I)]
    bs = [r(I), r(H)] if bias else [None, None]
    return ws, bs


def _reference(x, ws, bs):
    return linear(gelu_new(linear(x, ws[0], bs[0])), ws[1], bs[1])


def _grads(fn, x, ws, bs, grad):
    leaves = [t for t in [x, *ws, *bs] if t is not None]
    for t in leaves:
        t.grad = None
    y = fn(x, ws, bs)
    y.backward(grad)
    return y.detach(), [t.grad.clone() for t in leaves]


def _sparse_grad(gen, keep_share):
    keep = torch.rand(B * T, generator=gen) < keep_share
    index = keep.nonzero().squeeze(1)
    values = torch.randn(index.numel(), H, generator=gen, dtype=torch.float64)
    return TokenSparseTensor(values, index, (B, T))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["dense", "sparse", "none kept"])
def test_equals_the_two_layer_form(bias, kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    ws, bs = _params(gen, bias)
    if kind == "dense":
        grad = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    else:
        grad = _sparse_grad(gen, 0.5 if kind == "sparse" else 0.0)
    y_ref, g_ref = _grads(_reference, x, ws, bs, grad)
    y, g = _grads(lambda x, ws, bs: gelu_mlp(x, *ws, *bs), x, ws, bs, grad)
    assert all(w is not None for w in g_ref)
    assert_all_close([y, *g], [y_ref, *g_ref])


def test_bf16_gradients_match_the_two_layer_form_bit_for_bit():
    """On CPU the recomputed activation rows are the forward's own (torch's tanh GELU), so the
    weight gradient of the second projection reads the same values the two-layer form saved."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, H, generator=gen).to(torch.bfloat16).requires_grad_()
    ws, bs = _params(gen, True, dtype=torch.bfloat16)
    grad = _sparse_grad(gen, 0.6)
    grad = TokenSparseTensor(grad.values.to(torch.bfloat16), grad.index, (B, T))
    y_ref, g_ref = _grads(_reference, x, ws, bs, grad)
    y, g = _grads(lambda x, ws, bs: gelu_mlp(x, *ws, *bs), x, ws, bs, grad)
    assert torch.equal(y, y_ref)
    for a, b in zip(g, g_ref, strict=True):
        assert torch.equal(a, b)


def test_sparse_input_gradient_stays_sparse():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    ws, bs = _params(gen, True)
    grad = _sparse_grad(gen, 0.4)
    seen = {}
    x.register_hook(lambda g: seen.setdefault("grad", g))
    gelu_mlp(x, *ws, *bs).backward(grad)
    assert isinstance(seen["grad"], TokenSparseTensor) and torch.equal(seen["grad"].index, grad.index)


def test_saves_no_activation():
    """Saved for the backward: x, the two weights and fc1's output; not the (tokens, I) activation."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    ws, bs = _params(gen, True)
    y = gelu_mlp(x, *ws, *bs)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 4
    assert sum(t.shape[-1] == I and t.numel() == B * T * I for t in saved) == 1  # fc1's output only


def test_frozen_weights_cost_no_gemm(monkeypatch):
    calls = []
    real = gelu_mlp_module.gathered_weight_grad
    monkeypatch.setattr(gelu_mlp_module, "gathered_weight_grad",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    ws, _ = _params(gen, False)
    ws[0].requires_grad_(False)
    gelu_mlp(x, *ws).backward(_sparse_grad(gen, 0.5))
    assert len(calls) == 1  # fc2 only
    assert ws[0].grad is None and ws[1].grad is not None and x.grad is not None


def test_autocast_runs_in_bf16_with_fp32_master_weights():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, H, generator=gen, requires_grad=True)
    ws, bs = _params(gen, True, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gelu_mlp(x, *ws, *bs)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(w.grad.dtype == torch.float32 for w in ws)
    y32 = gelu_mlp(x.detach(), *[w.detach() for w in ws], *[b.detach() for b in bs])
    assert float((y.detach().float() - y32).norm() / y32.norm()) < 2e-2


def test_bad_shapes_are_named():
    x = torch.randn(2, 3, H)
    w1 = torch.randn(I, H)
    with pytest.raises(ValueError, match="w2"):
        gelu_mlp(x, w1, torch.randn(I, H))
    with pytest.raises(ValueError, match="b1"):
        gelu_mlp(x, w1, torch.randn(H, I), torch.randn(H))
    with pytest.raises(ValueError, match="b2"):
        gelu_mlp(x, w1, torch.randn(H, I), None, torch.randn(I))
    with pytest.raises(ValueError, match="x"):
        gelu_mlp(torch.randn(2, 3, H + 1), w1, torch.randn(H, I))
