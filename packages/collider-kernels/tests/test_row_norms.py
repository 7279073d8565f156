"""The Triton kernel RMSNorm and LayerNorm share (``collider_kernels.triton.row_norms``), for both
norms: row runs per program, eps = 0, mixed dtypes, edge shapes, fp64 and rows too wide for it,
determinism of the parameter sums. Outputs are NaN-filled (``poison``)."""

import pytest
import torch
from kernel_testing import INDEX_KINDS as KINDS
from kernel_testing import check_ln, check_rms, norm_case

import collider_kernels as ck

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NORMS = {"rms": (ck.rms_norm_backward, check_rms), "ln": (ck.layer_norm_backward, check_ln)}

pytestmark = pytest.mark.skipif("triton" not in ck.available_backends("rms_norm_backward", DEVICE),
                                reason="the Triton backend is not available here")


@pytest.mark.parametrize("norm", NORMS)
def test_many_programs(poison, monkeypatch, norm):
    """More rows than programs: each program loops over a run of rows; partial dweight (and dbias)
    sums add up, in the same order every call."""
    from collider_kernels.triton import settings

    op, check = NORMS[norm]
    monkeypatch.setattr(settings, "num_sms", lambda device: 3)
    for kind in ("none", "sorted_subset", "repeats"):
        case = norm_case(150, 40, 97, kind, torch.float32, DEVICE, seed=11)
        check("triton", *case, 1e-5)
        first = op(*case[:3], 1e-5, case[3], backend="triton")
        again = op(*case[:3], 1e-5, case[3], backend="triton")
        assert all(torch.equal(a, b) for a, b in zip(first[1:], again[1:], strict=True)), "not deterministic"


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("sms", (1, None))
def test_eps_zero_partial_row_block(poison, monkeypatch, norm, sms):
    """eps = 0 with a last row block only partly filled: rows past the end must not turn the
    partial dweight (dbias) into NaN (rsqrt(0) * 0); on one program and on the default count."""
    from collider_kernels.triton import settings

    _, check = NORMS[norm]
    if sms is not None:
        monkeypatch.setattr(settings, "num_sms", lambda device: sms)
    for n, kind, eps in ((11, "none", 0.0), (5, "sorted_subset", 0)):  # a float and an int zero
        out = check("triton", *norm_case(11, 24, n, kind, torch.float32, DEVICE, seed=8), eps)
        assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("norm", NORMS)
def test_mixed_dtypes(poison, norm):
    """fp16 activations with an fp32 weight and fp32 gradient (output of fp32 weight * fp16 xhat)."""
    case = norm_case(33, 70, 20, "sorted_subset", torch.float16, DEVICE, seed=3,
                     weight_dtype=torch.float32, grad_dtype=torch.float32)
    NORMS[norm][1]("triton", *case, 1e-6)


@pytest.mark.parametrize("norm", NORMS)
def test_int32_index_empty_width_and_no_rows(poison, norm):
    op, check = NORMS[norm]
    grad, x, w, _ = norm_case(10, 17, 4, "repeats", torch.float32, DEVICE, seed=5)
    check("triton", grad, x, w, torch.tensor([1, 4, 4, 9], dtype=torch.int32, device=DEVICE), 1e-5)
    empty = torch.empty(4, 0, device=DEVICE)
    out = op(empty, empty, torch.empty(0, device=DEVICE), 1e-5, backend="triton")
    assert out[0].shape == (4, 0) and all(t.shape == (0,) for t in out[1:])
    grad, x, w, idx = norm_case(6, 9, 0, "empty", torch.float32, DEVICE, seed=0)
    out = op(grad, x, w, 1e-5, idx, backend="triton")
    assert out[0].shape == (0, 9) and not any(t.any() for t in out[1:])


@pytest.mark.parametrize("norm", NORMS)
def test_fp64_and_wide_rows_take_torch_under_auto_and_are_refused_explicitly(norm):
    from collider_kernels import backends
    from collider_kernels.triton.row_norms import MAX_NORM_WIDTH

    op, _ = NORMS[norm]
    grad, x, w, idx = norm_case(9, 13, 4, "sorted_subset", torch.float64, DEVICE, seed=2)
    got = op(grad, x, w, 1e-5, idx)
    want = op(grad, x, w, 1e-5, idx, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert all(t.dtype == torch.float64 for t in got)
    with pytest.raises(RuntimeError, match="float64"):
        op(grad, x, w, 1e-5, idx, backend="triton")
    name = op.__name__
    wide = torch.empty(2, MAX_NORM_WIDTH + 1)
    args = (wide, wide, wide[0], 1e-5, None)
    assert backends.auto_backend(name, "cuda", (torch.float32,), args) == "torch"
    with pytest.raises(RuntimeError, match=f"wider than {MAX_NORM_WIDTH}"):
        backends.resolve_backend(name, "triton", DEVICE, (torch.float32,), args)


@pytest.mark.gpu
def test_gpu_edge_index_sets(poison):
    for kind in KINDS:
        check_rms("triton", *norm_case(513, 777, 77, kind, torch.bfloat16, "cuda", seed=5), 1e-6)
        check_ln("triton", *norm_case(513, 777, 77, kind, torch.bfloat16, "cuda", seed=5), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", NORMS)
def test_gpu_mixed_and_wide(poison, norm):
    from collider_kernels.triton.row_norms import MAX_NORM_WIDTH

    check = NORMS[norm][1]
    case = norm_case(700, 2048, 400, "sorted_subset", torch.bfloat16, "cuda", seed=9,
                     weight_dtype=torch.float32, grad_dtype=torch.float32)
    check("triton", *case, 1e-5)
    # Wider than one program's row: backend="auto" takes the torch backend.
    check("auto", *norm_case(40, MAX_NORM_WIDTH + 3, 20, "sorted_subset", torch.bfloat16, "cuda", seed=1), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", NORMS)
def test_gpu_partials_deterministic(norm):
    op = NORMS[norm][0]
    grad, x, w, idx = norm_case(16384, 2048, 9830, "sorted_subset", torch.bfloat16, "cuda", seed=4)
    first = op(grad, x, w, 1e-5, idx, backend="triton")
    for _ in range(3):
        again = op(grad, x, w, 1e-5, idx, backend="triton")
        assert all(torch.equal(a, b) for a, b in zip(first[1:], again[1:], strict=True))


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 70, 45), (1, 257, 33), (2, 3, 100)])
def test_sum_parts_sums_over_programs(shape):
    """The second pass: (sums, programs, H) partials summed over programs, every column written,
    in the same order every call (sizes not multiples of its blocks)."""
    from collider_kernels.triton.row_norms import sum_parts

    gen = torch.Generator().manual_seed(sum(shape))
    part = torch.randn(shape, generator=gen).to(DEVICE)
    got = sum_parts(part)
    assert got.shape == (shape[0], shape[2]) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), part.double().sum(1), rtol=1e-6, atol=1e-5)
    assert torch.equal(got, sum_parts(part)), "not deterministic"
