"""Frozen parameters (``requires_grad=False``) cost no weight-gradient kernel call and get no
gradient, in every layer; the input gradients still flow and are unchanged. Kernel calls are
counted by wrapping the collider_kernels functions where the layers import them."""

import importlib

import pytest
import torch
from autograd_testing import CountSums

from collider_autograd import (
    TokenSparseTensor,
    embedding,
    layer_norm,
    linear,
    linear_cross_entropy,
    rms_norm,
)

F64 = torch.float64
B, T, H = 2, 7, 6


def count_calls(monkeypatch, module: str, name: str) -> list:
    """Wrap ``module.name`` (a kernel as a layer imports it); returns the list its calls land in."""
    mod = importlib.import_module(module)  # not `import a.b as m`: the package exports functions of these names
    calls = []
    original = getattr(mod, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(mod, name, counted)
    return calls


def _grads(fn, x, grad, *params):
    x = x.detach().clone().requires_grad_()
    out = fn(x, *params)
    wanted = [x] + [p for p in params if p is not None and p.requires_grad]
    return torch.autograd.grad(out, wanted, grad)


def _output_grads(shape, gen):
    keep = torch.rand(B, T, generator=gen) < 0.5
    keep[0, 0] = True
    index = keep.reshape(-1).nonzero().squeeze(1)
    sparse = TokenSparseTensor(torch.randn((index.numel(),) + shape[2:], generator=gen, dtype=F64), index, (B, T))
    return [torch.randn(shape, generator=gen, dtype=F64), sparse]


def _dense(g):
    return g.to_dense() if isinstance(g, TokenSparseTensor) else g


def test_linear_frozen_weight_and_bias_skip_their_gemm_and_sum(monkeypatch):
    calls = count_calls(monkeypatch, "collider_autograd.layers.linear", "gathered_weight_grad")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, generator=gen, dtype=F64)
    w, b = torch.randn(5, H, generator=gen, dtype=F64), torch.randn(5, generator=gen, dtype=F64)
    for grad in _output_grads((B, T, 5), gen):
        counter = CountSums()
        with counter:
            (dx,) = _grads(linear, x, grad, w, b)  # frozen: plain tensors, requires_grad=False
        assert calls == [] and counter.sums == 0
        torch.testing.assert_close(_dense(dx), _dense(grad) @ w)
        trainable = w.clone().requires_grad_()
        dx2, dw = _grads(linear, x, grad, trainable, b)
        assert calls == ["gathered_weight_grad"]
        torch.testing.assert_close(_dense(dx2), _dense(dx))
        torch.testing.assert_close(dw, _dense(grad).reshape(-1, 5).t() @ x.reshape(-1, H))
        calls.clear()


def test_lm_head_frozen_weight_skips_its_gemm(monkeypatch):
    calls = count_calls(monkeypatch, "collider_autograd.layers.linear_cross_entropy", "gathered_weight_grad")
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(B, T, H, generator=gen, dtype=F64)
    w, b = torch.randn(11, H, generator=gen, dtype=F64), torch.randn(11, generator=gen, dtype=F64)
    labels = torch.randint(0, 11, (B, T), generator=gen)
    for grad in _output_grads((B, T), gen):
        (dh,) = _grads(lambda h, w, b: linear_cross_entropy(h, w, labels, b), h, grad, w, b)
        assert calls == []
        h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
        logits = torch.nn.functional.linear(h_ref, w_ref, b)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        ref_dh, ref_dw = torch.autograd.grad(loss.view(B, T), (h_ref, w_ref), _dense(grad))
        torch.testing.assert_close(_dense(dh), ref_dh)
        _, dw = _grads(lambda h, w, b: linear_cross_entropy(h, w, labels, b), h, grad, w.clone().requires_grad_(), b)
        assert calls == ["gathered_weight_grad"]
        torch.testing.assert_close(dw, ref_dw)
        calls.clear()


def test_frozen_embedding_costs_no_scatter(monkeypatch):
    calls = count_calls(monkeypatch, "collider_autograd.layers.embedding", "scatter_add_rows")
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 9, (B, T), generator=gen)
    table = torch.randn(9, H, generator=gen, dtype=F64)
    w = torch.randn(4, H, generator=gen, dtype=F64, requires_grad=True)
    out = linear(embedding(ids, table), w)  # a trainable layer over frozen embeddings
    out.sum().backward()
    assert calls == [] and table.grad is None and w.grad is not None
    embedding(ids, table.clone().requires_grad_()).sum().backward()
    assert calls == ["scatter_add_rows"]


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_frozen_norm_weights_get_no_gradient_and_inputs_still_do(norm):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, H, generator=gen, dtype=F64) * 2 + 1
    w, b = torch.randn(H, generator=gen, dtype=F64), torch.randn(H, generator=gen, dtype=F64)
    if norm == "rms":
        def fn(x, w):
            return rms_norm(x, w, 1e-6)
        params = [w]
    else:
        def fn(x, w, b):
            return layer_norm(x, w, b, 1e-5)
        params = [w, b]
    for grad in _output_grads((B, T, H), gen):
        (dx,) = _grads(fn, x, grad, *params)
        ref = _grads(fn, x, grad, *[p.clone().requires_grad_() for p in params])
        torch.testing.assert_close(_dense(dx), _dense(ref[0]))
        x_leaf = x.clone().requires_grad_()
        frozen = [p.clone() for p in params]
        fn(x_leaf, *frozen).sum().backward()
        assert all(p.grad is None for p in frozen) and x_leaf.grad is not None
