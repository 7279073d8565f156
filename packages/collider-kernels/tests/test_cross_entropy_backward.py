"""``cross_entropy_backward`` (torch and Triton backends) against the dense reference and each other.

The torch backend is checked in fp64 against autograd of ``F.cross_entropy``. The Triton backend
(under the interpreter on CPU, with several vocabulary blocks per row; on CUDA in the ``gpu`` tests)
computes in fp32 as the torch backend does: fp32 outputs agree to a few ulp, 16-bit ones within
the rule ``max|out - ref| <= 2 max|out_torch - ref| + atol`` against the fp64 reference. Written
out of place (NaN-filled outputs), into a separate ``out`` and in place over the logits; with an
``index``, the rows it picks from a larger logits tensor equal the op on the gathered rows.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import (
    DEVICE,
    GPU_DTYPES,
    assert_rule,
    ce_case,
    nan_outputs,
    poison_cuda_allocator,
    small_atol,
    triton_only,
)

import collider_kernels as ck
from collider_kernels import reference

needs_triton = triton_only("cross_entropy_backward")


def bwd_case(n, V, dtype, device, seed, **kw):
    """``(logits, lse, labels, scale)``: lse from the forward (fp32), scale (n,) fp32 > 0."""
    logits, labels = ce_case(n, V, dtype, device, seed, **kw)
    _, lse = ck.cross_entropy_forward(logits, labels, kw.get("ignore_index", -100), backend="torch")
    scale = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)).to(device) + 0.5
    return logits, lse, labels, scale


def check_ce_backward(backend, logits, lse, labels, scale, ignore_index=-100, *, mode="new"):
    """dlogits on ``backend`` (``mode``: "new" output, "out" a separate fp32 buffer, "inplace" over
    a copy of the logits) against the torch backend and the fp64 reference."""
    base = ck.cross_entropy_backward(logits, lse, labels, scale, ignore_index, backend="torch")
    truth = reference.cross_entropy_backward_reference(logits.double(), labels, scale.double(), ignore_index)
    if mode == "new":
        got = ck.cross_entropy_backward(logits, lse, labels, scale, ignore_index, backend=backend)
    else:
        buf = logits.clone() if mode == "inplace" else torch.full(logits.shape, float("nan"), device=logits.device)
        got = ck.cross_entropy_backward(buf if mode == "inplace" else logits, lse, labels, scale, ignore_index,
                                        out=buf, backend=backend)
        assert got is buf
        base = base if mode == "inplace" else ck.cross_entropy_backward(
            logits, lse, labels, scale, ignore_index, out=torch.empty_like(buf), backend="torch")
    assert got.dtype == base.dtype and got.shape == logits.shape
    assert_rule(got, truth, base, atol=small_atol(got.dtype, truth), what=f"ce backward[{backend}] {mode}")
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, base, rtol=4e-6, atol=1e-7)
    ignored = labels == ignore_index
    assert torch.equal(got[ignored], torch.zeros_like(got[ignored])), "ignored rows must be zero"
    return got


@settings(deadline=None, max_examples=15)
@given(n=st.integers(0, 30), V=st.integers(1, 300), ignore_index=st.sampled_from((-100, 0, 3)),
       seed=st.integers(0, 2**16))
def test_torch_fp64(n, V, ignore_index, seed):
    logits, lse, labels, scale = bwd_case(n, V, torch.float64, "cpu", seed, ignore_index=ignore_index)
    got = ck.cross_entropy_backward(logits, lse, labels, scale.double(), ignore_index, backend="torch")
    want = reference.cross_entropy_backward_reference(logits, labels, scale.double(), ignore_index)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_torch_in_place_and_into_out():
    logits, lse, labels, scale = bwd_case(7, 50, torch.float32, "cpu", seed=1)
    for mode in ("inplace", "out"):
        check_ce_backward("torch", logits, lse, labels, scale, mode=mode)


@needs_triton
@settings(deadline=None, max_examples=15)
@given(n=st.integers(1, 20), V=st.integers(1, 500), dtype=st.sampled_from((torch.float32, torch.float16)),
       row_pad=st.sampled_from((0, 5)), ignore_index=st.sampled_from((-100, 2)),
       mode=st.sampled_from(("new", "out", "inplace")), seed=st.integers(0, 2**16))
def test_triton(n, V, dtype, row_pad, ignore_index, mode, seed):
    case = bwd_case(n, V, dtype, DEVICE, seed, row_pad=row_pad, ignore_index=ignore_index)
    with nan_outputs():
        check_ce_backward("triton", *case, ignore_index, mode=mode)


def check_indexed(backend, logits, lse, labels, scale, index, ignore_index=-100):
    """The op over ``index`` rows of ``logits`` (read in place) equals it over the gathered rows,
    bitwise (the same per-element arithmetic); written into a NaN-filled buffer and new."""
    want = ck.cross_entropy_backward(logits.index_select(0, index), lse, labels, scale, ignore_index,
                                     backend=backend)
    got = ck.cross_entropy_backward(logits, lse, labels, scale, ignore_index, index=index, backend=backend)
    assert got.shape == (index.shape[0], logits.shape[1]) and got.dtype == logits.dtype
    assert torch.equal(got, want)
    buf = torch.full_like(want, float("nan"))
    assert ck.cross_entropy_backward(logits, lse, labels, scale, ignore_index, index=index, out=buf,
                                     backend=backend) is buf
    assert torch.equal(buf, want)


@settings(deadline=None, max_examples=10)
@given(M=st.integers(1, 40), V=st.integers(1, 200), picks=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_torch_index_rows_fp64_against_reference(M, V, picks, seed):
    logits, lse_all, labels_all, scale_all = bwd_case(M, V, torch.float64, "cpu", seed)
    index = torch.randint(0, M, (picks,), generator=torch.Generator().manual_seed(seed))
    lse, labels, scale = lse_all[index], labels_all[index], scale_all[index].double()
    got = ck.cross_entropy_backward(logits, lse, labels, scale, index=index, backend="torch")
    want = reference.cross_entropy_backward_reference(logits[index], labels, scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    check_indexed("torch", logits, lse, labels, scale, index)


@needs_triton
@settings(deadline=None, max_examples=10)
@given(M=st.integers(1, 30), V=st.integers(1, 300), picks=st.integers(1, 20),
       dtype=st.sampled_from((torch.float32, torch.float16)), index_dtype=st.sampled_from((torch.int64, torch.int32)),
       seed=st.integers(0, 2**16))
def test_triton_index_rows_match_gathered_rows(M, V, picks, dtype, index_dtype, seed):
    logits, lse_all, labels_all, scale_all = bwd_case(M, V, dtype, DEVICE, seed, row_pad=3, ignore_index=1)
    index = torch.randint(0, M, (picks,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    with nan_outputs():
        check_indexed("triton", logits, lse_all[index], labels_all[index], scale_all[index],
                      index.to(index_dtype), ignore_index=1)


@needs_triton
def test_triton_edges(poison):
    """No rows, one class, every row ignored, a column-strided input, int32 labels."""
    logits, lse, labels, scale = bwd_case(0, 40, torch.float32, DEVICE, seed=1)
    assert ck.cross_entropy_backward(logits, lse, labels, scale, backend="triton").shape == (0, 40)
    check_ce_backward("triton", *bwd_case(5, 1, torch.float32, DEVICE, seed=2, ignore_share=0.0))
    check_ce_backward("triton", *bwd_case(5, 200, torch.float32, DEVICE, seed=3, ignore_share=1.0))
    logits, lse, labels, scale = bwd_case(8, 30, torch.float16, DEVICE, seed=4)
    check_ce_backward("triton", logits.t().contiguous().t(), lse, labels.int(), scale)


def test_ignored_rows_are_zero_whatever_their_lse_and_scale():
    logits, lse, labels, scale = bwd_case(6, 90, torch.float32, DEVICE, seed=5, ignore_share=0.0)
    labels[[1, 4]] = -100
    lse[1], scale[4] = float("-inf"), float("nan")  # garbage where no loss is due
    for backend in ck.available_backends("cross_entropy_backward", DEVICE):
        got = ck.cross_entropy_backward(logits, lse, labels, scale, backend=backend)
        assert torch.equal(got[[1, 4]], torch.zeros(2, 90, device=DEVICE)), backend
        assert torch.isfinite(got).all(), backend


def test_labels_out_of_range_are_an_error_or_nan_without_validation():
    logits, lse, labels, scale = bwd_case(5, 20, torch.float32, DEVICE, seed=6, ignore_share=0.0)
    labels[3] = 25
    with pytest.raises(IndexError, match="labels must lie in"):
        ck.cross_entropy_backward(logits, lse, labels, scale)
    for backend in ck.available_backends("cross_entropy_backward", DEVICE):
        got = ck.cross_entropy_backward(logits, lse, labels, scale, validate=False, backend=backend)
        assert got[3].isnan().all() and torch.isfinite(got[[0, 1, 2, 4]]).all(), backend


@needs_triton
def test_triton_fp64_takes_torch_under_auto_and_is_refused_explicitly():
    logits, lse, labels, scale = bwd_case(6, 30, torch.float64, DEVICE, seed=2)
    got = ck.cross_entropy_backward(logits, lse.double(), labels, scale)
    assert torch.equal(got, ck.cross_entropy_backward(logits, lse.double(), labels, scale, backend="torch"))
    with pytest.raises(RuntimeError, match="float64"):
        ck.cross_entropy_backward(logits.float(), lse.double(), labels, scale, backend="triton")


def test_bad_inputs_name_the_argument():
    logits, lse, labels, scale = bwd_case(4, 10, torch.float32, "cpu", seed=3)
    buf = torch.randn(5, 10)  # logits and out overlapping in part
    cases = [
        (lambda: ck.cross_entropy_backward(logits[0], lse, labels, scale), ValueError, "logits must be 2-D"),
        (lambda: ck.cross_entropy_backward(logits, lse[:3], labels, scale), ValueError, "lse must have one entry"),
        (lambda: ck.cross_entropy_backward(logits, lse.half(), labels, scale), TypeError, "lse must have dtype"),
        (lambda: ck.cross_entropy_backward(logits, lse, labels, scale[:, None]), ValueError, "scale must be 1-D"),
        (lambda: ck.cross_entropy_backward(logits, lse, labels[:2], scale), ValueError, "labels"),
        (lambda: ck.cross_entropy_backward(logits, lse, labels, scale, out=logits[:2]), ValueError, "out must have"),
        (lambda: ck.cross_entropy_backward(logits, lse, labels, scale, out=logits.long()), TypeError, "out"),
        (lambda: ck.cross_entropy_backward(buf[:4], lse, labels, scale, out=buf[1:]), ValueError, "share"),
        (lambda: ck.cross_entropy_backward(logits, lse, labels, scale, backend="nope"), ValueError, "backend"),
        (lambda: ck.cross_entropy_backward(logits, lse, labels, scale, index=torch.tensor([0, 4, 1, 2])),
         IndexError, "index must lie in"),
        (lambda: ck.cross_entropy_backward(logits, lse, labels, scale, index=torch.tensor([0.0, 1, 1, 2])),
         TypeError, "index must have dtype"),
        (lambda: ck.cross_entropy_backward(logits, lse[:2], labels[:2], scale, index=torch.tensor([0, 1])),
         ValueError, "scale must have one entry per index entry"),
        (lambda: ck.cross_entropy_backward(logits, lse, labels[:2], scale, index=torch.tensor([0, 1, 1, 3])),
         ValueError, "labels must have one entry per index entry"),
        (lambda: ck.cross_entropy_backward(logits, lse, labels, scale, index=torch.tensor([0, 1, 1, 3]),
                                           out=logits), ValueError, "must not share memory with logits"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("V", (32000, 151936, 51200, 1000))
@pytest.mark.parametrize("mode", ("new", "inplace"))
def test_gpu(poison, dtype, V, mode):
    poison_cuda_allocator()
    check_ce_backward("triton", *bwd_case(600, V, dtype, "cuda", seed=V, row_pad=16), mode=mode)


@pytest.mark.gpu
@pytest.mark.parametrize("V", (32000, 151936))
def test_gpu_index_rows(poison, V):
    poison_cuda_allocator()
    logits, lse, labels, scale = bwd_case(700, V, torch.bfloat16, "cuda", seed=V, row_pad=16)
    index = torch.randperm(700, device="cuda")[:420].sort().values
    with nan_outputs():
        check_indexed("triton", logits, lse[index], labels[index], scale[index], index)
