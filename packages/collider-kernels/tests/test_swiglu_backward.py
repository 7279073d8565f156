"""``swiglu_backward`` (torch and Triton backends) against the dense reference.

The torch backend is checked in fp64 tightly; the Triton backend runs under the interpreter on CPU
(fp32, fp16) and on CUDA in the ``gpu`` tests (bf16, fp16, fp32), with the error rule
``max|out - ref32| <= 2 max|out_torch - ref32| + atol``. Triton outputs are allocated NaN-filled,
so an element the kernel does not write fails the check.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import (
    DEVICE,
    GPU_DTYPES,
    assert_each_raises,
    check_swiglu,
    nan_outputs,
    poison_cuda_allocator,
    swiglu_case,
    triton_only,
)
from kernel_testing import INDEX_KINDS as KINDS

import collider_kernels as ck
from collider_kernels import reference

needs_triton = triton_only("swiglu_backward")
widths, row_counts = st.integers(1, 300), st.integers(1, 40)


@settings(deadline=None, max_examples=15)
@given(M=row_counts, I=widths, n=row_counts, kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16))
def test_torch_fp64(M, I, n, kind, seed):
    grad, gate, up, idx = swiglu_case(M, I, n, kind, torch.float64, "cpu", seed)
    dgate, dup = ck.swiglu_backward(grad, gate, up, idx, backend="torch")
    ref = reference.swiglu_backward_reference(grad, gate, up, idx)
    assert dgate.dtype == dup.dtype == torch.float64
    torch.testing.assert_close(dgate, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dup, ref[1], rtol=1e-12, atol=1e-12)


@needs_triton
@settings(deadline=None, max_examples=15)
@given(M=row_counts, I=widths, n=row_counts, kind=st.sampled_from(KINDS),
       dtype=st.sampled_from((torch.float32, torch.float16)), row_pad=st.sampled_from((0, 3)),
       seed=st.integers(0, 2**16))
def test_triton(M, I, n, kind, dtype, row_pad, seed):
    with nan_outputs():
        check_swiglu("triton", *swiglu_case(M, I, n, kind, dtype, DEVICE, seed, row_pad))


@needs_triton
def test_triton_int32_index_and_empty_width(poison):
    grad, gate, up, _ = swiglu_case(10, 17, 4, "repeats", torch.float32, DEVICE, seed=5)
    check_swiglu("triton", grad, gate, up, torch.tensor([1, 4, 4, 9], dtype=torch.int32, device=DEVICE))
    empty = torch.empty(4, 0, device=DEVICE)
    dgate, dup = ck.swiglu_backward(empty, empty, empty, backend="triton")
    assert dgate.shape == dup.shape == (4, 0)


@needs_triton
def test_triton_fp64_takes_torch_under_auto_and_is_refused_explicitly():
    grad, gate, up, idx = swiglu_case(9, 13, 4, "sorted_subset", torch.float64, DEVICE, seed=2)
    got = ck.swiglu_backward(grad, gate, up, idx)
    want = ck.swiglu_backward(grad, gate, up, idx, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(RuntimeError, match="float64"):
        ck.swiglu_backward(grad, gate, up, idx, backend="triton")


def check_with_output(backend, grad, gate, up, idx):
    """``with_output=True`` adds y of the rows ``idx``, rounded as ``swiglu_forward`` on that backend
    rounds it (bit for bit), and leaves the gradients as they are without it."""
    dgate, dup, y = ck.swiglu_backward(grad, gate, up, idx, with_output=True, backend=backend)
    plain = ck.swiglu_backward(grad, gate, up, idx, backend=backend)
    assert len(plain) == 2 and torch.equal(dgate, plain[0]) and torch.equal(dup, plain[1])
    rows = (gate, up) if idx is None else (gate[idx], up[idx])
    assert y.dtype == gate.dtype and torch.equal(y, ck.swiglu_forward(*rows, backend=backend))


@settings(deadline=None, max_examples=10)
@given(M=row_counts, I=widths, n=row_counts, kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16))
def test_torch_with_output(M, I, n, kind, seed):
    check_with_output("torch", *swiglu_case(M, I, n, kind, torch.float16, "cpu", seed))


@needs_triton
@settings(deadline=None, max_examples=10)
@given(M=row_counts, I=widths, n=row_counts, kind=st.sampled_from(KINDS),
       dtype=st.sampled_from((torch.float32, torch.float16)), row_pad=st.sampled_from((0, 3)),
       seed=st.integers(0, 2**16))
def test_triton_with_output(M, I, n, kind, dtype, row_pad, seed):
    with nan_outputs():
        check_with_output("triton", *swiglu_case(M, I, n, kind, dtype, DEVICE, seed, row_pad))


def test_bad_inputs_name_the_argument():
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    idx = torch.tensor([0, 4])
    cases = [
        (lambda: ck.swiglu_backward(torch.randn(2, 8), a, b.half(), idx), TypeError, "up"),
        (lambda: ck.swiglu_backward(torch.randn(2, 8), a, torch.randn(5, 7), idx), ValueError, "up"),
        (lambda: ck.swiglu_backward(torch.randn(3, 8), a, b, idx), ValueError, "grad"),
        (lambda: ck.swiglu_backward(torch.randn(2, 8), a, b), ValueError, "grad"),
        (lambda: ck.swiglu_backward(torch.randn(2, 8), a[0], b, idx), ValueError, "gate"),
        (lambda: ck.swiglu_backward(torch.randn(2, 8).long(), a, b, idx), TypeError, "grad"),
        (lambda: ck.swiglu_backward(torch.randn(2, 8), a, b, torch.tensor([0, 5])), IndexError, "index"),
        (lambda: ck.swiglu_backward(torch.randn(2, 8), a, b, idx.float()), TypeError, "index"),
        (lambda: ck.swiglu_backward(torch.randn(2, 8), a, b, idx, backend="nope"), ValueError, "backend"),
    ]
    assert_each_raises(cases)
    ck.swiglu_backward(torch.randn(2, 8), a, a, idx, validate=False)  # validate=False: no range check


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("I", (5632, 8960, 300))
@pytest.mark.parametrize("kind", ("none", "sorted_subset", "repeats"))
def test_gpu(poison, dtype, I, kind):
    poison_cuda_allocator()
    case = swiglu_case(3000, I, 1800, kind, dtype, "cuda", seed=I, row_pad=8)
    check_swiglu("triton", *case)
    check_with_output("triton", *case)


@pytest.mark.gpu
def test_gpu_edge_index_sets(poison):
    for kind in KINDS:
        check_swiglu("triton", *swiglu_case(513, 777, 77, kind, torch.bfloat16, "cuda", seed=5))
