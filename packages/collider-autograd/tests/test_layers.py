"""Every layer Function: output equals the plain PyTorch op; gradients equal autograd of that op,
for a dense gradient and for a token-sparse one (with the contract's K/V detach for attention)."""

import importlib
import math

import pytest
import torch
from autograd_testing import CountSums
from hypothesis import given, settings
from hypothesis import strategies as st

from collider_autograd import (
    TokenSparseTensor,
    apply_rotary,
    causal_attention,
    densify_counts,
    embedding,
    gelu_new,
    layer_norm,
    linear,
    linear_cross_entropy,
    reset_densify_counts,
    rms_norm,
    rotary_tables,
    swiglu,
)
from collider_kernels.reference import attention_forward_reference

F64 = torch.float64


def _sparse_grad(shape, gen, p):
    B, T = shape[:2]
    keep = torch.rand(B, T, generator=gen) < p
    index = keep.reshape(-1).nonzero().squeeze(1)
    values = torch.randn((index.numel(),) + tuple(shape[2:]), generator=gen, dtype=F64)
    return TokenSparseTensor(values, index, (B, T)), keep


def _grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    diff = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, diff, grad, allow_unused=True)
    dense = [g.to_dense() if isinstance(g, TokenSparseTensor) else g for g in grads]
    return out.detach(), dense


def _check(collider_fn, reference_fn, inputs, out_shape, gen, p, reference_sparse_fn=None):
    """Compare forward and input gradients for a dense and a sparse output gradient."""
    dense_grad = torch.randn(out_shape, generator=gen, dtype=F64)
    out_c, g_c = _grads(collider_fn, inputs, dense_grad)
    out_r, g_r = _grads(reference_fn, inputs, dense_grad)
    torch.testing.assert_close(out_c, out_r)
    for a, b in zip(g_c, g_r, strict=True):
        torch.testing.assert_close(a, b)
    sparse, keep = _sparse_grad(out_shape, gen, p)
    reset_densify_counts()
    _, g_c = _grads(collider_fn, inputs, sparse)
    assert densify_counts() == {}
    ref = reference_sparse_fn(keep) if reference_sparse_fn else reference_fn
    _, g_r = _grads(ref, inputs, sparse.to_dense())
    for a, b in zip(g_c, g_r, strict=True):
        torch.testing.assert_close(a, b)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 12))
fractions = st.sampled_from([0.0, 0.3, 0.7, 1.0])


@settings(deadline=None, max_examples=15)
@given(shape=shapes, out_features=st.integers(1, 10), bias=st.booleans(), p=fractions, seed=st.integers(0, 2**16))
def test_linear(shape, out_features, bias, p, seed):
    gen = torch.Generator().manual_seed(seed)
    B, T, K = shape
    x = torch.randn(B, T, K, generator=gen, dtype=F64)
    w = torch.randn(out_features, K, generator=gen, dtype=F64)
    b = torch.randn(out_features, generator=gen, dtype=F64)
    if bias:
        _check(linear, torch.nn.functional.linear, [x, w, b], (B, T, out_features), gen, p)
    else:
        _check(linear, torch.nn.functional.linear, [x, w], (B, T, out_features), gen, p)


@settings(deadline=None, max_examples=15)
@given(shape=shapes, vocab=st.integers(1, 6), p=fractions, seed=st.integers(0, 2**16))
def test_embedding_with_repeated_ids(shape, vocab, p, seed):
    gen = torch.Generator().manual_seed(seed)
    B, T, H = shape
    ids = torch.randint(0, vocab, (B, T), generator=gen)  # small vocab: ids repeat
    w = torch.randn(vocab, H, generator=gen, dtype=F64)
    _check(embedding, torch.nn.functional.embedding, [ids, w], (B, T, H), gen, p)


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_weight_grad_sums_repeats_in_fp32_and_rounds_once(id_dtype, sparse):
    """bf16 table: each row of the weight gradient is the fp32 sum of its rows, rounded once to
    bf16 (within one bf16 step of the fp64 sum); untouched rows are exact zeros."""
    gen = torch.Generator().manual_seed(4)
    B, T, H, V = 3, 50, 16, 40
    ids = torch.randint(0, 7, (B, T), generator=gen).to(id_dtype) * 5  # 7 of 40 ids, repeated
    w = torch.randn(V, H, generator=gen).bfloat16().requires_grad_()
    g = torch.randn(B, T, H, generator=gen).bfloat16()
    keep = torch.rand(B * T, generator=gen) < 0.6
    if sparse:
        index = keep.nonzero().squeeze(1)
        g = TokenSparseTensor(g.reshape(B * T, H)[index], index, (B, T))
    (dw,) = torch.autograd.grad(embedding(ids, w), w, g)
    dense = g.to_dense() if sparse else g
    truth = torch.zeros(V, H, dtype=F64).index_add_(0, ids.reshape(-1).long(), dense.reshape(-1, H).double())
    assert dw.dtype == torch.bfloat16 and dw.shape == (V, H)
    assert torch.equal(dw[truth.abs().sum(1) == 0].float(), torch.zeros_like(dw[truth.abs().sum(1) == 0].float()))
    step = truth.abs().clamp_min(1e-30) * 2.0**-8  # one bf16 step at each value
    assert ((dw.double() - truth).abs() <= step).all()


def _rms_reference(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@settings(deadline=None, max_examples=15)
@given(shape=shapes, p=fractions, seed=st.integers(0, 2**16))
def test_norms(shape, p, seed):
    gen = torch.Generator().manual_seed(seed)
    B, T, H = shape
    x = torch.randn(B, T, H, generator=gen, dtype=F64) * 3 + 1
    w = torch.randn(H, generator=gen, dtype=F64)
    b = torch.randn(H, generator=gen, dtype=F64)
    _check(lambda x, w: rms_norm(x, w, 1e-6), _rms_reference, [x, w], (B, T, H), gen, p)
    _check(lambda x, w, b: layer_norm(x, w, b, 1e-5),
           lambda x, w, b: torch.nn.functional.layer_norm(x, (H,), w, b, 1e-5), [x, w, b], (B, T, H), gen, p)


@settings(deadline=None, max_examples=15)
@given(shape=shapes, p=fractions, seed=st.integers(0, 2**16))
def test_activations(shape, p, seed):
    gen = torch.Generator().manual_seed(seed)
    B, T, H = shape
    g, u = (torch.randn(B, T, H, generator=gen, dtype=F64) * 2 for _ in range(2))
    _check(swiglu, lambda g, u: torch.nn.functional.silu(g) * u, [g, u], (B, T, H), gen, p)

    def gelu_ref(x):  # gelu_new by its formula
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    _check(gelu_new, gelu_ref, [g], (B, T, H), gen, p)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


@settings(deadline=None, max_examples=15)
@given(B=st.integers(1, 3), T=st.integers(1, 9), H=st.integers(1, 3), half=st.integers(1, 4),
       partial=st.booleans(), p=fractions, seed=st.integers(0, 2**16))
def test_rotary(B, T, H, half, partial, p, seed):
    gen = torch.Generator().manual_seed(seed)
    D = 4 * half
    rot = D // 2 if partial else D
    cos, sin = rotary_tables(torch.arange(T), rot, 10000.0, F64)
    x = torch.randn(B, T, H, D, generator=gen, dtype=F64)

    def reference(x):
        c, s = cos[:, None, :], sin[:, None, :]
        xr = x[..., :rot] * c + _rotate_half(x[..., :rot]) * s
        return torch.cat([xr, x[..., rot:]], -1)

    _check(lambda x: apply_rotary(x, cos, sin), reference, [x], (B, T, H, D), gen, p)


@settings(deadline=None, max_examples=15)
@given(B=st.integers(1, 3), T=st.integers(1, 10), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 3]),
       D=st.sampled_from([4, 8]), p=fractions, seed=st.integers(0, 2**16))
def test_causal_attention_restore_q(B, T, hkv, group, D, p, seed):
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * group
    q = torch.randn(B, T, hq, D, generator=gen, dtype=F64)
    k, v = (torch.randn(B, T, hkv, D, generator=gen, dtype=F64) for _ in range(2))

    def reference(q, k, v):
        return attention_forward_reference(q, k, v)[0]

    def reference_detached(keep):
        def fn(q, k, v):
            m = keep[..., None, None]
            return reference(q, torch.where(m, k, k.detach()), torch.where(m, v, v.detach()))
        return fn

    _check(causal_attention, reference, [q, k, v], (B, T, hq, D), gen, p, reference_detached)


@settings(deadline=None, max_examples=15)
@given(shape=shapes, vocab=st.integers(2, 40), bias=st.booleans(), p=fractions, seed=st.integers(0, 2**16))
def test_linear_cross_entropy(shape, vocab, bias, p, seed):
    gen = torch.Generator().manual_seed(seed)
    B, T, H = shape
    h = torch.randn(B, T, H, generator=gen, dtype=F64)
    w = torch.randn(vocab, H, generator=gen, dtype=F64)
    b = torch.randn(vocab, generator=gen, dtype=F64) if bias else None
    labels = torch.randint(0, vocab, (B, T), generator=gen)
    labels[0, 0] = -100

    def collider(h, w, *b):
        return linear_cross_entropy(h, w, labels, b[0] if b else None)

    def reference(h, w, *b):
        logits = torch.nn.functional.linear(h, w, b[0] if b else None)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(B, T)

    inputs = [h, w] + ([b] if bias else [])
    _check(collider, reference, inputs, (B, T), gen, p)


def test_lm_head_chunking_matches_unchunked(monkeypatch):
    mod = importlib.import_module("collider_autograd.layers.linear_cross_entropy")  # the name is also the function's

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 5, generator=gen, dtype=F64)
    w = torch.randn(11, 5, generator=gen, dtype=F64)
    labels = torch.randint(0, 11, (2, 7), generator=gen)
    ref = _grads(lambda h, w: linear_cross_entropy(h, w, labels), [h, w], torch.ones(2, 7, dtype=F64))
    monkeypatch.setattr(mod, "_CHUNK_ELEMENTS", 11 * 3)  # 3 rows per chunk
    got = _grads(lambda h, w: linear_cross_entropy(h, w, labels), [h, w], torch.ones(2, 7, dtype=F64))
    torch.testing.assert_close(got[0], ref[0])
    for a, b in zip(got[1], ref[1], strict=True):
        torch.testing.assert_close(a, b)


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3, 4, 8)
    with pytest.raises(ValueError, match="query heads"):
        causal_attention(torch.randn(2, 3, 3, 8), x[:, :, :2], x[:, :, :2])
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rotary(x, torch.randn(5, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(IndexError, match="labels"):
        linear_cross_entropy(torch.randn(2, 3, 4), torch.randn(5, 4), torch.full((2, 3), 7))
    with pytest.raises(TypeError, match="ids"):
        embedding(torch.zeros(2, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="gate and up"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))


def test_projections_sharing_an_input_gather_its_kept_rows_once():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountGathers(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows_of_x = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.index_select.default and args[0].shape == (2 * 9, 6):
                self.rows_of_x += 1
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 6, generator=gen, dtype=F64, requires_grad=True)
    ws = [torch.randn(4, 6, generator=gen, dtype=F64, requires_grad=True) for _ in range(3)]
    out = sum(linear(x, w) for w in ws)  # q/k/v-like: three projections of one input
    sparse, _ = _sparse_grad((2, 9, 4), gen, 0.5)
    counter = CountGathers()
    with counter:
        grads = torch.autograd.grad(out, [x, *ws], sparse)
    assert counter.rows_of_x == 1
    dense_grads = torch.autograd.grad(sum(x @ w.t() for w in ws), [x, *ws], sparse.to_dense())
    for g, r in zip(grads, dense_grads, strict=True):
        torch.testing.assert_close(g.to_dense() if isinstance(g, TokenSparseTensor) else g, r)


@pytest.mark.parametrize("sparse", [False, True])
def test_lm_head_keep_logits_gives_the_same_gradients_twice(sparse):
    # Reading the forward's logits instead of recomputing them changes no gradient, and leaves
    # them intact for a second backward (retain_graph).
    from collider_autograd import TokenSparseTensor, linear_cross_entropy

    gen = torch.Generator().manual_seed(21)
    hidden = torch.randn(2, 9, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9), generator=gen)
    labels[1, 3] = -100
    if sparse:
        index = torch.tensor([0, 2, 3, 7, 12, 17])
        grad = TokenSparseTensor(torch.randn(6, generator=gen, dtype=torch.float64), index, (2, 9))
    else:
        grad = torch.randn(2, 9, generator=gen, dtype=torch.float64)
    results = []
    for keep in (False, True):
        loss = linear_cross_entropy(hidden, weight, labels, bias, keep_logits=keep)
        for _ in range(2):
            grads = torch.autograd.grad(loss, (hidden, weight, bias), grad, retain_graph=True)
            results.append([g.to_dense() if isinstance(g, TokenSparseTensor) else g for g in grads])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_layers_fed_one_gradient_sum_its_rows_once_into_separate_bias_grads():
    """Two biased projections fed the same output gradient (Phi's parallel attention and MLP
    outputs): one row sum, two distinct bias gradients, as separate layers give them."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 6, generator=gen, dtype=F64)
    w1, w2 = (torch.randn(6, 6, generator=gen, dtype=F64, requires_grad=True) for _ in range(2))
    b1, b2 = (torch.randn(6, generator=gen, dtype=F64, requires_grad=True) for _ in range(2))
    sparse, _ = _sparse_grad((2, 9, 6), gen, 0.5)
    for grad in (sparse, sparse.to_dense()):
        counter = CountSums()
        with counter:
            out = x + linear(x, w1, b1) + linear(x, w2, b2)
            db1, db2 = torch.autograd.grad(out, [b1, b2], grad)
        assert counter.sums == 1
        assert db1 is not db2 and db1.data_ptr() != db2.data_ptr()
        dense = grad.to_dense() if isinstance(grad, TokenSparseTensor) else grad
        torch.testing.assert_close(db1, dense.sum((0, 1)))
        torch.testing.assert_close(db2, dense.sum((0, 1)))
