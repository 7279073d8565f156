"""``gelu_new_backward`` (the tanh GELU; torch and Triton backends) against the dense reference.

The torch backend is checked in fp64 tightly; the Triton backend runs under the interpreter on CPU
(fp32, fp16) and on CUDA in the ``gpu`` tests (bf16, fp16, fp32), with the error rule
``max|out - ref| <= 2 max|out_torch - ref| + atol`` against an fp64 reference. Triton outputs are
allocated NaN-filled.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import (
    DEVICE,
    GPU_DTYPES,
    assert_each_raises,
    assert_rule,
    check_gelu,
    gelu_case,
    nan_outputs,
    poison_cuda_allocator,
    small_atol,
    triton_only,
)
from kernel_testing import INDEX_KINDS as KINDS

import collider_kernels as ck
from collider_kernels import backends, reference

needs_triton = triton_only("gelu_new_backward")
widths, row_counts = st.integers(1, 300), st.integers(1, 40)


def check_with_output(backend, grad, x, idx):
    """``with_output=True`` adds y of the rows ``idx`` and leaves dx as it is without it. The torch
    backend's y is ``F.gelu(approximate="tanh")``'s, bit for bit; any backend's obeys the error rule
    against the fp64 reference with the torch backend's error as the bar."""
    dx, y = ck.gelu_new_backward(grad, x, idx, with_output=True, backend=backend)
    assert torch.equal(dx, ck.gelu_new_backward(grad, x, idx, backend=backend))
    rows = x if idx is None else x[idx]
    torch_y = torch.nn.functional.gelu(rows, approximate="tanh")
    if backend == "torch":
        assert torch.equal(y, torch_y)
    ref = reference.gelu_new_reference(rows.double())
    assert y.dtype == x.dtype and y.shape == rows.shape
    assert_rule(y, ref, torch_y, atol=small_atol(x.dtype, ref), what=f"gelu y[{backend}]", same_dtype=True)


@settings(deadline=None, max_examples=15)
@given(M=row_counts, F=widths, n=row_counts, kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16))
def test_torch_fp64(M, F, n, kind, seed):
    grad, x, idx = gelu_case(M, F, n, kind, torch.float64, "cpu", seed)
    dx = ck.gelu_new_backward(grad, x, idx, backend="torch")
    ref = reference.gelu_new_backward_reference(grad, x, idx)
    assert dx.dtype == torch.float64
    torch.testing.assert_close(dx, ref, rtol=1e-12, atol=1e-12)


def test_torch_low_precision_computes_in_fp32():
    grad, x, idx = gelu_case(12, 40, 7, "sorted_subset", torch.bfloat16, "cpu", seed=1)
    dx = ck.gelu_new_backward(grad, x, idx, backend="torch")
    assert dx.dtype == torch.bfloat16
    want = reference.gelu_new_backward_reference(grad.float(), x.float(), idx).to(torch.bfloat16)
    torch.testing.assert_close(dx, want, rtol=0.01, atol=0.01)


@needs_triton
@settings(deadline=None, max_examples=15)
@given(M=row_counts, F=widths, n=row_counts, kind=st.sampled_from(KINDS),
       dtype=st.sampled_from((torch.float32, torch.float16)), row_pad=st.sampled_from((0, 3)),
       seed=st.integers(0, 2**16))
def test_triton(M, F, n, kind, dtype, row_pad, seed):
    case = gelu_case(M, F, n, kind, dtype, DEVICE, seed, row_pad)
    with nan_outputs():
        check_gelu("triton", *case)
        check_with_output("triton", *case)


@needs_triton
def test_triton_saturated_inputs(poison):
    """Large |x|: tanh saturates; no overflow or NaN, and zero/one slopes come out right."""
    for dtype in (torch.float32, torch.float16):
        for kind in ("none", "full"):
            grad, x, idx = gelu_case(16, 64, 16, kind, dtype, DEVICE, seed=6, scale=40.0)
            x[0, :4] = torch.tensor([0.0, -0.0, 300.0, -300.0], dtype=dtype)
            check_gelu("triton", grad, x, idx)
            check_with_output("triton", grad, x, idx)


@needs_triton
def test_triton_int32_index_and_empty_width(poison):
    grad, x, _ = gelu_case(10, 17, 4, "repeats", torch.float32, DEVICE, seed=5)
    check_gelu("triton", grad, x, torch.tensor([1, 4, 4, 9], dtype=torch.int32, device=DEVICE))
    empty = torch.empty(4, 0, device=DEVICE)
    assert ck.gelu_new_backward(empty, empty, backend="triton").shape == (4, 0)
    dx, y = ck.gelu_new_backward(empty, empty, with_output=True, backend="triton")
    assert dx.shape == y.shape == (4, 0)


@needs_triton
def test_triton_fp64_takes_torch_under_auto_and_is_refused_explicitly():
    grad, x, idx = gelu_case(9, 13, 4, "sorted_subset", torch.float64, DEVICE, seed=2)
    assert torch.equal(ck.gelu_new_backward(grad, x, idx), ck.gelu_new_backward(grad, x, idx, backend="torch"))
    with pytest.raises(RuntimeError, match="float64"):
        ck.gelu_new_backward(grad, x, idx, backend="triton")


@settings(deadline=None, max_examples=10)
@given(M=row_counts, F=widths, n=row_counts, kind=st.sampled_from(KINDS),
       dtype=st.sampled_from((torch.float64, torch.float32, torch.bfloat16)), seed=st.integers(0, 2**16))
def test_torch_with_output(M, F, n, kind, dtype, seed):
    check_with_output("torch", *gelu_case(M, F, n, kind, dtype, "cpu", seed))


def test_bad_inputs_name_the_argument():
    a = torch.randn(5, 8)
    idx = torch.tensor([0, 4])
    g = torch.randn(2, 8)
    cases = [
        (lambda: ck.gelu_new_backward(torch.randn(3, 8), a, idx), ValueError, "grad"),
        (lambda: ck.gelu_new_backward(torch.randn(2, 8), a), ValueError, "grad"),
        (lambda: ck.gelu_new_backward(g.long(), a, idx), TypeError, "grad"),
        (lambda: ck.gelu_new_backward(g, a[0], idx), ValueError, "x"),
        (lambda: ck.gelu_new_backward(g, "x", idx), TypeError, "x"),
        (lambda: ck.gelu_new_backward(g, a, torch.tensor([0, 5])), IndexError, "index"),
        (lambda: ck.gelu_new_backward(g, a, idx.float()), TypeError, "index"),
        (lambda: ck.gelu_new_backward(g, a, idx, backend="cupy"), RuntimeError, "cupy"),
    ]
    assert_each_raises(cases)
    ck.gelu_new_backward(g, a, idx, validate=False)  # validate=False: no range check


@pytest.mark.gpu
def test_gpu_auto_follows_the_order():
    from collider_kernels.triton.gelu_new_backward import gelu_new_backward_triton

    first = backends.AUTO_ORDER_CUDA_BY_OP["gelu_new_backward"][0]
    got = backends.resolve_backend("gelu_new_backward", "auto", "cuda")
    assert (got is gelu_new_backward_triton) == (first == "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("F", (8192, 300))
@pytest.mark.parametrize("kind", ("none", "sorted_subset", "repeats"))
def test_gpu(poison, dtype, F, kind):
    poison_cuda_allocator()
    case = gelu_case(3000, F, 1800, kind, dtype, "cuda", seed=F, row_pad=8)
    check_gelu("triton", *case)
    check_with_output("triton", *case)


@pytest.mark.gpu
def test_gpu_edge_index_sets(poison):
    for kind in KINDS:
        check_gelu("triton", *gelu_case(513, 777, 77, kind, torch.bfloat16, "cuda", seed=5))
