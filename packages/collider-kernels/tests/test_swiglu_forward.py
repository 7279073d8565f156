"""``swiglu_forward`` (torch and Triton backends) against the dense reference and each other.

The torch backend is checked in fp64 against the reference and for its rounding (silu rounded to
gate's dtype, then the product). The Triton backend runs under the interpreter on CPU (fp32,
fp16) and on CUDA in the ``gpu`` tests (bf16, fp16, fp32), with the rule
``max|out - ref| <= 2 max|out_torch - ref| + atol``; it rounds as the torch backend does, so in
16 bits it differs only where the fp32 silu of the two lands on either side of a rounding
boundary. Triton outputs are allocated NaN-filled.
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
    mismatch_share,
    nan_outputs,
    poison_cuda_allocator,
    rand,
    small_atol,
    triton_only,
)

import collider_kernels as ck
from collider_kernels import reference

needs_triton = triton_only("swiglu_forward")


def swiglu_inputs(M, I, dtype, device, seed, layout="fused", up_dtype=None):
    """``(gate, up)`` (M, I): the two column halves of one (M, 2I) projection (``"fused"``), rows of
    a wider buffer (``"padded"``), or contiguous; ``up`` in ``up_dtype`` (separate) when given."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "fused" and up_dtype is None:
        both = rand(M, 2 * I, dtype, device, gen, scale=3.0)  # (M, 2I)
        return both[:, :I], both[:, I:]
    pad = 3 if layout == "padded" else 0
    gate = rand(M, I, dtype, device, gen, scale=3.0, row_pad=pad)
    return gate, rand(M, I, up_dtype or dtype, device, gen, row_pad=pad)


def check_swiglu_forward(backend, gate, up, *, max_share=0.01):
    """``swiglu_forward`` on ``backend`` against the fp64 reference and the torch backend."""
    y = ck.swiglu_forward(gate, up, backend=backend)
    base = ck.swiglu_forward(gate, up, backend="torch")
    truth = reference.swiglu_forward_reference(gate.double(), up.double())
    assert y.dtype == torch.promote_types(gate.dtype, up.dtype) and y.device == gate.device
    assert_rule(y, truth, base, atol=small_atol(y.dtype, truth), what=f"swiglu_forward[{backend}]", same_dtype=True)
    if gate.dtype == torch.float32:  # a few ulp of exp and the division
        torch.testing.assert_close(y, base, rtol=4e-6, atol=1e-6)
    else:
        assert mismatch_share(y, base) <= max_share, f"swiglu_forward[{backend}] differs from torch too often"
    return y


@settings(deadline=None, max_examples=15)
@given(M=st.integers(0, 30), I=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_torch_fp64(M, I, seed):
    gate, up = swiglu_inputs(M, I, torch.float64, "cpu", seed)
    y = ck.swiglu_forward(gate, up, backend="torch")
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, reference.swiglu_forward_reference(gate, up), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,up_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                            (torch.float16, torch.float32)])
def test_torch_rounds_silu_to_gate_dtype_then_the_product(dtype, up_dtype):
    gate, up = swiglu_inputs(50, 70, dtype, "cpu", seed=4, up_dtype=up_dtype)
    silu = torch.nn.functional.silu(gate.float()).to(dtype)
    out_dtype = torch.promote_types(dtype, up_dtype)
    want = (silu.float() * up.float()).to(out_dtype)
    got = ck.swiglu_forward(gate, up, backend="torch")
    assert got.dtype == out_dtype and torch.equal(got, want)


@needs_triton
@settings(deadline=None, max_examples=15)
@given(M=st.integers(1, 30), I=st.integers(1, 300), dtype=st.sampled_from((torch.float32, torch.float16)),
       layout=st.sampled_from(("fused", "padded", "contiguous")), seed=st.integers(0, 2**16))
def test_triton(M, I, dtype, layout, seed):
    with nan_outputs():
        check_swiglu_forward("triton", *swiglu_inputs(M, I, dtype, DEVICE, seed, layout), max_share=0.02)


@needs_triton
def test_triton_edges(poison):
    """No rows, no columns, a width of one, inputs of two dtypes, and a column-strided input."""
    gate, up = swiglu_inputs(0, 24, torch.float32, DEVICE, seed=1)
    assert ck.swiglu_forward(gate, up, backend="triton").shape == (0, 24)
    empty = torch.empty(4, 0, device=DEVICE)
    assert ck.swiglu_forward(empty, empty, backend="triton").shape == (4, 0)
    check_swiglu_forward("triton", *swiglu_inputs(9, 1, torch.float32, DEVICE, seed=2))
    check_swiglu_forward("triton", *swiglu_inputs(9, 77, torch.float16, DEVICE, seed=3, up_dtype=torch.float32))
    gate, up = swiglu_inputs(40, 9, torch.float32, DEVICE, seed=5, layout="contiguous")
    check_swiglu_forward("triton", gate.t().contiguous().t(), up)  # column stride != 1


@needs_triton
def test_triton_fp64_takes_torch_under_auto_and_is_refused_explicitly():
    gate, up = swiglu_inputs(6, 10, torch.float64, DEVICE, seed=2)
    assert torch.equal(ck.swiglu_forward(gate, up), ck.swiglu_forward(gate, up, backend="torch"))
    with pytest.raises(RuntimeError, match="float64"):
        ck.swiglu_forward(gate, up, backend="triton")


def test_bad_inputs_name_the_argument():
    a = torch.randn(5, 8)
    cases = [
        (lambda: ck.swiglu_forward(a, torch.randn(5, 7)), ValueError, "up must have gate's shape"),
        (lambda: ck.swiglu_forward(a[0], a[0]), ValueError, "gate must be 2-D"),
        (lambda: ck.swiglu_forward(a, a.long()), TypeError, "up"),
        (lambda: ck.swiglu_forward(a.int(), a), TypeError, "gate"),
        (lambda: ck.swiglu_forward(a, a, backend="nope"), ValueError, "backend"),
    ]
    assert_each_raises(cases)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("I", (5632, 8960, 300))
@pytest.mark.parametrize("layout", ("fused", "padded"))
def test_gpu(poison, dtype, I, layout):
    poison_cuda_allocator()
    check_swiglu_forward("triton", *swiglu_inputs(3000, I, dtype, "cuda", seed=I, layout=layout))
