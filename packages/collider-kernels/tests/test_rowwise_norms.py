"""LayerNorm and GELU (tanh) backwards (torch and Triton backends) against the dense references.

The torch backend is checked in fp64 tightly; the Triton backend runs under the interpreter on CPU
(fp32, fp16) and on CUDA in the ``gpu`` tests (bf16, fp16, fp32), with the error rule
``max|out - ref| <= 2 max|out_torch - ref| + atol`` against an fp64 reference. Triton outputs are
allocated NaN-filled, so an element the kernel does not write fails the check. The tests of the
row-norm kernel shared by RMSNorm and LayerNorm run here for both norms.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import INDEX_KINDS as KINDS
from kernel_testing import (
    assert_rule,
    check_ln,
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
OPS = ("layer_norm_backward", "gelu_new_backward")

rowwise = pytest.importorskip("collider_kernels.triton.rowwise")


def gelu_case(M, F, n, kind, dtype, device, seed, row_pad=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = rand(M, F, dtype, device, gen, scale=scale, row_pad=row_pad)  # (M, F)
    idx = make_index(kind, M, n, gen, device)
    grad = rand(M if idx is None else idx.shape[0], F, dtype, device, gen, row_pad=row_pad)  # (n, F)
    return grad, x, idx


def check_gelu(backend, grad, x, idx):
    dx = ck.gelu_new_backward(grad, x, idx, backend=backend)
    ref = reference.gelu_new_backward_reference(grad.double(), x.double(), idx)
    base = ck.gelu_new_backward(grad, x, idx, backend="torch")
    assert dx.dtype == x.dtype and dx.device == x.device
    assert_rule(dx, ref, base, atol=small_atol(x.dtype, ref), what=f"gelu dx[{backend}]", same_dtype=True)
    return dx


widths = st.integers(1, 300)
row_counts = st.integers(1, 40)
kinds = st.sampled_from(KINDS)
seeds = st.integers(0, 2**16)
epsilons = st.sampled_from((1e-5, 1e-6, 0.1))


# --------------------------------------------------------------------------------- torch backend


@settings(deadline=None, max_examples=15)
@given(M=row_counts, H=widths, n=row_counts, kind=kinds, eps=epsilons, seed=seeds)
def test_layer_norm_torch_fp64(M, H, n, kind, eps, seed):
    grad, x, w, idx = norm_case(M, H, n, kind, torch.float64, "cpu", seed)
    out = ck.layer_norm_backward(grad, x, w, eps, idx, backend="torch")
    ref = reference.layer_norm_backward_reference(grad, x, w, eps, idx)
    assert all(t.dtype == torch.float64 for t in out)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-11)


@settings(deadline=None, max_examples=15)
@given(M=row_counts, F=widths, n=row_counts, kind=kinds, seed=seeds)
def test_gelu_torch_fp64(M, F, n, kind, seed):
    grad, x, idx = gelu_case(M, F, n, kind, torch.float64, "cpu", seed)
    dx = ck.gelu_new_backward(grad, x, idx, backend="torch")
    ref = reference.gelu_new_backward_reference(grad, x, idx)
    assert dx.dtype == torch.float64
    torch.testing.assert_close(dx, ref, rtol=1e-12, atol=1e-12)


def test_torch_low_precision_computes_in_fp32():
    """bf16 inputs: statistics and formula in fp32, dx rounded once to bf16, dweight/dbias fp32."""
    grad, x, w, idx = norm_case(12, 40, 7, "sorted_subset", torch.bfloat16, "cpu", seed=1)
    dx, dw, db = ck.layer_norm_backward(grad, x, w, 1e-5, idx, backend="torch")
    rdx, rdw, rdb = reference.layer_norm_backward_reference(grad.float(), x.float(), w.float(), 1e-5, idx)
    assert dx.dtype == torch.bfloat16 and dw.dtype == db.dtype == torch.float32
    torch.testing.assert_close(dx, rdx.to(torch.bfloat16), rtol=0.01, atol=0.01)
    torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, rdb, rtol=1e-6, atol=1e-6)
    grad, x, idx = gelu_case(12, 40, 7, "sorted_subset", torch.bfloat16, "cpu", seed=1)
    dx = ck.gelu_new_backward(grad, x, idx, backend="torch")
    assert dx.dtype == torch.bfloat16
    want = reference.gelu_new_backward_reference(grad.float(), x.float(), idx).to(torch.bfloat16)
    torch.testing.assert_close(dx, want, rtol=0.01, atol=0.01)


# ------------------------------------------------------------------------- Triton (interpreter)

CPU_DTYPES = st.sampled_from((torch.float32, torch.float16))


def test_triton_backend_is_registered():
    for op in OPS:
        assert "triton" in ck.available_backends(op, DEVICE)
        assert set(backends.AUTO_ORDER_CUDA_BY_OP[op]) == set(backends.BACKENDS)


@settings(deadline=None, max_examples=15)
@given(M=row_counts, H=widths, n=row_counts, kind=kinds, dtype=CPU_DTYPES, eps=epsilons,
       row_pad=st.sampled_from((0, 5)), seed=seeds)
def test_layer_norm_triton(M, H, n, kind, dtype, eps, row_pad, seed):
    with nan_outputs():
        check_ln("triton", *norm_case(M, H, n, kind, dtype, DEVICE, seed, row_pad), eps)


@settings(deadline=None, max_examples=15)
@given(M=row_counts, F=widths, n=row_counts, kind=kinds, dtype=CPU_DTYPES, row_pad=st.sampled_from((0, 3)),
       seed=seeds)
def test_gelu_triton(M, F, n, kind, dtype, row_pad, seed):
    with nan_outputs():
        check_gelu("triton", *gelu_case(M, F, n, kind, dtype, DEVICE, seed, row_pad))


# ---------------------------------------------------- the row-norm kernel of RMSNorm and LayerNorm

NORMS = {"rms": (ck.rms_norm_backward, check_rms), "ln": (ck.layer_norm_backward, check_ln)}


@pytest.mark.parametrize("norm", NORMS)
def test_norm_triton_many_programs(poison, monkeypatch, norm):
    """More rows than programs: each program loops over a run of rows; partial dweight (and dbias)
    sums add up, in the same order every call."""
    op, check = NORMS[norm]
    monkeypatch.setattr(rowwise, "num_sms", lambda device: 3)
    for kind in ("none", "sorted_subset", "repeats"):
        case = norm_case(150, 40, 97, kind, torch.float32, DEVICE, seed=11)
        check("triton", *case, 1e-5)
        first = op(*case[:3], 1e-5, case[3], backend="triton")
        again = op(*case[:3], 1e-5, case[3], backend="triton")
        assert all(torch.equal(a, b) for a, b in zip(first[1:], again[1:], strict=True)), "not deterministic"


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("sms", (1, None))
def test_norm_triton_eps_zero_partial_row_block(poison, monkeypatch, norm, sms):
    """eps = 0 with a last row block only partly filled: rows past the end must not turn the
    partial dweight (dbias) into NaN (rsqrt(0) * 0); on one program and on the default count."""
    _, check = NORMS[norm]
    if sms is not None:
        monkeypatch.setattr(rowwise, "num_sms", lambda device: sms)
    for n, kind, eps in ((11, "none", 0.0), (5, "sorted_subset", 0)):  # a float and an int zero
        out = check("triton", *norm_case(11, 24, n, kind, torch.float32, DEVICE, seed=8), eps)
        assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("norm", NORMS)
def test_norm_triton_mixed_dtypes(poison, norm):
    """fp16 activations with an fp32 weight and fp32 gradient (output of fp32 weight * fp16 xhat)."""
    case = norm_case(33, 70, 20, "sorted_subset", torch.float16, DEVICE, seed=3,
                     weight_dtype=torch.float32, grad_dtype=torch.float32)
    NORMS[norm][1]("triton", *case, 1e-6)


def test_gelu_triton_saturated_inputs(poison):
    """Large |x|: tanh saturates; no overflow or NaN, and zero/one slopes come out right."""
    for dtype in (torch.float32, torch.float16):
        for kind in ("none", "full"):
            grad, x, idx = gelu_case(16, 64, 16, kind, dtype, DEVICE, seed=6, scale=40.0)
            x[0, :4] = torch.tensor([0.0, -0.0, 300.0, -300.0], dtype=dtype)
            check_gelu("triton", grad, x, idx)


def test_triton_int32_index(poison):
    idx = torch.tensor([1, 4, 4, 9], dtype=torch.int32, device=DEVICE)
    grad, x, w, _ = norm_case(10, 17, 4, "repeats", torch.float32, DEVICE, seed=5)
    check_ln("triton", grad, x, w, idx, 1e-5)
    check_gelu("triton", grad, x, idx)


def test_triton_fp64_falls_back_to_torch():
    grad, x, w, idx = norm_case(9, 13, 4, "sorted_subset", torch.float64, DEVICE, seed=2)
    got = ck.layer_norm_backward(grad, x, w, 1e-5, idx, backend="triton")
    want = ck.layer_norm_backward(grad, x, w, 1e-5, idx, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert got[1].dtype == got[2].dtype == torch.float64
    got = ck.gelu_new_backward(grad, x, idx, backend="triton")
    assert torch.equal(got, ck.gelu_new_backward(grad, x, idx, backend="torch"))


def test_triton_empty_width(poison):
    x = torch.empty(4, 0, device=DEVICE)
    dx, dw, db = ck.layer_norm_backward(x, x, torch.empty(0, device=DEVICE), 1e-5, backend="triton")
    assert dx.shape == (4, 0) and dw.shape == db.shape == (0,)
    assert ck.gelu_new_backward(x, x, backend="triton").shape == (4, 0)


def test_triton_no_rows(poison):
    grad, x, w, idx = norm_case(6, 9, 0, "empty", torch.float32, DEVICE, seed=0)
    dx, dw, db = ck.layer_norm_backward(grad, x, w, 1e-5, idx, backend="triton")
    assert dx.shape == (0, 9) and not dw.any() and not db.any()


# ------------------------------------------------------------------------------------ bad inputs


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
        (lambda: ck.gelu_new_backward(torch.randn(3, 8), a, idx), ValueError, "grad"),
        (lambda: ck.gelu_new_backward(torch.randn(2, 8), a), ValueError, "grad"),
        (lambda: ck.gelu_new_backward(g.long(), a, idx), TypeError, "grad"),
        (lambda: ck.gelu_new_backward(g, a[0], idx), ValueError, "x"),
        (lambda: ck.gelu_new_backward(g, "x", idx), TypeError, "x"),
        (lambda: ck.gelu_new_backward(g, a, torch.tensor([0, 5])), IndexError, "index"),
        (lambda: ck.gelu_new_backward(g, a, idx.float()), TypeError, "index"),
        (lambda: ck.gelu_new_backward(g, a, idx, backend="cupy"), RuntimeError, "cupy"),
    ]
    for fn, exc, name in cases:
        with pytest.raises(exc, match=name):
            fn()


def test_validate_false_skips_the_range_check():
    a = torch.randn(5, 8)
    idx = torch.tensor([0, 4])
    ck.layer_norm_backward(torch.randn(2, 8), a, torch.randn(8), 1e-5, idx, validate=False)
    ck.gelu_new_backward(torch.randn(2, 8), a, idx, validate=False)


# ------------------------------------------------------------------------------------------- GPU

GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)



@pytest.mark.gpu
def test_gpu_auto_follows_the_order():
    for op, fn in (("layer_norm_backward", rowwise.layer_norm_backward_triton),
                   ("gelu_new_backward", rowwise.gelu_new_backward_triton)):
        first = backends.AUTO_ORDER_CUDA_BY_OP[op][0]
        got = backends.resolve_backend(op, "auto", "cuda")
        assert (got is fn) == (first == "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("H", (2048, 300, 1))
@pytest.mark.parametrize("kind", ("none", "sorted_subset", "repeats"))
def test_gpu_layer_norm(poison, dtype, H, kind):
    poison_cuda_allocator()
    check_ln("triton", *norm_case(5000, H, 3000, kind, dtype, "cuda", seed=H, row_pad=8), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("F", (8192, 300))
@pytest.mark.parametrize("kind", ("none", "sorted_subset", "repeats"))
def test_gpu_gelu(poison, dtype, F, kind):
    poison_cuda_allocator()
    check_gelu("triton", *gelu_case(3000, F, 1800, kind, dtype, "cuda", seed=F, row_pad=8))


@pytest.mark.gpu
def test_gpu_edge_index_sets(poison):
    for kind in KINDS:
        check_ln("triton", *norm_case(513, 777, 77, kind, torch.bfloat16, "cuda", seed=5), 1e-6)
        check_gelu("triton", *gelu_case(513, 777, 77, kind, torch.bfloat16, "cuda", seed=5))


@pytest.mark.gpu
@pytest.mark.parametrize("norm", NORMS)
def test_gpu_norm_mixed_and_wide(poison, norm):
    check = NORMS[norm][1]
    case = norm_case(700, 2048, 400, "sorted_subset", torch.bfloat16, "cuda", seed=9,
                     weight_dtype=torch.float32, grad_dtype=torch.float32)
    check("triton", *case, 1e-5)
    # Wider than one program's row block: the torch backend runs.
    check("triton", *norm_case(40, rowwise.MAX_RMS_WIDTH + 3, 20, "sorted_subset", torch.bfloat16, "cuda",
                               seed=1), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", NORMS)
def test_gpu_norm_partials_deterministic(norm):
    op = NORMS[norm][0]
    grad, x, w, idx = norm_case(16384, 2048, 9830, "sorted_subset", torch.bfloat16, "cuda", seed=4)
    first = op(grad, x, w, 1e-5, idx, backend="triton")
    for _ in range(3):
        again = op(grad, x, w, 1e-5, idx, backend="triton")
        assert all(torch.equal(a, b) for a, b in zip(first[1:], again[1:], strict=True))
