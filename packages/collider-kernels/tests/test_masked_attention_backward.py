"""``masked_attention_backward``: every backend against the dense reference of the contract (the
Design page, ``docs/design.rst``), with sliding windows and packed documents, argument validation
and ``sequence_offsets``.

The torch backend is checked in fp64 tightly. The Triton kernels run under Triton's interpreter on
CPU (small fp32/fp16 cases, both dQ strategies, preallocated outputs poisoned with NaN); the ``gpu``
tests run bf16 on CUDA with the rule ``max|out - ref32| <= 2 max|out_torch_bf16 - ref32| + atol``,
where ``ref32`` is the reference on fp32 upcasts and ``out_torch_bf16`` the torch backend on the
same bf16 inputs.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import KEEP_KINDS, doc_starts, keep_row

import collider_kernels as ck
from collider_kernels.ops.masked_attention_backward import _masked_attention_backward_torch
from collider_kernels.reference import attention_forward_reference, masked_attention_backward_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
STRATEGIES = ("separate", "atomic")
try:
    from collider_kernels.triton import masked_attention_backward as tab
except ImportError:  # Triton is not installed: its tests skip
    tab = None
triton_only = pytest.mark.skipif(tab is None, reason="Triton is not installed")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


class Case:
    """Random inputs in ``dtype`` (q/k/v strided views of one projection, ``out`` transposed like
    SDPA's), the forward in ``truth`` precision, and the truth of the contract on the same values:
    ``ref_dense`` (B, T, H, D) and ``ref`` (the kept rows). ``docs`` > 0 packs up to that many
    documents per row (``key_start``); ``window`` is the sliding window."""

    def __init__(self, B, T, Hq, Hkv, D, kinds, dtype, seed, device=DEVICE, truth=torch.float64, window=None,
                 docs=0):
        gen = torch.Generator().manual_seed(seed)
        self.shape = (B, T, Hq, Hkv, D)
        fused = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=gen).to(dtype).to(device)
        self.q = fused[..., : Hq * D].view(B, T, Hq, D)
        self.k = fused[..., Hq * D: (Hq + Hkv) * D].view(B, T, Hkv, D)
        self.v = fused[..., (Hq + Hkv) * D:].view(B, T, Hkv, D)
        self.keep = torch.stack([keep_row(kd, T, gen) for kd in kinds]).to(device)  # (B, T)
        grad = torch.randn(B, T, Hq, D, generator=gen).to(dtype).to(device)
        self.window = window
        self.key_start = doc_starts(B, T, docs, gen).to(device) if docs else None
        masks = self.public_kwargs()
        qt, kt, vt = (t.to(truth) for t in (self.q, self.k, self.v))
        out, lse = attention_forward_reference(qt, kt, vt, **masks)  # out (B, T, Hq, D) transposed view
        self.out = out.to(dtype)
        self.lse = lse if dtype == torch.float64 else lse.float()  # (B, Hq, T)
        self.index = self.keep.reshape(-1).nonzero().squeeze(1)  # (n,)
        self.offsets = ck.sequence_offsets(self.index, B, T)
        self.grad_out = grad.reshape(B * T, Hq, D)[self.index]  # (n, Hq, D)
        dense_g = (grad.to(truth) * self.keep[..., None, None])
        self.scale = 1.0 / math.sqrt(D)
        self.ref_dense = masked_attention_backward_reference(qt, kt, vt, dense_g, self.keep, **masks)
        self.ref = [r.reshape(B * T, r.shape[2], D)[self.index] for r in self.ref_dense]  # kept rows

    def args(self):
        return (self.q, self.k, self.v, self.out, self.lse, self.grad_out, self.index, self.offsets, self.scale,
                self.window, self.key_start)

    def public_kwargs(self):
        return dict(window=self.window, key_start=self.key_start)

    def public(self, **overrides):
        """Keyword arguments of the public op (overridable)."""
        kw = dict(q=self.q, k=self.k, v=self.v, out=self.out, lse=self.lse, grad_out=self.grad_out,
                  index=self.index, **self.public_kwargs())
        kw.update(overrides)
        return kw

    def run(self, strategy, poison=True, **variant):
        n = self.index.numel()
        B, T, Hq, Hkv, D = self.shape
        bufs = {}
        if poison:
            dt, dev = self.q.dtype, self.q.device
            bufs = {"dq": torch.full((n, Hq, D), float("nan"), dtype=dt, device=dev),
                    "dk": torch.full((n, Hkv, D), float("nan"), dtype=dt, device=dev),
                    "dv": torch.full((n, Hkv, D), float("nan"), dtype=dt, device=dev)}
        res = tab.masked_attention_backward_triton(*self.args(), dq_strategy=strategy, **variant, **bufs)
        if poison:
            assert all(r is bufs[k] for r, k in zip(res, ("dq", "dk", "dv"), strict=True))
        return res


def assert_close_rel(res, ref, tol, what):
    for name, a, r in zip(("dq", "dk", "dv"), res, ref, strict=True):
        assert a.shape == r.shape, f"{what} {name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite values (unwritten rows?)"
        if a.numel():
            err = (a.double() - r.double()).abs().max().item()
            scale = r.double().abs().max().item() + 1.0  # inputs are O(1): an absolute floor
            assert err <= tol * scale, f"{what} {name}: max err {err:.3g} > {tol} * {scale:.3g}"


def assert_rule(res, ref32, torch_res, what):
    """``max|out - ref32| <= 2 max|out_torch - ref32| + atol``, atol one bf16 step of the result scale."""
    for name, a, r, t in zip(("dq", "dk", "dv"), res, ref32, torch_res, strict=True):
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite values (unwritten rows?)"
        if not a.numel():
            continue
        err = (a.double() - r.double()).abs().max().item()
        base = (t.double() - r.double()).abs().max().item()
        atol = 2.0**-8 * r.double().abs().max().item() + 1e-6
        assert err <= 2 * base + atol, f"{what} {name}: err {err:.3g} > 2 * {base:.3g} + {atol:.3g}"


# ----------------------------------------------------------------------------------------------
# torch backend: exact in fp64
# ----------------------------------------------------------------------------------------------


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
    case = Case(B, T, Hkv * group, Hkv, D, kinds[:B], torch.float64, seed, window=window, docs=docs)
    res = ck.masked_attention_backward(**case.public(), backend="torch")
    for name, a, r in zip(("dq", "dk", "dv"), res, case.ref, strict=True):
        assert a.dtype == torch.float64 and a.shape == r.shape, name
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=name)
    # The contract itself: filtered positions get exactly zero gradient everywhere.
    for r in case.ref_dense:
        assert (r[~case.keep] == 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window,docs", [(None, 0), (6, 0), (None, 4), (9, 3)])
def test_torch_backend_low_precision(dtype, tol, window, docs):
    case = Case(2, 37, 8, 2, 16, ("scattered", "runs"), dtype, 4, window=window, docs=docs)
    res = ck.masked_attention_backward(**case.public(), backend="torch")
    for a, r in zip(res, case.ref, strict=True):
        assert a.dtype == dtype
        assert (a.double() - r).abs().max() <= tol * (1 + r.abs().max())


def test_window_and_documents_change_the_gradients():
    """The masks are honoured, not ignored: a window or document boundaries that cut keys change
    every gradient against plain causal attention (same data), and a window as long as the row
    changes nothing."""
    def grads(**masks):
        case = Case(2, 30, 4, 2, 8, ("all", "scattered"), torch.float64, 3, **masks)
        return ck.masked_attention_backward(**case.public(), backend="torch")

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
    case = Case(2, 24, 6, 2, 8, ("all", "all"), torch.float64, seed=9)
    q, k, v = (t.detach().clone().requires_grad_() for t in (case.q, case.k, case.v))
    out, _ = attention_forward_reference(q, k, v)
    g = torch.zeros(out.shape, dtype=torch.float64, device=q.device)
    g.view(48, 6, 8)[case.index] = case.grad_out
    dense = torch.autograd.grad(out, (q, k, v), g)
    res = ck.masked_attention_backward(**case.public(), backend="torch")
    for a, d in zip(res, dense, strict=True):
        torch.testing.assert_close(a, d.reshape(48, -1, 8))


def test_nothing_kept_gives_empty_outputs():
    case = Case(2, 10, 4, 1, 8, ("empty", "empty"), torch.float32, seed=0)
    dq, dk, dv = ck.masked_attention_backward(**case.public(), backend="torch")
    assert dq.shape == (0, 4, 8) and dk.shape == (0, 1, 8) and dv.shape == (0, 1, 8)


def test_explicit_offsets_and_scale():
    case = Case(3, 20, 4, 2, 8, ("runs", "empty", "scattered"), torch.float64, seed=6)
    offsets = ck.sequence_offsets(case.index, 3, 20)
    a = ck.masked_attention_backward(**case.public(), offsets=offsets, scale=1 / math.sqrt(8), backend="torch")
    b = ck.masked_attention_backward(**case.public(), backend="torch")
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
    return Case(2, 8, 4, 2, 8, ("scattered", "all"), torch.float32, seed=1, device="cpu").public()


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
    import collider_kernels.ops.masked_attention_backward as mod

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


# ----------------------------------------------------------------------------------------------
# Triton, on CPU (interpreter) and GPU: exactness in fp32
# ----------------------------------------------------------------------------------------------

@triton_only
@settings(deadline=None, max_examples=10)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 70),
    Hkv=st.integers(1, 2),
    group=st.sampled_from((1, 4, 6, 8)),
    D=st.sampled_from((16, 24, 32)),
    kinds=st.lists(st.sampled_from(KEEP_KINDS), min_size=3, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_fp32(B, T, Hkv, group, D, kinds, seed):
    case = Case(B, T, Hkv * group, Hkv, D, kinds[:B], torch.float32, seed)
    for strategy in STRATEGIES:
        assert_close_rel(case.run(strategy), case.ref, 2e-5, f"fp32 {strategy}")


@triton_only
@settings(deadline=None, max_examples=12)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 90),
    Hkv=st.integers(1, 2),
    group=st.sampled_from((1, 3, 4)),
    D=st.sampled_from((16, 24)),
    kinds=st.lists(st.sampled_from(KEEP_KINDS), min_size=3, max_size=3),
    window=st.one_of(st.none(), st.integers(1, 70)),
    docs=st.sampled_from((0, 1, 2, 6)),
    dtype=st.sampled_from((torch.float32, torch.float16)),
    seed=st.integers(0, 2**31 - 1),
)
def test_masks_match_reference(B, T, Hkv, group, D, kinds, window, docs, dtype, seed):
    """Sliding windows and document starts, random: both dQ strategies, split dK/dV sums and
    compact queries, outputs poisoned with NaN."""
    case = Case(B, T, Hkv * group, Hkv, D, kinds[:B], dtype, seed, window=window, docs=docs)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for strategy in STRATEGIES:
        assert_close_rel(case.run(strategy), case.ref, tol, f"{dtype} window {window} docs {docs} {strategy}")
    if group > 1:
        res = case.run("separate", dkdv_split=group, compact_q=False)
        assert_close_rel(res, case.ref, tol, f"{dtype} window {window} docs {docs} split")


@triton_only
@pytest.mark.parametrize("blocks", [{"dkdv": (16, 16), "dq": (16, 16)}, {"dkdv": (64, 16), "dq": (32, 64)}])
@pytest.mark.parametrize("window,docs", [(1, 0), (17, 0), (None, 5), (40, 3)])
def test_masks_across_block_shapes(blocks, window, docs, monkeypatch):
    """Windows and documents straddling several blocks of both passes (interpreter only)."""
    if CUDA:
        pytest.skip("block shapes are autotuned on the GPU")
    monkeypatch.setattr(tab, "INTERPRET_BLOCKS", blocks)
    case = Case(2, 150, 4, 2, 16, ("scattered", "all"), torch.float32, seed=8, window=window, docs=docs)
    for strategy in STRATEGIES:
        assert_close_rel(case.run(strategy), case.ref, 2e-5, f"blocks {blocks} window {window} docs {docs}")


@triton_only
def test_window_skips_key_blocks_before_it():
    """Keys in whole blocks before every kept query's window are never read by the dQ pass
    ("separate"): poisoning them with NaN changes nothing."""
    case = Case(1, 128, 4, 2, 16, ("empty",), torch.float32, seed=4, window=8)
    keep = torch.zeros(1, 128, dtype=torch.bool, device=case.q.device)
    keep[0, 100:] = True  # kept queries see keys from 93 on
    index = keep.reshape(-1).nonzero().squeeze(1)
    grad = torch.randn(1, 128, 4, 16, dtype=torch.float64, device=case.q.device)
    qkv = (case.q.double(), case.k.double(), case.v.double())
    ref = masked_attention_backward_reference(*qkv, grad * keep[..., None, None], keep, window=8)
    case.index, case.offsets = index, ck.sequence_offsets(index, 1, 128)
    case.grad_out = grad.reshape(128, 4, 16)[index].float()
    case.ref = [r.reshape(128, -1, 16)[index] for r in ref]
    clean = case.run("separate")
    case.k, case.v = case.k.clone(), case.v.clone()
    case.k[:, :64] = float("nan")  # whole blocks for every block size used here
    case.v[:, :64] = float("nan")
    poisoned = case.run("separate")
    assert_close_rel(poisoned, case.ref, 2e-5, "poisoned keys before the window")
    for a, b in zip(clean, poisoned, strict=True):
        assert torch.equal(a, b)


@triton_only
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("blocks", [{"dkdv": (16, 16), "dq": (16, 16)}, {"dkdv": (64, 16), "dq": (32, 64)}])
def test_block_shapes(strategy, blocks, monkeypatch):
    """Kept sets spanning several blocks, under other block shapes (interpreter only)."""
    if CUDA:
        pytest.skip("block shapes are autotuned on the GPU")
    monkeypatch.setattr(tab, "INTERPRET_BLOCKS", blocks)
    case = Case(2, 130, 4, 2, 16, ("scattered", "runs"), torch.float32, seed=7)
    assert_close_rel(case.run(strategy), case.ref, 2e-5, f"blocks {blocks}")


# (dkdv_split, compact_q): every way of dealing a group of 6 query heads over dK/dV programs.
VARIANTS = [(1, False), (2, True), (3, False), (6, True), (1, True)]


@triton_only
@pytest.mark.parametrize("split,compact", VARIANTS)
def test_dkdv_split_and_compact_q(split, compact):
    """Partial dK/dV sums over head shares and compact query copies give the same gradients."""
    case = Case(3, 90, 12, 2, 16, ("scattered", "runs", "empty"), torch.float32, seed=17 + split)
    for strategy in STRATEGIES:
        res = case.run(strategy, dkdv_split=split, compact_q=compact)
        assert_close_rel(res, case.ref, 2e-5, f"split {split} compact {compact} {strategy}")


@triton_only
@pytest.mark.parametrize("masks", [{}, {"window": 37}, {"docs": 3}])
def test_dkdv_compact_q_across_loops(masks):
    """With compact queries each dK/dV step loads the next query block's lse and delta: the
    gradients stay exact across the masked, unmasked and window/document loops of a key block and
    across head shares."""
    case = Case(3, 150, 6, 2, 16, ("scattered", "runs", "empty"), torch.float32, seed=23, **masks)
    for split in (1, 3):
        res = case.run("separate", dkdv_split=split, compact_q=True)
        assert_close_rel(res, case.ref, 2e-5, f"compact split {split} {masks}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_into_views_of_one_buffer(backend):
    """``into``: dQ, dK, dV land in column slices of one poisoned (n, Hq + 2 Hkv, D) buffer (the
    rows of a fused q/k/v projection's gradient), equal to the op's own outputs."""
    if backend not in ck.available_backends("masked_attention_backward", DEVICE):
        pytest.skip(f"the {backend} backend is not available here")
    dtype = torch.bfloat16 if CUDA else torch.float32
    case = Case(2, 70, 4, 2, 16, ("scattered", "runs"), dtype, seed=5)
    kw = case.public(offsets=case.offsets, backend=backend, validate=False)
    want = ck.masked_attention_backward(**kw)
    n = case.index.numel()
    buf = torch.full((n, 4 + 2 * 2, 16), float("nan"), dtype=dtype, device=DEVICE)
    into = buf.split([4, 2, 2], dim=1)
    got = ck.masked_attention_backward(**kw, into=into)
    assert all(g is i for g, i in zip(got, into, strict=True))
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)
    assert not buf.isnan().any()


def test_into_bad_buffers_name_the_argument():
    case = Case(1, 20, 4, 2, 8, ("scattered",), torch.float32, seed=2)
    n = case.index.numel()
    kw = case.public(validate=False, backend="torch")
    good = (torch.empty(n, 4, 8), torch.empty(n, 2, 8), torch.empty(n, 2, 8))
    with pytest.raises(TypeError, match="into must be a"):
        ck.masked_attention_backward(**kw, into=good[:2])
    with pytest.raises(ValueError, match=r"into\[1\] \(dk\) must be"):
        ck.masked_attention_backward(**kw, into=(good[0], torch.empty(n, 4, 8), good[2]))
    with pytest.raises(TypeError, match=r"into\[2\] \(dv\) must have dtype"):
        ck.masked_attention_backward(**kw, into=(*good[:2], good[2].double()))
    with pytest.raises(ValueError, match="unit last stride"):
        ck.masked_attention_backward(**kw, into=(torch.empty(n, 4, 16)[..., ::2], *good[1:]))
    with pytest.raises(ValueError, match=r"into\[0\] \(dq\) must not share memory with grad_out"):
        ck.masked_attention_backward(**kw, into=(case.grad_out, *good[1:]))
    in_k = case.k.as_strided((n, 2, 8), (16, 8, 1), 0)  # the projection buffer q, k and v live in
    with pytest.raises(ValueError, match=r"into\[1\] \(dk\) must not share memory with q"):
        ck.masked_attention_backward(**kw, into=(good[0], in_k, good[2]))


@triton_only
def test_atomic_strategy_falls_back_to_element_atomics(monkeypatch):
    """Where the bulk (TMA) reduction of dQ tiles cannot be compiled (here: the interpreter, told
    to try it), the atomic strategy warns once, says why in TMA_DQ_FAILED and gives the same
    gradients with element atomics."""
    if CUDA:
        pytest.skip("on the GPU the atomic strategy's own cases run the bulk reduction")
    case = Case(2, 70, 4, 2, 16, ("scattered", "runs"), torch.float32, seed=3)
    monkeypatch.setattr(tab, "TMA_DQ_FAILED", None)
    monkeypatch.setattr(tab, "_bulk_reduce_ok", lambda q, head_dim: True)
    with pytest.warns(RuntimeWarning, match="bulk dQ reduction unavailable"):
        res = case.run("atomic")
    assert tab.TMA_DQ_FAILED
    assert_close_rel(res, case.ref, 2e-5, "atomic after the fallback")
    assert_close_rel(case.run("atomic"), case.ref, 2e-5, "atomic, fallback remembered")


def test_bulk_reduce_needs_a_hopper_gpu_and_a_full_width_tile():
    assert not tab._bulk_reduce_ok(torch.zeros(1), 64)  # CPU tensors never
    if CUDA and not tab.INTERPRET:
        q = torch.zeros(1, device="cuda")
        hopper = torch.cuda.get_device_capability()[0] >= 9
        assert tab._bulk_reduce_ok(q, 64) == hopper and tab._bulk_reduce_ok(q, 128) == hopper
        assert not tab._bulk_reduce_ok(q, 8) and not tab._bulk_reduce_ok(q, 96)


@triton_only
def test_dkdv_split_for():
    split = tab.dkdv_split_for
    # The H200 measurements the model was fit on (132 SMs, B=8, T=2048).
    assert split(8, 4, 8, 8 * 2048, 64, 132) == 1  # TinyLlama keep 1.0
    assert split(8, 4, 8, 8 * 1229, 64, 132) == 2  # TinyLlama keep 0.6
    assert split(8, 2, 6, 8 * 2048, 128, 132) == 1  # Qwen2.5 keep 1.0
    assert split(8, 2, 6, 8 * 1229, 128, 132) == 2  # Qwen2.5 keep 0.6
    assert split(8, 32, 1, 8 * 1229, 64, 132) == 1  # Phi-1.5: nothing to split
    for b, hkv, g, kept in ((1, 1, 6, 10), (2, 1, 7, 0), (4, 2, 8, 300), (1, 1, 1, 5)):
        s = split(b, hkv, g, kept, 64, 132)
        assert g % s == 0


@triton_only
def test_rejects_bad_split():
    case = Case(1, 8, 6, 1, 16, ("all",), torch.float32, seed=2)
    with pytest.raises(ValueError, match="dkdv_split"):
        tab.masked_attention_backward_triton(*case.args(), dkdv_split=4)


@triton_only
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_public_api_and_edge_sets(strategy, monkeypatch):
    monkeypatch.setattr(tab, "DQ_STRATEGY", strategy)
    for kinds in (("all", "all"), ("empty", "empty"), ("one", "empty"), ("empty", "all")):
        case = Case(2, 33, 8, 2, 16, kinds, torch.float32, seed=3)
        res = ck.masked_attention_backward(*case.args()[:7], backend="triton")
        assert_close_rel(res, case.ref, 2e-5, f"public api {kinds}")
        masked = Case(2, 33, 8, 2, 16, kinds, torch.float32, seed=3, window=5, docs=3)
        res = ck.masked_attention_backward(*masked.args()[:7], backend="triton", **masked.public_kwargs())
        assert_close_rel(res, masked.ref, 2e-5, f"public api masked {kinds}")
        assert all(r.dtype == torch.float32 for r in res)


@triton_only
def test_all_kept_equals_dense_gradients():
    """keep all-true: ordinary dense attention gradients."""
    case = Case(2, 40, 4, 1, 16, ("all", "all"), torch.float32, seed=11)
    q, k, v = (t.detach().double().requires_grad_() for t in (case.q, case.k, case.v))
    out, _ = attention_forward_reference(q, k, v)
    g = torch.zeros(out.shape, dtype=torch.float64)
    g.view(-1, 4, 16)[case.index] = case.grad_out.double()
    dense = torch.autograd.grad(out, (q, k, v), g)
    for strategy in STRATEGIES:
        res = case.run(strategy)
        assert_close_rel(res, [d.reshape(80, -1, 16) for d in dense], 2e-5, f"dense {strategy}")


@triton_only
def test_never_reads_unneeded_rows():
    """Filtered queries' q/out/lse and keys after a sequence's last kept position are never read."""
    case = Case(2, 50, 4, 2, 16, ("scattered", "runs"), torch.float32, seed=5)
    B = 2
    q, k, v, out, lse = (t.clone() for t in (case.q, case.k, case.v, case.out, case.lse))
    for b in range(B):
        kept = case.keep[b]
        q[b, ~kept] = float("nan")
        out[b, ~kept] = float("nan")
        lse[b][:, ~kept] = float("nan")
        if kept.any():
            last = int(kept.nonzero().max())
            k[b, last + 1:] = float("nan")
            v[b, last + 1:] = float("nan")
        else:
            k[b] = float("nan")
            v[b] = float("nan")
    for strategy in STRATEGIES:
        for compact in (False, True):
            res = tab.masked_attention_backward_triton(
                q, k, v, out, lse, case.grad_out, case.index, case.offsets, case.scale,
                dq_strategy=strategy, compact_q=compact)
            assert_close_rel(res, case.ref, 2e-5, f"poisoned unneeded rows {strategy} compact {compact}")


@triton_only
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp16_upcast(strategy):
    case = Case(2, 48, 8, 2, 32, ("scattered", "all"), torch.float16, seed=13)
    res = case.run(strategy)
    assert all(r.dtype == torch.float16 for r in res)
    assert_close_rel(res, case.ref, 1e-2, f"fp16 {strategy}")


@triton_only
def test_float64_takes_torch_under_auto_and_is_refused_by_triton():
    for masks in ({}, {"window": 3, "docs": 2}):
        case = Case(1, 20, 2, 1, 16, ("scattered",), torch.float64, seed=1, **masks)
        assert_close_rel(ck.masked_attention_backward(**case.public()), case.ref, 1e-10, f"fp64 {masks}")
        assert ck.auto_backend("masked_attention_backward", "cuda", (torch.float64,)) == "torch"
        with pytest.raises(RuntimeError, match="float64"):
            ck.masked_attention_backward(**case.public(), backend="triton")


@triton_only
def test_rejects_unknown_strategy():
    case = Case(1, 8, 2, 1, 16, ("all",), torch.float32, seed=2)
    with pytest.raises(ValueError, match="dq_strategy"):
        tab.masked_attention_backward_triton(*case.args(), dq_strategy="nope")


# ----------------------------------------------------------------------------------------------
# GPU: bf16 rule
# ----------------------------------------------------------------------------------------------


def _bf16_check(case, what):
    """``case.ref`` must be the fp32 truth (``truth=torch.float32``) of the bf16 inputs."""
    torch_res = _masked_attention_backward_torch(*case.args())
    for strategy in STRATEGIES:
        res = case.run(strategy)
        assert all(r.dtype == torch.bfloat16 for r in res)
        assert_rule(res, case.ref, torch_res, f"{what} {strategy}")


@pytest.mark.gpu
@settings(deadline=None, max_examples=8)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 400),
    Hkv=st.integers(1, 2),
    group=st.sampled_from((1, 4, 6, 8)),
    D=st.sampled_from((64, 128)),
    kinds=st.lists(st.sampled_from(KEEP_KINDS), min_size=3, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_gpu_bf16_rule(B, T, Hkv, group, D, kinds, seed):
    case = Case(B, T, Hkv * group, Hkv, D, kinds[:B], torch.bfloat16, seed, truth=torch.float32)
    _bf16_check(case, f"bf16 B{B} T{T} G{group} D{D}")


@pytest.mark.gpu
@settings(deadline=None, max_examples=8)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 600),
    group=st.sampled_from((1, 4, 6)),
    D=st.sampled_from((64, 128)),
    kinds=st.lists(st.sampled_from(KEEP_KINDS), min_size=3, max_size=3),
    window=st.one_of(st.none(), st.integers(1, 300)),
    docs=st.sampled_from((0, 2, 7)),
    seed=st.integers(0, 2**31 - 1),
)
def test_gpu_bf16_masks_rule(B, T, group, D, kinds, window, docs, seed):
    case = Case(B, T, 2 * group, 2, D, kinds[:B], torch.bfloat16, seed, truth=torch.float32, window=window,
                docs=docs)
    _bf16_check(case, f"bf16 masks B{B} T{T} G{group} D{D} window {window} docs {docs}")


@pytest.mark.gpu
@pytest.mark.parametrize("window,docs", [(4096, 0), (256, 0), (None, 6), (300, 4)])
def test_gpu_bf16_masks_model_shapes(window, docs):
    """Qwen2.5 heads (12/2, D 128) at T=2048: windows and packed documents at model scale."""
    case = Case(2, 2048, 12, 2, 128, ("scattered", "all"), torch.bfloat16, seed=5, truth=torch.float32,
                window=window, docs=docs)
    _bf16_check(case, f"bf16 model shapes window {window} docs {docs}")


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,D", [(32, 4, 64), (12, 2, 128), (32, 32, 64)])
def test_gpu_with_flash_sdpa_forward(Hq, Hkv, D):
    """out/lse as PyTorch's flash SDPA returns them (lse convention, transposed out)."""
    B, T = 2, 512
    case = Case(B, T, Hq, Hkv, D, ("scattered", "runs"), torch.bfloat16, seed=Hq + D, truth=torch.float32)
    qh, kh, vh = (t.transpose(1, 2) for t in (case.q, case.k, case.v))
    g = Hq // Hkv
    kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
    r = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, True, False, scale=case.scale)
    case.out, case.lse = r[0].transpose(1, 2), r[1]
    assert case.lse.shape == (B, Hq, T) and case.lse.dtype == torch.float32
    _bf16_check(case, f"flash-sdpa {Hq}/{Hkv}/{D}")


@pytest.mark.gpu
@pytest.mark.parametrize("split,compact", VARIANTS)
def test_gpu_bf16_split_and_compact_q(split, compact):
    case = Case(2, 700, 12, 2, 128, ("scattered", "runs"), torch.bfloat16, seed=split, truth=torch.float32)
    torch_res = _masked_attention_backward_torch(*case.args())
    res = case.run("separate", dkdv_split=split, compact_q=compact)
    assert_rule(res, case.ref, torch_res, f"bf16 split {split} compact {compact}")


@pytest.mark.gpu
@pytest.mark.parametrize("D,group", [(64, 8), (128, 6)])
def test_gpu_every_tuning_candidate(D, group):
    """Each configuration the tuner may pick, of either pass, obeys the bf16 rule (the GPU suite
    runs the untuned defaults otherwise); packed documents exercise the masked steps too."""
    case = Case(2, 700, group, 1, D, ("scattered", "runs"), torch.bfloat16, seed=D, truth=torch.float32, docs=3)
    torch_res = _masked_attention_backward_torch(*case.args())
    for which, cands in (("dkdv", tab.dkdv_candidates(D)), ("dq", tab.dq_candidates(D))):
        for meta in cands:
            blocks = tuple(meta[k] for k in tab._NAMES[which]) + (meta["num_warps"], meta["num_stages"])
            assert_rule(case.run("separate", blocks={which: blocks}), case.ref, torch_res, f"{which} {blocks}")


@pytest.mark.gpu
def test_gpu_fp32_exact():
    case = Case(2, 300, 8, 2, 64, ("scattered", "runs"), torch.float32, seed=21)
    for strategy in STRATEGIES:
        assert_close_rel(case.run(strategy), case.ref, 1e-4, f"gpu fp32 {strategy}")
