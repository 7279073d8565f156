"""``rms_norm_backward`` (torch and Triton backends) against the dense reference.

The torch backend is checked in fp64 tightly; the Triton backend runs under the interpreter on CPU
(fp32, fp16) and on CUDA in the ``gpu`` tests (bf16, fp16, fp32), with the error rule
``max|out - ref32| <= 2 max|out_torch - ref32| + atol``. The tests of the kernel RMSNorm shares
with LayerNorm (row runs per program, eps = 0, mixed dtypes, determinism) are in
``test_row_norms.py``, for both norms.
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
    check_rms,
    nan_outputs,
    norm_case,
    poison_cuda_allocator,
    small_atol,
    triton_only,
)
from kernel_testing import INDEX_KINDS as KINDS

import collider_kernels as ck
from collider_kernels import reference

needs_triton = triton_only("rms_norm_backward")
widths, row_counts, epsilons = st.integers(1, 300), st.integers(1, 40), st.sampled_from((1e-5, 1e-6, 0.1))


@settings(deadline=None, max_examples=15)
@given(M=row_counts, H=widths, n=row_counts, kind=st.sampled_from(KINDS), eps=epsilons, seed=st.integers(0, 2**16))
def test_torch_fp64(M, H, n, kind, eps, seed):
    grad, x, w, idx = norm_case(M, H, n, kind, torch.float64, "cpu", seed)
    dx, dw = ck.rms_norm_backward(grad, x, w, eps, idx, backend="torch")
    ref_dx, ref_dw = reference.rms_norm_backward_reference(grad, x, w, eps, idx)
    assert dx.dtype == dw.dtype == torch.float64
    torch.testing.assert_close(dx, ref_dx, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-10, atol=1e-11)


def test_torch_casts_xhat_for_dweight():
    """dweight uses the normalised row after the forward's cast to x's dtype (the layer convention)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=gen).to(torch.bfloat16)
    g = torch.randn(6, 10, generator=gen)
    w = torch.randn(10, generator=gen)
    _, dw = ck.rms_norm_backward(g, x, w, 1e-6, backend="torch")
    x32 = x.float()
    xhat = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16).float()
    torch.testing.assert_close(dw, (g * xhat).sum(0), rtol=0, atol=0)


@needs_triton
@settings(deadline=None, max_examples=15)
@given(M=row_counts, H=widths, n=row_counts, kind=st.sampled_from(KINDS),
       dtype=st.sampled_from((torch.float32, torch.float16)), eps=epsilons, row_pad=st.sampled_from((0, 5)),
       seed=st.integers(0, 2**16))
def test_triton(M, H, n, kind, dtype, eps, row_pad, seed):
    with nan_outputs():
        check_rms("triton", *norm_case(M, H, n, kind, dtype, DEVICE, seed, row_pad), eps)


def test_bad_inputs_name_the_argument():
    a = torch.randn(5, 8)
    idx = torch.tensor([0, 4])
    cases = [
        (lambda: ck.rms_norm_backward(torch.randn(2, 8), a, torch.randn(7), 1e-5, idx), ValueError, "weight"),
        (lambda: ck.rms_norm_backward(torch.randn(2, 8), a, torch.randn(8, 1), 1e-5, idx), ValueError, "weight"),
        (lambda: ck.rms_norm_backward(torch.randn(2, 7), a, torch.randn(8), 1e-5, idx), ValueError, "grad"),
        (lambda: ck.rms_norm_backward(torch.randn(2, 8), a.int(), torch.randn(8), 1e-5, idx), TypeError, "x"),
        (lambda: ck.rms_norm_backward(torch.randn(2, 8), a, torch.randn(8), -1.0, idx), ValueError, "eps"),
        (lambda: ck.rms_norm_backward(torch.randn(2, 8), a, torch.randn(8), 1e-5, torch.tensor([-1, 0])),
         IndexError, "index"),
        (lambda: ck.rms_norm_backward(torch.randn(2, 8), a, torch.randn(8), 1e-5, idx[:, None]), ValueError,
         "index"),
    ]
    assert_each_raises(cases)
    ck.rms_norm_backward(torch.randn(2, 8), a, torch.randn(8), 1e-5, idx, validate=False)  # no range check


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("H", (2048, 1536, 300, 1))
@pytest.mark.parametrize("kind", ("none", "sorted_subset", "repeats"))
def test_gpu(poison, dtype, H, kind):
    poison_cuda_allocator()
    check_rms("triton", *norm_case(5000, H, 3000, kind, dtype, "cuda", seed=H, row_pad=8), 1e-5)


def check_residual_grad(backend, grad, x, w, idx, eps, residual_grad):
    """dx with ``residual_grad`` added is the fp32 reference's dx plus it, within the rule; dweight
    is unchanged."""
    dx, dw = ck.rms_norm_backward(grad, x, w, eps, idx, residual_grad=residual_grad, backend=backend)
    base_dx, _ = ck.rms_norm_backward(grad, x, w, eps, idx, residual_grad=residual_grad, backend="torch")
    ref_dx, _ = reference.rms_norm_backward_reference(grad.float(), x.float(), w.float(), eps, idx)
    truth = ref_dx + residual_grad.float()
    assert dx.dtype == x.dtype
    assert_rule(dx, truth, base_dx, atol=small_atol(x.dtype, truth, x.shape[1]), what=f"rms dx+res[{backend}]",
                same_dtype=True)
    torch.testing.assert_close(dw, ck.rms_norm_backward(grad, x, w, eps, idx, backend=backend)[1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ("none", "sorted_subset"))
def test_residual_grad_torch_fp64(kind):
    grad, x, w, idx = norm_case(30, 40, 12 if kind != "none" else 30, kind, torch.float64, "cpu", seed=3)
    res = torch.randn_like(grad)
    dx, _ = ck.rms_norm_backward(grad, x, w, 1e-6, idx, residual_grad=res, backend="torch")
    ref_dx, _ = reference.rms_norm_backward_reference(grad, x, w, 1e-6, idx)
    torch.testing.assert_close(dx, ref_dx + res, rtol=1e-12, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("kind", ("none", "sorted_subset"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_residual_grad_triton(poison, kind, dtype):
    grad, x, w, idx = norm_case(60, 48, 60 if kind == "none" else 25, kind, dtype, DEVICE, seed=5)
    check_residual_grad("triton", grad, x, w, idx, 1e-5, torch.randn(grad.shape, device=DEVICE).to(dtype))


def test_bad_residual_grad_names_the_argument():
    grad, x, w, _ = norm_case(6, 8, 6, "none", torch.float32, "cpu", seed=1)
    with pytest.raises(ValueError, match="residual_grad must have grad's shape"):
        ck.rms_norm_backward(grad, x, w, 1e-5, residual_grad=torch.randn(6, 7))
    with pytest.raises(TypeError, match="residual_grad"):
        ck.rms_norm_backward(grad, x, w, 1e-5, residual_grad=torch.ones(6, 8, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("kind", ("none", "sorted_subset"))
def test_gpu_residual_grad(poison, dtype, kind):
    poison_cuda_allocator()
    grad, x, w, idx = norm_case(4000, 2048, 4000 if kind == "none" else 2400, kind, dtype, "cuda", seed=7)
    check_residual_grad("triton", grad, x, w, idx, 1e-5, torch.randn(grad.shape, device="cuda").to(dtype))
