"""SwiGLU and RMSNorm backwards (torch and Triton backends) against the dense references.

The torch backend is checked in fp64 tightly; the Triton backend runs under the interpreter on CPU
(fp32, fp16) and on CUDA in the ``gpu`` tests (bf16, fp16, fp32), with the error rule
``max|out - ref32| <= 2 max|out_torch - ref32| + atol``. Triton outputs are allocated NaN-filled,
so an element the kernel does not write fails the check. The tests of the row-norm kernel that
RMSNorm shares with LayerNorm (row runs per program, eps = 0, mixed dtypes, determinism) are in
``test_rowwise_norms.py``, for both norms.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import INDEX_KINDS as KINDS
from kernel_testing import (
    assert_rule,
    check_rms,
    make_index,
    nan_outputs,
    norm_case,
    poison_cuda_allocator,
    rand,
    small_atol,
)

import collider_kernels as ck
from collider_kernels import backends, reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

rowwise = pytest.importorskip("collider_kernels.triton.rowwise")


def swiglu_case(M, I, n, kind, dtype, device, seed, row_pad=0):
    gen = torch.Generator().manual_seed(seed)
    gate = rand(M, I, dtype, device, gen, scale=3.0, row_pad=row_pad)  # (M, I)
    up = rand(M, I, dtype, device, gen, row_pad=row_pad)
    idx = make_index(kind, M, n, gen, device)
    grad = rand(M if idx is None else idx.shape[0], I, dtype, device, gen, row_pad=row_pad)  # (n, I)
    return grad, gate, up, idx


def check_swiglu(backend, grad, gate, up, idx):
    dgate, dup = ck.swiglu_backward(grad, gate, up, idx, backend=backend)
    ref = reference.swiglu_backward_reference(grad.float(), gate.float(), up.float(), idx)
    base = ck.swiglu_backward(grad, gate, up, idx, backend="torch")
    for name, out, r, b in zip(("dgate", "dup"), (dgate, dup), ref, base, strict=True):
        assert out.dtype == gate.dtype and out.device == gate.device
        assert_rule(out, r, b, atol=small_atol(gate.dtype, r), what=f"swiglu {name}[{backend}]", same_dtype=True)


widths = st.integers(1, 300)
row_counts = st.integers(1, 40)
kinds = st.sampled_from(KINDS)
seeds = st.integers(0, 2**16)
epsilons = st.sampled_from((1e-5, 1e-6, 0.1))


# --------------------------------------------------------------------------------- torch backend


@settings(deadline=None, max_examples=15)
@given(M=row_counts, I=widths, n=row_counts, kind=kinds, seed=seeds)
def test_swiglu_torch_fp64(M, I, n, kind, seed):
    grad, gate, up, idx = swiglu_case(M, I, n, kind, torch.float64, "cpu", seed)
    dgate, dup = ck.swiglu_backward(grad, gate, up, idx, backend="torch")
    ref = reference.swiglu_backward_reference(grad, gate, up, idx)
    assert dgate.dtype == dup.dtype == torch.float64
    torch.testing.assert_close(dgate, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dup, ref[1], rtol=1e-12, atol=1e-12)


@settings(deadline=None, max_examples=15)
@given(M=row_counts, H=widths, n=row_counts, kind=kinds, eps=epsilons, seed=seeds)
def test_rms_norm_torch_fp64(M, H, n, kind, eps, seed):
    grad, x, w, idx = norm_case(M, H, n, kind, torch.float64, "cpu", seed)
    dx, dw = ck.rms_norm_backward(grad, x, w, eps, idx, backend="torch")
    ref_dx, ref_dw = reference.rms_norm_backward_reference(grad, x, w, eps, idx)
    assert dx.dtype == dw.dtype == torch.float64
    torch.testing.assert_close(dx, ref_dx, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-10, atol=1e-11)


def test_rms_norm_torch_casts_xhat_for_dweight():
    """dweight uses the normalised row after the forward's cast to x's dtype (the layer convention)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=gen).to(torch.bfloat16)
    g = torch.randn(6, 10, generator=gen)
    w = torch.randn(10, generator=gen)
    _, dw = ck.rms_norm_backward(g, x, w, 1e-6, backend="torch")
    x32 = x.float()
    xhat = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16).float()
    torch.testing.assert_close(dw, (g * xhat).sum(0), rtol=0, atol=0)


# ------------------------------------------------------------------------- Triton (interpreter)

CPU_DTYPES = st.sampled_from((torch.float32, torch.float16))


def test_triton_backend_is_registered():
    for op in ("swiglu_backward", "rms_norm_backward"):
        assert "triton" in ck.available_backends(op, DEVICE)
        assert backends.AUTO_ORDER_CUDA_BY_OP[op][0] == "triton"


@settings(deadline=None, max_examples=15)
@given(M=row_counts, I=widths, n=row_counts, kind=kinds, dtype=CPU_DTYPES, row_pad=st.sampled_from((0, 3)),
       seed=seeds)
def test_swiglu_triton(M, I, n, kind, dtype, row_pad, seed):
    with nan_outputs():
        check_swiglu("triton", *swiglu_case(M, I, n, kind, dtype, DEVICE, seed, row_pad))


@settings(deadline=None, max_examples=15)
@given(M=row_counts, H=widths, n=row_counts, kind=kinds, dtype=CPU_DTYPES, eps=epsilons,
       row_pad=st.sampled_from((0, 5)), seed=seeds)
def test_rms_norm_triton(M, H, n, kind, dtype, eps, row_pad, seed):
    with nan_outputs():
        check_rms("triton", *norm_case(M, H, n, kind, dtype, DEVICE, seed, row_pad), eps)


def test_triton_int32_index(poison):
    gen = torch.Generator().manual_seed(5)
    idx = torch.tensor([1, 4, 4, 9], dtype=torch.int32, device=DEVICE)
    grad, gate, up, _ = swiglu_case(10, 17, 4, "repeats", torch.float32, DEVICE, seed=5)
    check_swiglu("triton", grad, gate, up, idx)
    x = rand(10, 17, torch.float32, DEVICE, gen)
    w = rand(1, 17, torch.float32, DEVICE, gen)[0]
    check_rms("triton", grad, x, w, idx, 1e-5)


def test_triton_fp64_falls_back_to_torch():
    grad, gate, up, idx = swiglu_case(9, 13, 4, "sorted_subset", torch.float64, DEVICE, seed=2)
    got = ck.swiglu_backward(grad, gate, up, idx, backend="triton")
    want = ck.swiglu_backward(grad, gate, up, idx, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    grad, x, w, idx = norm_case(9, 13, 4, "sorted_subset", torch.float64, DEVICE, seed=2)
    got = ck.rms_norm_backward(grad, x, w, 1e-5, idx, backend="triton")
    want = ck.rms_norm_backward(grad, x, w, 1e-5, idx, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert got[1].dtype == torch.float64


def test_triton_empty_width(poison):
    gate = torch.empty(4, 0, device=DEVICE)
    dgate, dup = ck.swiglu_backward(torch.empty(4, 0, device=DEVICE), gate, gate, backend="triton")
    assert dgate.shape == dup.shape == (4, 0)
    dx, dw = ck.rms_norm_backward(torch.empty(4, 0, device=DEVICE), gate, torch.empty(0, device=DEVICE), 1e-5,
                                  backend="triton")
    assert dx.shape == (4, 0) and dw.shape == (0,)


# ------------------------------------------------------------------------------------ bad inputs


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
    for fn, exc, name in cases:
        with pytest.raises(exc, match=name):
            fn()


def test_validate_false_skips_the_range_check():
    a = torch.randn(5, 8)
    idx = torch.tensor([0, 4])
    ck.swiglu_backward(torch.randn(2, 8), a, a, idx, validate=False)
    ck.rms_norm_backward(torch.randn(2, 8), a, torch.randn(8), 1e-5, idx, validate=False)


# ------------------------------------------------------------------------------------------- GPU

GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)



@pytest.mark.gpu
def test_gpu_auto_picks_triton():
    assert backends.resolve_backend("swiglu_backward", "auto", "cuda") is rowwise.swiglu_backward_triton
    assert backends.resolve_backend("rms_norm_backward", "auto", "cuda") is rowwise.rms_norm_backward_triton


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("I", (5632, 8960, 300))
@pytest.mark.parametrize("kind", ("none", "sorted_subset", "repeats"))
def test_gpu_swiglu(poison, dtype, I, kind):
    poison_cuda_allocator()
    check_swiglu("triton", *swiglu_case(3000, I, 1800, kind, dtype, "cuda", seed=I, row_pad=8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("H", (2048, 1536, 300, 1))
@pytest.mark.parametrize("kind", ("none", "sorted_subset", "repeats"))
def test_gpu_rms_norm(poison, dtype, H, kind):
    poison_cuda_allocator()
    check_rms("triton", *norm_case(5000, H, 3000, kind, dtype, "cuda", seed=H, row_pad=8), 1e-5)


@pytest.mark.gpu
def test_gpu_edge_index_sets(poison):
    for kind in KINDS:
        check_swiglu("triton", *swiglu_case(513, 777, 77, kind, torch.bfloat16, "cuda", seed=5))
        check_rms("triton", *norm_case(513, 777, 77, kind, torch.bfloat16, "cuda", seed=5), 1e-6)
