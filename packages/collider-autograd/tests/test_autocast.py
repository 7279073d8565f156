"""Every layer (attention aside) under ``torch.autocast`` (CPU bf16; CUDA bf16 and fp16 with the
``gpu`` mark): forward and backward run, for a dense and a token-sparse output gradient, and
outputs and gradients are within twice the error of the same PyTorch ops under autocast, both
measured against an fp64 computation of the contract."""

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from collider_autograd import (
    TokenSparseTensor,
    apply_rotary,
    embedding,
    gelu_new,
    layer_norm,
    linear,
    linear_cross_entropy,
    rms_norm,
    rotary_tables,
    swiglu,
)

BF16 = torch.bfloat16
B, T, H, V = 2, 9, 32, 50
CASES = [
    pytest.param(("cpu", BF16), id="cpu-bf16"),
    pytest.param(("cuda", BF16), id="cuda-bf16", marks=pytest.mark.gpu),
    pytest.param(("cuda", torch.float16), id="cuda-fp16", marks=pytest.mark.gpu),
]


@pytest.fixture(params=CASES)
def amp(request):
    """(device, autocast dtype) of one case."""
    return request.param


def _run(fn, inputs, grad, autocast):
    """``autocast``: None (off) or (device, dtype)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with torch.autocast(autocast[0], dtype=autocast[1]) if autocast else nullcontext():
        out = fn(*leaves)
    grad = grad.to(out.dtype)
    diff = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, diff, grad)
    return [out.detach()] + [g.to_dense() if isinstance(g, TokenSparseTensor) else g for g in grads]


def _sparse(shape, gen, p=0.5):
    keep = torch.rand(shape[:2], generator=gen) < p
    keep[0, 0] = True
    index = keep.reshape(-1).nonzero().squeeze(1)
    values = torch.randn((index.numel(),) + tuple(shape[2:]), generator=gen)
    return TokenSparseTensor(values, index, shape[:2])


def _check(amp, ours, reference, inputs, out_shape, seed):
    """``ours`` under autocast vs ``reference`` (plain torch) under autocast, both against
    ``reference`` in fp64 (fp32 inputs as given), for a dense and a sparse output gradient."""
    device, dtype = amp
    gen = torch.Generator().manual_seed(seed)
    inputs = [t.to(device) if t.is_floating_point() or t.dtype == torch.int64 else t for t in inputs]
    inputs = [t.to(dtype) if t.dtype == BF16 else t for t in inputs]  # low-precision inputs: the case's dtype
    for grad in (torch.randn(out_shape, generator=gen), _sparse(out_shape, gen)):
        grad = grad.to(device)
        dense_grad = grad.to_dense() if isinstance(grad, TokenSparseTensor) else grad
        got = _run(ours, inputs, grad, autocast=amp)
        same_dtype = _run(reference, inputs, dense_grad, autocast=amp)
        truth = _run(reference, [t.double() if t.is_floating_point() else t for t in inputs], dense_grad.double(),
                     autocast=None)
        assert got[0].dtype == same_dtype[0].dtype or got[0].dtype == torch.float32
        for name, a, s, r in zip(["output"] + [f"grad {i}" for i in range(len(got) - 1)], got, same_dtype, truth,
                                 strict=True):
            assert a.shape == r.shape, name
            err, bound = (a.double() - r).abs().max(), 2 * (s.double() - r).abs().max() + 1e-6 * r.abs().max()
            assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


def _rand(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_linear(amp, bias):
    gen = torch.Generator().manual_seed(0)
    x, w, b = _rand(gen, B, T, H), _rand(gen, 24, H, scale=0.2), _rand(gen, 24)
    inputs = [t.to(amp[0]) for t in ([x, w, b] if bias else [x, w])]
    _check(amp, linear, F.linear, inputs, (B, T, 24), seed=1)
    with torch.autocast(amp[0], dtype=amp[1]):
        assert linear(*inputs).dtype == amp[1]  # like F.linear under autocast


def test_embedding(amp):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (B, T), generator=gen)
    _check(amp, embedding, F.embedding, [ids, _rand(gen, V, H)], (B, T, H), seed=3)


def _rms_reference(x, w, eps=1e-6):  # the transformers module: fp32 statistics, cast, scale
    x32 = x.float() if x.dtype != torch.float64 else x
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("x_dtype", [torch.float32, BF16])
def test_norms(amp, x_dtype):
    gen = torch.Generator().manual_seed(4)
    x = _rand(gen, B, T, H, dtype=x_dtype, scale=3)
    w, b = _rand(gen, H) + 1, _rand(gen, H)
    _check(amp, lambda x, w: rms_norm(x, w, 1e-6), _rms_reference, [x, w], (B, T, H), seed=5)
    _check(amp, lambda x, w, b: layer_norm(x, w, b, 1e-5), lambda x, w, b: F.layer_norm(x, (H,), w, b, 1e-5),
           [x, w, b], (B, T, H), seed=6)
    device, dtype = amp
    x, w, b = x.to(device, dtype if x_dtype == BF16 else x_dtype), w.to(device), b.to(device)
    with torch.autocast(device, dtype=dtype):
        assert layer_norm(x, w, b, 1e-5).dtype == torch.float32  # autocast's fp32 policy (CUDA)
        assert rms_norm(x, w, 1e-6).dtype == torch.float32  # weight * normalized x, promoted


def test_activations_on_autocast_outputs(amp):
    gen = torch.Generator().manual_seed(7)
    g, u = _rand(gen, B, T, H, dtype=BF16, scale=2), _rand(gen, B, T, H, dtype=BF16, scale=2)  # as from linear
    _check(amp, swiglu, lambda g, u: F.silu(g) * u, [g, u], (B, T, H), seed=8)
    _check(amp, gelu_new, lambda x: F.gelu(x, approximate="tanh"), [g], (B, T, H), seed=9)


def test_rotary_on_autocast_queries(amp):
    gen = torch.Generator().manual_seed(10)
    D, rot = 8, 4
    cos, sin = rotary_tables(torch.arange(T, device=amp[0]), rot, 10000.0, torch.float32)  # the residual dtype
    q = _rand(gen, B, T, 2, D, dtype=BF16)  # queries out of a bf16 projection

    def reference(x):
        c, s = cos[:, None, :], sin[:, None, :]
        xr = x[..., :rot]
        half = torch.cat([-xr[..., rot // 2:], xr[..., : rot // 2]], -1)
        return torch.cat([xr * c + half * s, x[..., rot:].to(torch.promote_types(x.dtype, c.dtype))], -1)

    _check(amp, lambda x: apply_rotary(x, cos, sin), reference, [q], (B, T, 2, D), seed=11)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy(amp, bias):
    gen = torch.Generator().manual_seed(12)
    h, w, b = _rand(gen, B, T, H), _rand(gen, V, H, scale=1 / math.sqrt(H)), _rand(gen, V)
    labels = torch.randint(0, V, (B, T), generator=gen).to(amp[0])
    labels[1, 2] = -100

    def ours(h, w, *b):
        return linear_cross_entropy(h, w, labels, b[0] if b else None)

    def reference(h, w, *b):  # logits in the autocast dtype, the loss in fp32 (as transformers does)
        logits = F.linear(h, w, b[0] if b else None)
        flat = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(flat, labels.flatten(), reduction="none").view(B, T)

    _check(amp, ours, reference, [h, w, b] if bias else [h, w], (B, T), seed=13)


def test_parameter_gradients_keep_the_parameter_dtype(amp):
    gen = torch.Generator().manual_seed(14)
    x = _rand(gen, B, T, H).to(amp[0]).requires_grad_()
    w = _rand(gen, 16, H).to(amp[0]).requires_grad_()
    with torch.autocast(amp[0], dtype=amp[1]):
        out = linear(x, w)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
