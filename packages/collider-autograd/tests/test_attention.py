"""``causal_attention`` with a sliding window and document starts, edge shapes and autocast.

The reference is plain PyTorch written from the definitions (softmax over the visible keys,
fp64): query ``t`` sees key ``j`` when ``t - window < j <= t`` (transformers' sliding window)
and ``j >= key_start[b, t]``. For a token-sparse output gradient the reference is the contract:
autograd of that attention with the keys and values of filtered positions detached.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collider_autograd import TokenSparseTensor, apply_rotary, causal_attention, rotary_tables

F64 = torch.float64


def visible(B, T, window=None, key_start=None, device="cpu"):
    """(B, T, T) bool from the definitions, independent of the library's own mask helpers."""
    t = torch.arange(T, device=device)
    vis = (t[None, :] <= t[:, None]).expand(B, T, T).clone()  # [b, query, key]
    if window is not None:
        vis &= t[None, :] > t[:, None] - window
    if key_start is not None:
        vis &= t[None, None, :] >= key_start[:, :, None]
    return vis


def reference(q, k, v, window=None, key_start=None, keep=None):
    """Plain attention; with ``keep`` the K/V rows of filtered positions are detached."""
    B, T, Hq, D = q.shape
    if keep is not None:
        m = keep[..., None, None]
        k, v = torch.where(m, k, k.detach()), torch.where(m, v, v.detach())
    group = Hq // k.shape[2]
    kh = k.repeat_interleave(group, 2)  # (B, T, Hq, D)
    vh = v.repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kh) / math.sqrt(D)  # (B, Hq, T, T)
    scores = scores.masked_fill(~visible(B, T, window, key_start, q.device)[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), vh)  # (B, T, Hq, D)


def doc_starts(B, T, gen, docs):
    """(B, T) int64: each token's document start, up to ``docs`` documents per row."""
    starts = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        row = torch.zeros(T, dtype=torch.int64)
        if T > 1 and docs > 1:
            cuts = torch.randint(1, T, (docs - 1,), generator=gen)
            row[cuts] = cuts
        starts[b] = row.cummax(0).values
    return starts


def grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    res = torch.autograd.grad(out, leaves, grad)
    return out.detach(), [g.to_dense() if isinstance(g, TokenSparseTensor) else g for g in res]


def qkv(B, T, hq, hkv, D, gen, dtype=F64):
    q = torch.randn(B, T, hq, D, generator=gen, dtype=F64).to(dtype)
    k, v = (torch.randn(B, T, hkv, D, generator=gen, dtype=F64).to(dtype) for _ in range(2))
    return q, k, v


def sparse_grad(B, T, hq, D, gen, p, dtype=F64):
    keep = torch.rand(B, T, generator=gen) < p
    index = keep.reshape(-1).nonzero().squeeze(1)
    values = torch.randn(index.numel(), hq, D, generator=gen, dtype=F64).to(dtype)
    return TokenSparseTensor(values, index, (B, T)), keep


@settings(deadline=None, max_examples=30)
@given(B=st.integers(1, 3), T=st.integers(1, 24), hkv=st.integers(1, 2), group=st.sampled_from([1, 3]),
       D=st.sampled_from([4, 8]), window=st.one_of(st.none(), st.integers(1, 20)), docs=st.integers(0, 4),
       p=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_masks_dense_and_sparse_match_reference(B, T, hkv, group, D, window, docs, p, seed):
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * group
    q, k, v = qkv(B, T, hq, hkv, D, gen)
    key_start = doc_starts(B, T, gen, docs) if docs else None

    def ours(q, k, v):
        return causal_attention(q, k, v, window=window, key_start=key_start)

    dense = torch.randn(B, T, hq, D, generator=gen, dtype=F64)
    out, g = grads(ours, (q, k, v), dense)
    ref_out, ref = grads(lambda q, k, v: reference(q, k, v, window, key_start), (q, k, v), dense)
    torch.testing.assert_close(out, ref_out)
    for a, r in zip(g, ref, strict=True):
        torch.testing.assert_close(a, r)
    sparse, keep = sparse_grad(B, T, hq, D, gen, p)
    _, g = grads(ours, (q, k, v), sparse)
    _, ref = grads(lambda q, k, v: reference(q, k, v, window, key_start, keep), (q, k, v), sparse.to_dense())
    for a, r in zip(g, ref, strict=True):
        torch.testing.assert_close(a, r)


@settings(deadline=None, max_examples=25)
@given(B=st.integers(1, 3), T=st.integers(1, 20), hkv=st.integers(1, 2), group=st.sampled_from([1, 3]),
       D=st.sampled_from([4, 8]), rot=st.sampled_from([1.0, 0.5, 0.0]), per_sequence=st.booleans(),
       window=st.one_of(st.none(), st.integers(1, 20)), docs=st.integers(0, 3), p=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_rotary_inside_equals_rotating_first(B, T, hkv, group, D, rot, per_sequence, window, docs, p, seed):
    """``rotary=(cos, sin)`` gives the values and gradients (dense and kept-rows) of rotating q and
    k with :func:`apply_rotary` before the attention, for shared and per-sequence tables."""
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * group
    q, k, v = qkv(B, T, hq, hkv, D, gen)
    R = int(D * rot) // 2 * 2
    if per_sequence:
        positions = torch.randint(0, 50, (B, T), generator=gen)
        cos, sin = (t.view(B, T, R) for t in rotary_tables(positions.reshape(-1), R, 10000.0, F64))
    else:
        cos, sin = rotary_tables(torch.arange(T) + 3, R, 10000.0, F64)
    masks = {"window": window, "key_start": doc_starts(B, T, gen, docs) if docs else None}

    def inside(q, k, v):
        return causal_attention(q, k, v, rotary=(cos, sin), **masks)

    def first(q, k, v):
        return causal_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, **masks)

    sparse, _ = sparse_grad(B, T, hq, D, gen, p)
    for grad in (torch.randn(B, T, hq, D, generator=gen, dtype=F64), sparse):
        out, g = grads(inside, (q, k, v), grad)
        ref_out, ref = grads(first, (q, k, v), grad)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        for a, r in zip(g, ref, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tables", [torch.float32, torch.bfloat16])
def test_rotary_inside_under_autocast_equals_rotating_first(tables):
    """bf16 autocast over bf16 q/k with fp32 (or bf16) tables: the same bits as rotating first in
    the promoted dtype and letting autocast cast the result, forward and both backwards."""
    gen = torch.Generator().manual_seed(11)
    B, T, hkv, group, D = 2, 40, 2, 2, 16
    q, k, v = (t.bfloat16() for t in qkv(B, T, hkv * group, hkv, D, gen, torch.float32))
    cos, sin = rotary_tables(torch.arange(T), 8, 10000.0, tables)
    sparse, _ = sparse_grad(B, T, hkv * group, D, gen, 0.6, torch.bfloat16)
    for grad in (torch.randn(B, T, hkv * group, D, generator=gen).bfloat16(), sparse):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, g = grads(lambda q, k, v: causal_attention(q, k, v, rotary=(cos, sin)), (q, k, v), grad)
            ref_out, ref = grads(lambda q, k, v: causal_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin),
                                                                   v), (q, k, v), grad)
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out)
        assert all(a.dtype == torch.bfloat16 and torch.equal(a, r) for a, r in zip(g, ref, strict=True))


def test_rotary_bad_tables_name_the_argument():
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    cos, sin = rotary_tables(torch.arange(6), 8, 10000.0, torch.float32)
    for bad in ((cos[:5], sin[:5]), (cos, sin[:, :6]), (cos[:, :6].repeat(1, 2)[:, :7], sin[:, :7]),
                (cos.repeat(1, 2), sin.repeat(1, 2)), (cos.expand(3, 6, 8), sin.expand(3, 6, 8)), (cos, None)):
        with pytest.raises(ValueError, match="rotary must be"):
            causal_attention(q, k, v, rotary=bad)
    with pytest.raises(TypeError, match="rotary tables must be floating point, of one dtype"):
        causal_attention(q, k, v, rotary=(cos.long(), sin.long()))
    with pytest.raises(TypeError, match="rotary tables must be floating point, of one dtype"):
        causal_attention(q, k, v, rotary=(cos, sin.double()))
    for fn in (lambda c, s: causal_attention(q, k, v, rotary=(c, s)), lambda c, s: apply_rotary(q, c, s)):
        with pytest.raises(ValueError, match="must not require grad"):
            fn(cos.clone().requires_grad_(), sin)


def test_masks_change_the_result():
    """The masks reach the forward and both backwards (not silently plain causal attention)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = qkv(2, 16, 4, 2, 8, gen)
    key_start = torch.tensor([[0] * 6 + [6] * 10, [0] * 16])
    sparse, _ = sparse_grad(2, 16, 4, 8, gen, 0.7)
    plain_out, plain = grads(causal_attention, (q, k, v), sparse)
    for masks in ({"window": 3}, {"key_start": key_start}):
        out, g = grads(lambda q, k, v, m=masks: causal_attention(q, k, v, **m), (q, k, v), sparse)
        assert (out - plain_out).abs().max() > 1e-3
        assert all((a - b).abs().max() > 1e-3 for a, b in zip(g, plain, strict=True))
    # A window at least as long as the row is plain causal attention.
    out, g = grads(lambda q, k, v: causal_attention(q, k, v, window=16), (q, k, v), sparse)
    torch.testing.assert_close(out, plain_out)


def test_documents_are_independent():
    """Two packed documents give what each gives alone in its own row."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = qkv(1, 12, 2, 1, 8, gen)
    key_start = torch.tensor([[0] * 5 + [5] * 7])
    packed = causal_attention(q, k, v, key_start=key_start)
    first = causal_attention(q[:, :5], k[:, :5], v[:, :5])
    second = causal_attention(q[:, 5:], k[:, 5:], v[:, 5:])
    torch.testing.assert_close(packed, torch.cat([first, second], 1))


@pytest.mark.parametrize("masks", [{}, {"window": 2}])
@pytest.mark.parametrize("B,T", [(0, 5), (2, 0), (0, 0)])
def test_empty_batch_or_sequence(B, T, masks):
    q = torch.randn(B, T, 4, 8, requires_grad=True)
    k = torch.randn(B, T, 2, 8, requires_grad=True)
    v = torch.randn(B, T, 2, 8, requires_grad=True)
    out = causal_attention(q, k, v, **masks)
    assert out.shape == (B, T, 4, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    empty = TokenSparseTensor(torch.empty(0, 4, 8), torch.empty(0, dtype=torch.int64), (B, T))
    grads = torch.autograd.grad(causal_attention(q, k, v, **masks), (q, k, v), empty)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_bad_masks_name_the_argument():
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    with pytest.raises(ValueError, match="window"):
        causal_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="key_start"):
        causal_attention(q, k, v, key_start=torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="key_start"):
        causal_attention(q, k, v, key_start=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="key_start"):
        causal_attention(q, k, v, key_start=torch.tensor([[0, 0, 3, 3, 3, 3]] * 2))  # 3 > t = 2
    # validate=False skips the value checks (a model checks once per batch), not the shape checks.
    decreasing = torch.tensor([[0, 0, 2, 1, 1, 1]] * 2)  # not contiguous documents: refused when checked
    with pytest.raises(ValueError, match="non-decreasing"):
        causal_attention(q, k, v, key_start=decreasing)
    assert torch.isfinite(causal_attention(q, k, v, key_start=decreasing, validate=False)).all()
    with pytest.raises(ValueError, match="key_start"):
        causal_attention(q, k, v, key_start=torch.zeros(2, 5, dtype=torch.int64), validate=False)


@pytest.mark.parametrize("masks", [{}, {"window": 5}, {"key_start": "docs"}])
def test_cpu_autocast_bf16(masks):
    """Under CPU bf16 autocast: forward, dense and sparse backward run in bf16 and stay within
    bf16 error of fp32 (twice what the same computation with plain PyTorch in bf16 commits)."""
    gen = torch.Generator().manual_seed(3)
    B, T, hq, hkv, D = 2, 40, 4, 2, 16
    q, k, v = qkv(B, T, hq, hkv, D, gen, torch.float32)
    if masks.get("key_start") == "docs":
        masks = {"key_start": doc_starts(B, T, gen, 3)}
    sparse, keep = sparse_grad(B, T, hq, D, gen, 0.6, torch.float32)
    dense = torch.randn(B, T, hq, D, generator=gen)

    def ours(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = causal_attention(q, k, v, **masks)
        assert out.dtype == torch.bfloat16
        return out

    for grad, kept in ((dense, None), (sparse, keep)):
        g_low = grad if kept is None else TokenSparseTensor(grad.values.bfloat16(), grad.index, (B, T))
        out, got = grads(ours, (q, k, v), g_low)
        truth_grad = grad if kept is None else grad.to_dense()
        def ref_fn(q, k, v, kept=kept):
            return reference(q, k, v, keep=kept, **masks)

        ref_out, ref = grads(ref_fn, (q, k, v), truth_grad)
        same_out, same = grads(ref_fn, [t.bfloat16() for t in (q, k, v)], truth_grad.bfloat16())
        assert (out.float() - ref_out).abs().max() <= 2 * (same_out.float() - ref_out).abs().max() + 1e-3
        for a, r, s in zip(got, ref, same, strict=True):
            assert a.dtype == torch.float32  # the cast is an autograd op: fp32 leaves get fp32 gradients
            assert (a - r).abs().max() <= 2 * (s.float() - r).abs().max() + 1e-3


# ----------------------------------------------------------------------------------------------
# CUDA: the masked forward and dense backward run PyTorch's memory-efficient attention with a bias
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("masks", [{"window": 37}, {"key_start": "docs"}, {"window": 100, "key_start": "docs"}])
@pytest.mark.parametrize("group", [1, 4])
def test_gpu_masks_dense_and_sparse(dtype, masks, group):
    gen = torch.Generator().manual_seed(group)
    B, T, hkv, D = 2, 300, 2, 64
    hq = hkv * group
    q, k, v = (t.cuda() for t in qkv(B, T, hq, hkv, D, gen, torch.float32))
    if masks.get("key_start") == "docs":
        masks = {**masks, "key_start": doc_starts(B, T, gen, 5).cuda()}
    sparse, keep = sparse_grad(B, T, hq, D, gen, 0.6, torch.float32)
    sparse = TokenSparseTensor(sparse.values.cuda(), sparse.index.cuda(), (B, T))
    keep = keep.cuda()
    dense = torch.randn(B, T, hq, D, generator=gen).cuda()
    low = [t.to(dtype) for t in (q, k, v)]
    for grad, kept in ((dense, None), (sparse, keep)):
        g_low = grad.to(dtype) if kept is None else TokenSparseTensor(grad.values.to(dtype), grad.index, (B, T))
        truth_grad = grad if kept is None else grad.to_dense()
        out, got = grads(lambda q, k, v: causal_attention(q, k, v, **masks), low, g_low)
        def ref_fn(q, k, v, kept=kept):
            return reference(q, k, v, keep=kept, **masks)

        ref_out, ref = grads(ref_fn, (q, k, v), truth_grad)
        same_out, same = grads(ref_fn, low, truth_grad.to(dtype))
        assert (out.float() - ref_out).abs().max() <= 2 * (same_out.float() - ref_out).abs().max() + 1e-5
        for a, r, s in zip(got, ref, same, strict=True):
            assert a.dtype == dtype
            assert (a.float() - r).abs().max() <= 2 * (s.float() - r).abs().max() + 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("masks", [{}, {"window": 37}])
def test_gpu_rotary_inside_equals_rotating_first(masks):
    """bf16 on the GPU: the same kernels in either order, so the same bits."""
    gen = torch.Generator().manual_seed(5)
    B, T, hkv, group, D = 2, 300, 2, 4, 64
    q, k, v = (t.cuda().bfloat16() for t in qkv(B, T, hkv * group, hkv, D, gen, torch.float32))
    cos, sin = (t.cuda() for t in rotary_tables(torch.arange(T), 32, 10000.0, torch.bfloat16))
    sparse, _ = sparse_grad(B, T, hkv * group, D, gen, 0.6, torch.bfloat16)
    sparse = TokenSparseTensor(sparse.values.cuda(), sparse.index.cuda(), (B, T))
    for grad in (torch.randn(B, T, hkv * group, D, generator=gen).cuda().bfloat16(), sparse):
        out, g = grads(lambda q, k, v: causal_attention(q, k, v, rotary=(cos, sin), **masks), (q, k, v), grad)
        ref_out, ref = grads(lambda q, k, v: causal_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin),
                                                               v, **masks), (q, k, v), grad)
        assert torch.equal(out, ref_out)
        assert all(torch.equal(a, r) for a, r in zip(g, ref, strict=True))


@pytest.mark.gpu
def test_gpu_empty_and_autocast():
    q = torch.randn(0, 7, 4, 8, device="cuda", requires_grad=True)
    assert causal_attention(q, q[:, :, :2], q[:, :, :2]).shape == (0, 7, 4, 8)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (t.cuda() for t in qkv(2, 64, 4, 2, 64, gen, torch.float32))
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=dtype):
            out = causal_attention(q, k, v, window=9)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), reference(q, k, v, window=9), rtol=2e-2, atol=2e-2)
