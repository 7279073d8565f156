"""The fused MLP layers (:func:`swiglu_mlp`, :func:`gelu_mlp`) equal their unfused compositions of
Linear and the activation: outputs and every gradient, dense and sparse, with and without biases;
frozen weights cost no GEMM; the activation is not saved for the backward."""

import importlib
from dataclasses import dataclass

import pytest
import torch
from autograd_testing import assert_all_close, kept_index, outputs_and_grads, sparse_grad

from collider_autograd import TokenSparseTensor, gelu_mlp, gelu_new, linear, swiglu, swiglu_mlp

B, T, H, I = 3, 7, 12, 20


@dataclass
class MLP:
    fused: object  # (x, *weights, *biases) → y
    unfused: object  # (x, weights, biases) → y, from Linear and the activation
    weights: list  # weight shapes, in the fused function's order
    biases: list  # bias shapes
    module: str  # where the fused layer's weight-gradient GEMM is looked up
    saved_width: int  # width of the one (tokens, ·) tensor saved besides x
    frozen: tuple  # weights frozen in the frozen-weights test (one weight gradient GEMM left)


MLPS = {
    "swiglu": MLP(
        swiglu_mlp,
        lambda x, ws, bs: linear(swiglu(linear(x, ws[0], bs[0]), linear(x, ws[1], bs[1])), ws[2], bs[2]),
        [(I, H), (I, H), (H, I)], [(I,), (I,), (H,)], "collider_autograd.layers.swiglu_mlp", 2 * I, (0, 2),
    ),
    "gelu": MLP(
        gelu_mlp,
        lambda x, ws, bs: linear(gelu_new(linear(x, ws[0], bs[0])), ws[1], bs[1]),
        [(I, H), (H, I)], [(I,), (H,)], "collider_autograd.layers.gelu_mlp", I, (0,),
    ),
}
params = pytest.mark.parametrize("mlp", list(MLPS.values()), ids=list(MLPS))


def _params(mlp, gen, bias, dtype=torch.float64):
    def r(shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    return [r(s) for s in mlp.weights], [r(s) if bias else None for s in mlp.biases]


def _grads(fn, x, ws, bs, grad):
    """[output, then the gradient of each leaf] of ``fn(x, ws, bs)`` for ``grad``."""
    leaves = [t for t in [x, *ws, *bs] if t is not None]
    return outputs_and_grads([fn(x, ws, bs)], leaves, [grad])


def _sparse_grad(gen, keep_share, dtype=torch.float64):
    g = sparse_grad(gen, kept_index(gen, B * T, keep_share), (B, T), H)
    return TokenSparseTensor(g.values.to(dtype), g.index, (B, T))


def _x(gen, dtype=torch.float64):
    return torch.randn(B, T, H, generator=gen).to(dtype).requires_grad_()


@params
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["dense", "sparse", "none kept"])
def test_equals_the_unfused_form(mlp, bias, kind):
    gen = torch.Generator().manual_seed(0)
    x = _x(gen)
    ws, bs = _params(mlp, gen, bias)
    if kind == "dense":
        grad = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    else:
        grad = _sparse_grad(gen, 0.5 if kind == "sparse" else 0.0)
    want = _grads(mlp.unfused, x, ws, bs, grad)
    got = _grads(lambda x, ws, bs: mlp.fused(x, *ws, *bs), x, ws, bs, grad)
    assert all(w is not None for w in want)
    assert_all_close(got, want)


def test_gelu_mlp_bf16_equals_the_unfused_form_bit_for_bit_on_cpu():
    """On CPU the recomputed activation rows are the forward's own, so fc2's weight gradient reads
    the values the unfused form saved. (The SwiGLU MLP's one gate/up GEMM may round differently
    from two.)"""
    mlp = MLPS["gelu"]
    gen = torch.Generator().manual_seed(4)
    x = _x(gen, torch.bfloat16)
    ws, bs = _params(mlp, gen, True, dtype=torch.bfloat16)
    grad = _sparse_grad(gen, 0.6, torch.bfloat16)
    want = _grads(mlp.unfused, x, ws, bs, grad)
    got = _grads(lambda x, ws, bs: mlp.fused(x, *ws, *bs), x, ws, bs, grad)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@params
def test_sparse_input_gradient_stays_sparse(mlp):
    gen = torch.Generator().manual_seed(1)
    x = _x(gen)
    ws, bs = _params(mlp, gen, True)
    grad = _sparse_grad(gen, 0.4)
    seen = {}
    x.register_hook(lambda g: seen.setdefault("grad", g))
    mlp.fused(x, *ws, *bs).backward(grad)
    assert isinstance(seen["grad"], TokenSparseTensor) and torch.equal(seen["grad"].index, grad.index)


@params
def test_saves_no_activation(mlp):
    """Saved for the backward: x, the weights and the first projection's output only."""
    gen = torch.Generator().manual_seed(5)
    ws, bs = _params(mlp, gen, True)
    saved = mlp.fused(_x(gen), *ws, *bs).grad_fn.saved_tensors
    assert len(saved) == 1 + len(ws) + 1
    per_token = [t for t in saved if t.shape[:-1] in ((B, T), (B * T,))]  # x and one more
    assert sorted(t.shape[-1] for t in per_token) == sorted([H, mlp.saved_width])


@params
def test_frozen_weights_cost_no_gemm(mlp, monkeypatch):
    mod = importlib.import_module(mlp.module)  # the module, not the function
    calls = []
    real = mod.gathered_weight_grad
    monkeypatch.setattr(mod, "gathered_weight_grad", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    gen = torch.Generator().manual_seed(2)
    x = _x(gen)
    ws, _ = _params(mlp, gen, False)
    for i in mlp.frozen:
        ws[i].requires_grad_(False)
    mlp.fused(x, *ws).backward(_sparse_grad(gen, 0.5))
    assert len(calls) == 1
    assert [w.grad is not None for w in ws] == [w.requires_grad for w in ws] and x.grad is not None


@params
def test_autocast_runs_in_bf16_with_fp32_master_weights(mlp):
    gen = torch.Generator().manual_seed(3)
    x = _x(gen, torch.float32)
    ws, bs = _params(mlp, gen, True, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp.fused(x, *ws, *bs)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(w.grad.dtype == torch.float32 for w in ws)
    y32 = mlp.fused(x.detach(), *[w.detach() for w in ws], *[b.detach() for b in bs])
    assert float((y.detach().float() - y32).norm() / y32.norm()) < 2e-2


def test_swiglu_mlp_bad_shapes_are_named():
    x = torch.randn(2, 3, H)
    w = torch.randn(I, H)
    with pytest.raises(ValueError, match="down"):
        swiglu_mlp(x, w, w, torch.randn(I, H))
    with pytest.raises(ValueError, match="b_gate and b_up"):
        swiglu_mlp(x, w, w, torch.randn(H, I), torch.randn(I), None)


def test_gelu_mlp_bad_shapes_are_named():
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
