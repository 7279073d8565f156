"""``rms_norm_forward`` (torch and Triton backends) against the dense reference and each other.

The torch backend is checked in fp64 against the reference and against Hugging Face's
``LlamaRMSNorm`` (the rounding convention). The Triton backend runs under the interpreter on CPU
(fp32, fp16) and on CUDA in the ``gpu`` tests (bf16, fp16, fp32), with the rule
``max|out - ref| <= 2 max|out_torch - ref| + atol``; it equals the torch backend up to the order
of the sum of squares: a few ulp in fp32, and in 16 bits the same rounded values except for rare
elements next to a rounding boundary. Triton outputs are allocated NaN-filled.
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
    norm_case,
    poison_cuda_allocator,
    small_atol,
    triton_only,
)

import collider_kernels as ck
from collider_kernels import backends, reference

needs_triton = triton_only("rms_norm_forward")
epsilons = st.sampled_from((1e-5, 1e-6, 0.1))


def rms_case(M, H, dtype, device, seed, row_pad=0, weight_dtype=None):
    """``(x, weight)``: x (M, H) with a non-zero mean (rows strided with ``row_pad``), weight around 1."""
    _, x, w, _ = norm_case(M, H, M, "none", dtype, device, seed, row_pad, weight_dtype)
    return x, w


def check_rms_forward(backend, x, w, eps, *, max_share=0.02):
    """``rms_norm_forward`` on ``backend`` against the fp64 reference and the torch backend."""
    y = ck.rms_norm_forward(x, w, eps, backend=backend)
    base = ck.rms_norm_forward(x, w, eps, backend="torch")
    truth = reference.rms_norm_forward_reference(x.double(), w.double(), eps)
    assert y.dtype == torch.promote_types(x.dtype, w.dtype) and y.device == x.device
    assert_rule(y, truth, base, atol=small_atol(y.dtype, truth), what=f"rms_norm_forward[{backend}]", same_dtype=True)
    if x.dtype == torch.float32:  # no rounding of the normalised row: a few ulp of the sum's order
        torch.testing.assert_close(y, base, rtol=4e-6, atol=1e-6)
    else:  # the same 16-bit roundings, apart from values next to a boundary
        assert mismatch_share(y, base) <= max_share, f"rms_norm_forward[{backend}] differs from torch too often"
    return y


@settings(deadline=None, max_examples=15)
@given(M=st.integers(0, 30), H=st.integers(1, 300), eps=epsilons, seed=st.integers(0, 2**16))
def test_torch_fp64(M, H, eps, seed):
    x, w = rms_case(M, H, torch.float64, "cpu", seed)
    y = ck.rms_norm_forward(x, w, eps, backend="torch")
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, reference.rms_norm_forward_reference(x, w, eps), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
def test_torch_equals_hugging_face_llama_rms_norm(dtype, weight_dtype):
    """The torch backend rounds as ``LlamaRMSNorm`` does (bit for bit), output dtype included."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    x, w = rms_case(40, 96, dtype, "cpu", seed=3, weight_dtype=weight_dtype)
    norm = llama.LlamaRMSNorm(96, eps=1e-6).to(weight_dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        want = norm(x)
    got = ck.rms_norm_forward(x, w, 1e-6, backend="torch")
    assert got.dtype == want.dtype == torch.promote_types(dtype, weight_dtype)
    assert torch.equal(got, want)


@needs_triton
@settings(deadline=None, max_examples=15)
@given(M=st.integers(1, 30), H=st.integers(1, 300), dtype=st.sampled_from((torch.float32, torch.float16)),
       fp32_weight=st.booleans(), eps=epsilons, row_pad=st.sampled_from((0, 5)), seed=st.integers(0, 2**16))
def test_triton(M, H, dtype, fp32_weight, eps, row_pad, seed):
    x, w = rms_case(M, H, dtype, DEVICE, seed, row_pad, torch.float32 if fp32_weight else None)
    with nan_outputs():
        check_rms_forward("triton", x, w, eps, max_share=0.05)


@needs_triton
def test_triton_edges(poison):
    """No rows, a width of one, eps = 0, and a weight of another dtype than x."""
    x, w = rms_case(0, 24, torch.float32, DEVICE, seed=1)
    assert ck.rms_norm_forward(x, w, 1e-5, backend="triton").shape == (0, 24)
    check_rms_forward("triton", *rms_case(7, 1, torch.float32, DEVICE, seed=2), 1e-5)
    check_rms_forward("triton", *rms_case(9, 40, torch.float32, DEVICE, seed=3), 0.0)
    check_rms_forward("triton", *rms_case(9, 40, torch.float32, DEVICE, seed=4, weight_dtype=torch.float16), 1e-6)


@needs_triton
def test_triton_fp64_takes_torch_under_auto_and_is_refused_explicitly():
    x, w = rms_case(6, 10, torch.float64, DEVICE, seed=2)
    assert torch.equal(ck.rms_norm_forward(x, w, 1e-5), ck.rms_norm_forward(x, w, 1e-5, backend="torch"))
    with pytest.raises(RuntimeError, match="float64"):
        ck.rms_norm_forward(x.float(), w, 1e-5, backend="triton")


def test_rows_too_wide_for_the_kernel_take_torch_under_auto():
    from collider_kernels.triton.row_norms import MAX_NORM_WIDTH

    wide = torch.empty(1, MAX_NORM_WIDTH + 1)
    assert backends.auto_backend("rms_norm_forward", "cuda", (torch.float32,), (wide, wide[0], 1e-5)) == "torch"
    with pytest.raises(RuntimeError, match="wider than"):
        backends.resolve_backend("rms_norm_forward", "triton", "cuda", (torch.float32,), (wide, wide[0], 1e-5))


def test_bad_inputs_name_the_argument():
    x = torch.randn(5, 8)
    cases = [
        (lambda: ck.rms_norm_forward(x, torch.randn(7), 1e-5), ValueError, "weight"),
        (lambda: ck.rms_norm_forward(x, torch.randn(8, 1), 1e-5), ValueError, "weight"),
        (lambda: ck.rms_norm_forward(x[0], torch.randn(8), 1e-5), ValueError, "x must be 2-D"),
        (lambda: ck.rms_norm_forward(x.int(), torch.randn(8), 1e-5), TypeError, "x"),
        (lambda: ck.rms_norm_forward(x, torch.randn(8).long(), 1e-5), TypeError, "weight"),
        (lambda: ck.rms_norm_forward(x, torch.randn(8), -1.0), ValueError, "eps"),
        (lambda: ck.rms_norm_forward(x, torch.randn(8), None), ValueError, "eps"),
        (lambda: ck.rms_norm_forward(x, torch.randn(8), 1e-5, backend="nope"), ValueError, "backend"),
    ]
    assert_each_raises(cases)


def residual_case(M, H, dtype, device, seed, row_pad=0):
    """``(x, residual, weight)``: the rows of a pre-norm block's add, then norm."""
    x, w = rms_case(M, H, dtype, device, seed, row_pad)
    r, _ = rms_case(M, H, dtype, device, seed + 1, row_pad)
    return x, r, w


def check_residual_forward(backend, x, r, w, eps):
    """``(y, h)`` with a residual: h is torch's ``x + r`` exactly, y the norm of h."""
    y, h = ck.rms_norm_forward(x, w, eps, residual=r, backend=backend)
    assert torch.equal(h, x + r), f"rms_norm_forward[{backend}]: h is not x + residual"
    check_rms_forward(backend, h, w, eps, max_share=0.05)
    torch.testing.assert_close(y, ck.rms_norm_forward(h, w, eps, backend=backend), rtol=0, atol=0)


def test_torch_residual_fp64_and_hugging_face_rounding():
    """With a residual the torch backend normalises ``x + residual`` and returns the sum: in fp64
    against the reference, in bf16 bit for bit as ``h = x + r; LlamaRMSNorm(h)``."""
    x, r, w = residual_case(20, 50, torch.float64, "cpu", seed=4)
    y, h = ck.rms_norm_forward(x, w, 1e-6, residual=r, backend="torch")
    assert torch.equal(h, x + r)
    torch.testing.assert_close(y, reference.rms_norm_forward_reference(x + r, w, 1e-6), rtol=1e-12, atol=1e-12)
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    x, r, w = residual_case(40, 96, torch.bfloat16, "cpu", seed=5)
    norm = llama.LlamaRMSNorm(96, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(w)
        want = norm(x + r)
    assert torch.equal(ck.rms_norm_forward(x, w, 1e-6, residual=r, backend="torch")[0], want)


@needs_triton
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_triton_residual(poison, dtype):
    for M, H, pad in ((17, 40, 0), (5, 1, 3), (0, 24, 0)):
        check_residual_forward("triton", *residual_case(M, H, dtype, DEVICE, seed=M + H, row_pad=pad), 1e-5)


def test_bad_residual_names_the_argument():
    x, w = torch.randn(5, 8), torch.randn(8)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ck.rms_norm_forward(x, w, 1e-5, residual=torch.randn(5, 7))
    with pytest.raises(TypeError, match="residual"):
        ck.rms_norm_forward(x, w, 1e-5, residual=torch.randn(5, 8).double())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_residual(poison, dtype):
    poison_cuda_allocator()
    check_residual_forward("triton", *residual_case(3000, 2048, dtype, "cuda", seed=9, row_pad=8), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("fp32_weight", (False, True))
@pytest.mark.parametrize("H", (2048, 1536, 300))
def test_gpu(poison, dtype, fp32_weight, H):
    poison_cuda_allocator()
    x, w = rms_case(3000, H, dtype, "cuda", seed=H, row_pad=8, weight_dtype=torch.float32 if fp32_weight else None)
    check_rms_forward("triton", x, w, 1e-5, max_share=0.01)

