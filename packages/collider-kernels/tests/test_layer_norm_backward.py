"""``layer_norm_backward`` (torch and Triton backends) against the dense reference.

The torch backend is checked in fp64 tightly; the Triton backend runs under the interpreter on CPU
(fp32, fp16) and on CUDA in the ``gpu`` tests (bf16, fp16, fp32), with the error rule
``max|out - ref| <= 2 max|out_torch - ref| + atol`` against an fp64 reference. The tests of the
kernel LayerNorm shares with RMSNorm are in ``test_row_norms.py``, for both norms.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import (
    DEVICE,
    GPU_DTYPES,
    assert_each_raises,
    check_ln,
    nan_outputs,
    norm_case,
    poison_cuda_allocator,
    triton_only,
)
from kernel_testing import INDEX_KINDS as KINDS

import collider_kernels as ck
from collider_kernels import backends, reference

needs_triton = triton_only("layer_norm_backward")
widths, row_counts, epsilons = st.integers(1, 300), st.integers(1, 40), st.sampled_from((1e-5, 1e-6, 0.1))


@settings(deadline=None, max_examples=15)
@given(M=row_counts, H=widths, n=row_counts, kind=st.sampled_from(KINDS), eps=epsilons, seed=st.integers(0, 2**16))
def test_torch_fp64(M, H, n, kind, eps, seed):
    grad, x, w, idx = norm_case(M, H, n, kind, torch.float64, "cpu", seed)
    out = ck.layer_norm_backward(grad, x, w, eps, idx, backend="torch")
    ref = reference.layer_norm_backward_reference(grad, x, w, eps, idx)
    assert all(t.dtype == torch.float64 for t in out)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-11)


def test_torch_low_precision_computes_in_fp32():
    """bf16 inputs: statistics and formula in fp32, dx rounded once to bf16, dweight/dbias fp32."""
    grad, x, w, idx = norm_case(12, 40, 7, "sorted_subset", torch.bfloat16, "cpu", seed=1)
    dx, dw, db = ck.layer_norm_backward(grad, x, w, 1e-5, idx, backend="torch")
    rdx, rdw, rdb = reference.layer_norm_backward_reference(grad.float(), x.float(), w.float(), 1e-5, idx)
    assert dx.dtype == torch.bfloat16 and dw.dtype == db.dtype == torch.float32
    torch.testing.assert_close(dx, rdx.to(torch.bfloat16), rtol=0.01, atol=0.01)
    torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, rdb, rtol=1e-6, atol=1e-6)


@needs_triton
@settings(deadline=None, max_examples=15)
@given(M=row_counts, H=widths, n=row_counts, kind=st.sampled_from(KINDS),
       dtype=st.sampled_from((torch.float32, torch.float16)), eps=epsilons, row_pad=st.sampled_from((0, 5)),
       seed=st.integers(0, 2**16))
def test_triton(M, H, n, kind, dtype, eps, row_pad, seed):
    with nan_outputs():
        check_ln("triton", *norm_case(M, H, n, kind, dtype, DEVICE, seed, row_pad), eps)


def test_bad_inputs_name_the_argument():
    a = torch.randn(5, 8)
    w = torch.randn(8)
    idx = torch.tensor([0, 4])
    g = torch.randn(2, 8)
    cases = [
        (lambda: ck.layer_norm_backward(g, a, torch.randn(7), 1e-5, idx), ValueError, "weight"),
        (lambda: ck.layer_norm_backward(g, a, torch.randn(8, 1), 1e-5, idx), ValueError, "weight"),
        (lambda: ck.layer_norm_backward(g, a, w.long(), 1e-5, idx), TypeError, "weight"),
        (lambda: ck.layer_norm_backward(torch.randn(2, 7), a, w, 1e-5, idx), ValueError, "grad"),
        (lambda: ck.layer_norm_backward(torch.randn(3, 8), a, w, 1e-5), ValueError, "grad"),
        (lambda: ck.layer_norm_backward(g, a.int(), w, 1e-5, idx), TypeError, "x"),
        (lambda: ck.layer_norm_backward(g, a[0], w, 1e-5, idx), ValueError, "x"),
        (lambda: ck.layer_norm_backward(g, a, w, -1.0, idx), ValueError, "eps"),
        (lambda: ck.layer_norm_backward(g, a, w, math.nan, idx), ValueError, "eps"),
        (lambda: ck.layer_norm_backward(g, a, w, None, idx), ValueError, "eps"),
        (lambda: ck.layer_norm_backward(g, a, w, 1e-5, torch.tensor([-1, 0])), IndexError, "index"),
        (lambda: ck.layer_norm_backward(g, a, w, 1e-5, idx[:, None]), ValueError, "index"),
        (lambda: ck.layer_norm_backward(g, a, w, 1e-5, idx, backend="nope"), ValueError, "backend"),
    ]
    assert_each_raises(cases)
    ck.layer_norm_backward(g, a, torch.randn(8), 1e-5, idx, validate=False)  # no range check


@pytest.mark.gpu
def test_gpu_auto_follows_the_order():
    from collider_kernels.triton.layer_norm_backward import layer_norm_backward_triton

    first = backends.AUTO_ORDER_CUDA_BY_OP["layer_norm_backward"][0]
    got = backends.resolve_backend("layer_norm_backward", "auto", "cuda")
    assert (got is layer_norm_backward_triton) == (first == "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("H", (2048, 300, 1))
@pytest.mark.parametrize("kind", ("none", "sorted_subset", "repeats"))
def test_gpu(poison, dtype, H, kind):
    poison_cuda_allocator()
    check_ln("triton", *norm_case(5000, H, 3000, kind, dtype, "cuda", seed=H, row_pad=8), 1e-5)
