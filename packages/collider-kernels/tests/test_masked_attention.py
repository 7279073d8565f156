"""Public ``masked_attention_backward`` API: the torch backend against the dense reference of the
contract (the Design page), sliding windows and document starts, argument validation, and
``sequence_offsets``."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import KEEP_KINDS, doc_starts, keep_row

import collider_kernels as ck
from collider_kernels.reference import attention_forward_reference, masked_attention_backward_reference


def make_case(B, T, Hq, Hkv, D, kinds, dtype, seed, window=None, docs=0):
    """Inputs (q/k/v strided views of one projection, ``out`` transposed like SDPA's) and the
    reference gradients of the kept rows; ``docs`` > 0 packs up to that many documents per row."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=gen, dtype=torch.float64).to(dtype)
    q = fused[..., : Hq * D].view(B, T, Hq, D)
    k = fused[..., Hq * D: (Hq + Hkv) * D].view(B, T, Hkv, D)
    v = fused[..., (Hq + Hkv) * D:].view(B, T, Hkv, D)
    keep = torch.stack([keep_row(kd, T, gen) for kd in kinds])  # (B, T)
    grad = torch.randn(B, T, Hq, D, generator=gen, dtype=torch.float64)
    masks = dict(window=window, key_start=doc_starts(B, T, docs, gen) if docs else None)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    out, lse = attention_forward_reference(q64, k64, v64, **masks)
    index = keep.reshape(-1).nonzero().squeeze(1)
    ref = masked_attention_backward_reference(q64, k64, v64, grad * keep[..., None, None], keep, **masks)
    ref_kept = [r.reshape(B * T, r.shape[2], D)[index] for r in ref]
    args = dict(q=q, k=k, v=v, out=out.to(dtype), lse=lse.float() if dtype != torch.float64 else lse,
                grad_out=grad.reshape(B * T, Hq, D)[index].to(dtype), index=index, **masks)
    return args, ref, ref_kept, keep


@settings(deadline=None, max_examples=25)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 40),
    Hkv=st.integers(1, 2),
    group=st.sampled_from((1, 4, 6, 8)),
    D=st.sampled_from((4, 8, 16)),
    kinds=st.lists(st.sampled_from(KEEP_KINDS), min_size=3, max_size=3),
    window=st.one_of(st.none(), st.integers(1, 45)),
    docs=st.sampled_from((0, 1, 3, 8)),
    seed=st.integers(0, 2**31 - 1),
)
def test_torch_backend_matches_reference(B, T, Hkv, group, D, kinds, window, docs, seed):
    args, ref, ref_kept, keep = make_case(B, T, Hkv * group, Hkv, D, kinds[:B], torch.float64, seed, window, docs)
    res = ck.masked_attention_backward(**args, backend="torch")
    for name, a, r in zip(("dq", "dk", "dv"), res, ref_kept, strict=True):
        assert a.dtype == torch.float64 and a.shape == r.shape, name
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=name)
    # The contract itself: filtered positions get exactly zero gradient everywhere.
    for r in ref:
        assert (r[~keep] == 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window,docs", [(None, 0), (6, 0), (None, 4), (9, 3)])
def test_torch_backend_low_precision(dtype, tol, window, docs):
    args, _, ref_kept, _ = make_case(2, 37, 8, 2, 16, ("scattered", "runs"), dtype, 4, window, docs)
    res = ck.masked_attention_backward(**args, backend="torch")
    for a, r in zip(res, ref_kept, strict=True):
        assert a.dtype == dtype
        assert (a.double() - r).abs().max() <= tol * (1 + r.abs().max())


def test_window_and_documents_change_the_gradients():
    """The masks are honoured, not ignored: a window or document boundaries that cut keys change
    every gradient against plain causal attention (same data), and a window as long as the row
    changes nothing."""
    def grads(**masks):
        args = make_case(2, 30, 4, 2, 8, ("all", "scattered"), torch.float64, 3, **masks)[0]
        return ck.masked_attention_backward(**args, backend="torch")

    plain = grads()
    for masks in ({"window": 4}, {"docs": 3}):
        for a, p in zip(grads(**masks), plain, strict=True):
            assert (a - p).abs().max() > 1e-3, masks
    for a, p in zip(grads(window=30), plain, strict=True):
        torch.testing.assert_close(a, p)


def test_window_matches_transformers_convention():
    """window=W: query t sees keys t-W+1 .. t (W keys, itself included), as transformers'
    sliding_window_overlay (kv_idx > q_idx - W) on top of its causal mask."""
    from collider_kernels.reference import attention_visibility

    T, W = 12, 4
    vis = attention_visibility(T, window=W)[0]
    q, kv = torch.arange(T)[:, None], torch.arange(T)[None, :]
    assert torch.equal(vis, (kv > q - W) & (kv <= q))
    assert vis.sum(1).tolist() == [min(t + 1, W) for t in range(T)]
    starts = torch.tensor([[0, 0, 0, 3, 3, 3, 3, 3, 8, 8, 8, 8]])
    vis = attention_visibility(T, key_start=starts)[0]
    assert torch.equal(vis, (starts[0][:, None] == starts[0][None, :]) & (kv <= q))


def test_all_kept_is_dense_autograd():
    args, _, ref_kept, _ = make_case(2, 24, 6, 2, 8, ("all", "all"), torch.float64, seed=9)
    q, k, v = (args[n].detach().clone().requires_grad_() for n in "qkv")
    out, _ = attention_forward_reference(q, k, v)
    g = torch.zeros(out.shape, dtype=torch.float64)
    g.view(48, 6, 8)[args["index"]] = args["grad_out"]
    dense = torch.autograd.grad(out, (q, k, v), g)
    res = ck.masked_attention_backward(**args, backend="torch")
    for a, d in zip(res, dense, strict=True):
        torch.testing.assert_close(a, d.reshape(48, -1, 8))


def test_nothing_kept_gives_empty_outputs():
    args, _, _, _ = make_case(2, 10, 4, 1, 8, ("empty", "empty"), torch.float32, seed=0)
    dq, dk, dv = ck.masked_attention_backward(**args, backend="torch")
    assert dq.shape == (0, 4, 8) and dk.shape == (0, 1, 8) and dv.shape == (0, 1, 8)


def test_explicit_offsets_and_scale():
    args, _, _, _ = make_case(3, 20, 4, 2, 8, ("runs", "empty", "scattered"), torch.float64, seed=6)
    offsets = ck.sequence_offsets(args["index"], 3, 20)
    a = ck.masked_attention_backward(**args, offsets=offsets, scale=1 / math.sqrt(8), backend="torch")
    b = ck.masked_attention_backward(**args, backend="torch")
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


def test_sequence_offsets():
    index = torch.tensor([1, 2, 7, 12, 13, 14])  # T = 5: sequences 0, 1, 2 (none), 2 ... of B=4
    off = ck.sequence_offsets(index, 4, 5)
    assert off.tolist() == [0, 2, 3, 6, 6]


# ----------------------------------------------------------------------------------------------
# bad inputs: the error names the argument
# ----------------------------------------------------------------------------------------------


def _good():
    args, _, _, _ = make_case(2, 8, 4, 2, 8, ("scattered", "all"), torch.float32, seed=1)
    return args


def _bad_cases():
    yield "q", TypeError, lambda a: a.update(q=a["q"].numpy())
    yield "q", ValueError, lambda a: a.update(q=a["q"][0])
    yield "q", TypeError, lambda a: a.update(q=a["q"].to(torch.int32))
    yield "k", TypeError, lambda a: a.update(k=a["k"].double())
    yield "k", ValueError, lambda a: a.update(k=a["k"][:, :4])
    yield "v", ValueError, lambda a: a.update(v=a["v"][..., :4])
    yield "k and v", ValueError, lambda a: a.update(v=torch.randn(2, 8, 1, 8))
    yield "query heads", ValueError, lambda a: a.update(k=torch.randn(2, 8, 3, 8), v=torch.randn(2, 8, 3, 8))
    yield "out", ValueError, lambda a: a.update(out=a["out"][:, :, :2])
    yield "out", TypeError, lambda a: a.update(out=a["out"].double())
    yield "lse", TypeError, lambda a: a.update(lse=a["lse"].half())
    yield "lse", ValueError, lambda a: a.update(lse=a["lse"].transpose(1, 2))
    yield "index", TypeError, lambda a: a.update(index=a["index"].float())
    yield "index", IndexError, lambda a: a["index"].__setitem__(-1, 16)
    yield "index", ValueError, lambda a: a.update(index=a["index"].flip(0))
    yield "grad_out", ValueError, lambda a: a.update(grad_out=a["grad_out"][1:])
    yield "grad_out", TypeError, lambda a: a.update(grad_out=a["grad_out"].half())


@pytest.mark.parametrize("name,exc,mutate", list(_bad_cases()))
def test_bad_inputs_name_the_argument(name, exc, mutate):
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=name):
        ck.masked_attention_backward(**args, backend="torch")


def test_bad_masks_name_the_argument():
    args = {k: v for k, v in _good().items() if k not in ("window", "key_start")}  # B=2, T=8
    ok = torch.zeros(2, 8, dtype=torch.int64)
    for bad in (0, -3, 2.0, True, "4"):
        with pytest.raises(ValueError, match="window"):
            ck.masked_attention_backward(**args, window=bad, backend="torch")
    cases = [
        (TypeError, ok.float()),
        (ValueError, ok[:, :5]),
        (ValueError, ok[0]),
        (ValueError, torch.tensor([[0, 0, 0, 4, 4, 4, 4, 4]] * 2)),  # key_start[3] = 4 > 3
        (ValueError, torch.tensor([[0, 0, 2, 2, 1, 1, 1, 1]] * 2)),  # decreasing
        (ValueError, torch.full((2, 8), -1)),
    ]
    for exc, ks in cases:
        with pytest.raises(exc, match="key_start"):
            ck.masked_attention_backward(**args, key_start=ks, backend="torch")
    ck.masked_attention_backward(**args, key_start=torch.full((2, 8), 9), validate=False, backend="torch")


def test_bad_offsets_and_backend():
    args = _good()
    with pytest.raises(ValueError, match="offsets"):
        ck.masked_attention_backward(**args, offsets=torch.zeros(5, dtype=torch.int64), backend="torch")
    right = ck.sequence_offsets(args["index"], 2, 8)
    with pytest.raises(ValueError, match="offsets"):  # right shape, wrong values: never read blindly
        ck.masked_attention_backward(**args, offsets=right + 1, backend="torch")
    with pytest.raises(ValueError, match="offsets"):
        ck.masked_attention_backward(**args, offsets=torch.tensor([0, 1, 99]), backend="torch")
    with pytest.raises(TypeError, match="offsets"):
        ck.masked_attention_backward(**args, offsets=right.float(), backend="torch")
    with pytest.raises(TypeError, match="offsets"):
        ck.masked_attention_backward(**args, offsets=right.tolist(), backend="torch")
    with pytest.raises(ValueError, match="backend"):
        ck.masked_attention_backward(**args, backend="nope")


@pytest.mark.parametrize("strategy_share", [0.0, 2.0])  # 0: always the dense CPU flash path; 2: never
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("window,docs", [(None, 0), (5, 0), (None, 3), (7, 4)])
def test_torch_backend_cpu_strategies_agree_with_reference(monkeypatch, strategy_share, group, dtype, window, docs):
    import collider_kernels.masked_attention as mod

    monkeypatch.setattr(mod, "_CPU_DENSE_KEEP_SHARE", strategy_share)
    gen = torch.Generator().manual_seed(7 + group)
    B, T, hkv, D = 3, 23, 2, 16
    q = torch.randn(B, T, hkv * group, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, T, hkv, D, generator=gen, dtype=torch.float64) for _ in range(2))
    keep = torch.rand(B, T, generator=gen) < 0.6
    keep[1] = False
    keep[2, 0] = True
    dout = torch.randn(B, T, hkv * group, D, generator=gen, dtype=torch.float64) * keep[..., None, None]
    masks = dict(window=window, key_start=doc_starts(B, T, docs, gen) if docs else None)
    out, lse = attention_forward_reference(q, k, v, **masks)
    index = keep.reshape(-1).nonzero().squeeze(1)
    got = ck.masked_attention_backward(
        q.to(dtype), k.to(dtype), v.to(dtype), out.to(dtype), lse.to(torch.promote_types(dtype, torch.float32)),
        dout.reshape(B * T, -1, D)[index].to(dtype), index, backend="torch", **masks,
    )
    ref = masked_attention_backward_reference(q, k, v, dout, keep, **masks)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.double(), r.reshape(B * T, -1, D)[index], rtol=tol, atol=tol)
