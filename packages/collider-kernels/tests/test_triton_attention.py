"""Triton masked attention backward against the dense reference of the contract (the Design page).

On CPU the kernels run under Triton's interpreter (small fp32/fp16 cases, both dQ strategies,
preallocated outputs poisoned with NaN). The ``gpu`` tests run bf16 on CUDA with the rule
``max|out - ref32| <= 2 max|out_torch_bf16 - ref32| + atol``, where ``ref32`` is the reference on
fp32 upcasts and ``out_torch_bf16`` the torch backend on the same bf16 inputs.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import KEEP_KINDS, doc_starts, keep_row

import collider_kernels as ck
from collider_kernels.masked_attention import _masked_attention_backward_torch
from collider_kernels.reference import attention_forward_reference, masked_attention_backward_reference

pytest.importorskip("triton")
from collider_kernels.triton import attention_backward as tab  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
STRATEGIES = ("separate", "atomic")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


class Case:
    """Random inputs in ``dtype`` (q/k/v strided views of one projection, ``out`` transposed like
    SDPA's), the fp64 forward, and the fp32-or-better truth of the contract on the same values."""

    def __init__(self, B, T, Hq, Hkv, D, kinds, dtype, seed, device=DEVICE, truth=torch.float64, window=None,
                 docs=0):
        gen = torch.Generator().manual_seed(seed)
        self.shape = (B, T, Hq, Hkv, D)
        fused = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=gen).to(dtype).to(device)
        self.q = fused[..., : Hq * D].view(B, T, Hq, D)
        self.k = fused[..., Hq * D: (Hq + Hkv) * D].view(B, T, Hkv, D)
        self.v = fused[..., (Hq + Hkv) * D:].view(B, T, Hkv, D)
        self.keep = torch.stack([keep_row(kd, T, gen) for kd in kinds]).to(device)  # (B, T)
        self.window = window
        self.key_start = doc_starts(B, T, docs, gen).to(device) if docs else None
        masks = dict(window=window, key_start=self.key_start)
        qt, kt, vt = (t.to(truth) for t in (self.q, self.k, self.v))
        out, lse = attention_forward_reference(qt, kt, vt, **masks)  # out (B, T, Hq, D) transposed view
        self.out = out.to(dtype)
        self.lse = lse if dtype == torch.float64 else lse.float()  # (B, Hq, T)
        grad = torch.randn(B, T, Hq, D, generator=gen).to(dtype).to(device)
        self.index = self.keep.reshape(-1).nonzero().squeeze(1)  # (n,)
        self.offsets = ck.sequence_offsets(self.index, B, T)
        self.grad_out = grad.reshape(B * T, Hq, D)[self.index]  # (n, Hq, D)
        dense_g = (grad.to(truth) * self.keep[..., None, None])
        self.scale = 1.0 / math.sqrt(D)
        ref = masked_attention_backward_reference(qt, kt, vt, dense_g, self.keep, **masks)
        self.ref = [r.reshape(B * T, r.shape[2], D)[self.index] for r in ref]  # kept rows

    def args(self):
        return (self.q, self.k, self.v, self.out, self.lse, self.grad_out, self.index, self.offsets, self.scale,
                self.window, self.key_start)

    def public_kwargs(self):
        return dict(window=self.window, key_start=self.key_start)

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
# CPU (interpreter) and GPU: exactness in fp32
# ----------------------------------------------------------------------------------------------


def test_triton_backend_is_registered():
    assert "triton" in ck.available_backends("masked_attention_backward", DEVICE)


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


@pytest.mark.parametrize("split,compact", VARIANTS)
def test_dkdv_split_and_compact_q(split, compact):
    """Partial dK/dV sums over head shares and compact query copies give the same gradients."""
    case = Case(3, 90, 12, 2, 16, ("scattered", "runs", "empty"), torch.float32, seed=17 + split)
    for strategy in STRATEGIES:
        res = case.run(strategy, dkdv_split=split, compact_q=compact)
        assert_close_rel(res, case.ref, 2e-5, f"split {split} compact {compact} {strategy}")


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


def test_rejects_bad_split():
    case = Case(1, 8, 6, 1, 16, ("all",), torch.float32, seed=2)
    with pytest.raises(ValueError, match="dkdv_split"):
        tab.masked_attention_backward_triton(*case.args(), dkdv_split=4)


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


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp16_upcast(strategy):
    case = Case(2, 48, 8, 2, 32, ("scattered", "all"), torch.float16, seed=13)
    res = case.run(strategy)
    assert all(r.dtype == torch.float16 for r in res)
    assert_close_rel(res, case.ref, 1e-2, f"fp16 {strategy}")


def test_float64_falls_back_to_torch():
    for masks in ({}, {"window": 3, "docs": 2}):
        case = Case(1, 20, 2, 1, 16, ("scattered",), torch.float64, seed=1, **masks)
        res = tab.masked_attention_backward_triton(*case.args())
        assert_close_rel(res, case.ref, 1e-10, f"fp64 {masks}")


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
def test_gpu_fp32_exact():
    case = Case(2, 300, 8, 2, 64, ("scattered", "runs"), torch.float32, seed=21)
    for strategy in STRATEGIES:
        assert_close_rel(case.run(strategy), case.ref, 1e-4, f"gpu fp32 {strategy}")
