"""``gather_matmul`` (``x[index] @ weightᵀ (+ bias)``): every backend against the dense reference.

The torch backend runs on CPU (fp32/bf16, and fp64 exactly); the Triton backend under the
interpreter on CPU (fp32, fp16) and on CUDA in the ``gpu`` tests (bf16, fp16, fp32), both kernel
families; CuPy on CUDA. The rule: ``max|out - ref32| <= 2 max|out_torch - ref32| + atol``.
"""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DEVICE, GPU_DTYPES, only_gemm_family, poison_cuda_allocator, triton_only

import collider_kernels as ck
from collider_kernels import reference

KINDS = st.sampled_from(("none", "sorted_subset", "repeats", "empty", "full", "single"))
GPU_SHAPES = [(300, 200, 260, 170), (2049, 1024, 768, 1300), (4096, 2048, 256, 2500)]  # (M, K, N, n)


# --------------------------------------------------------------------------------- torch backend


@settings(deadline=None, max_examples=25)
@given(M=st.integers(1, 40), K=st.integers(1, 40), N=st.integers(1, 40), n=st.integers(1, 40), kind=KINDS,
       has_bias=st.booleans(), row_pad=st.sampled_from((0, 3)), dtype=st.sampled_from((torch.float32, torch.bfloat16)),
       seed=st.integers(0, 2**16))
def test_torch(kc, M, K, N, n, kind, has_bias, row_pad, dtype, seed):
    kc.gather_matmul("torch", M=M, K=K, N=N, n=n, kind=kind, has_bias=has_bias, row_pad=row_pad,
                     dtype=dtype, device="cpu", seed=seed)


@settings(deadline=None, max_examples=25)
@given(M=st.integers(1, 40), K=st.integers(1, 40), N=st.integers(1, 40), n=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_torch_fp64(M, K, N, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    w = torch.randn(N, K, generator=gen, dtype=torch.float64)
    b = torch.randn(N, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, M, (n,), generator=gen)
    torch.testing.assert_close(ck.gather_matmul(x, idx, w, b, backend="torch"),
                               reference.gather_matmul_reference(x, idx, w, b))


def test_bad_inputs_name_the_argument():
    x, w, idx = torch.randn(6, 4), torch.randn(3, 4), torch.tensor([0, 5, 2])
    with pytest.raises(TypeError, match="weight"):
        ck.gather_matmul(x, idx, w.double())
    with pytest.raises(TypeError, match="x"):
        ck.gather_matmul(x.int(), idx, w.int())
    with pytest.raises(ValueError, match="weight"):
        ck.gather_matmul(x, idx, torch.randn(3, 5))
    with pytest.raises(ValueError, match="bias"):
        ck.gather_matmul(x, idx, w, torch.randn(4))
    with pytest.raises(IndexError, match="index"):
        ck.gather_matmul(x, torch.tensor([0, 6]), w)
    with pytest.raises(IndexError, match="index"):
        ck.gather_matmul(x, torch.tensor([-1]), w)
    with pytest.raises(TypeError, match="index"):
        ck.gather_matmul(x, idx.float(), w)
    with pytest.raises(ValueError, match="x"):
        ck.gather_matmul(x[None], idx, w)


# ------------------------------------------------------------------------------------ Triton

needs_triton = triton_only("gather_matmul")
aligned = st.integers(1, 9).map(lambda v: 8 * v)  # fp16 rows of 16-byte multiples: descriptor kernels


@needs_triton
@settings(deadline=None, max_examples=25)
@given(M=st.integers(1, 70), K=st.integers(1, 70), N=st.integers(1, 70), n=st.integers(1, 70), kind=KINDS,
       has_bias=st.booleans(), row_pad=st.sampled_from((0, 3)), dtype=st.sampled_from((torch.float32, torch.float16)),
       seed=st.integers(0, 2**16))
def test_triton(kc, M, K, N, n, kind, has_bias, row_pad, dtype, seed):
    kc.gather_matmul("triton", M=M, K=K, N=N, n=n, kind=kind, has_bias=has_bias, row_pad=row_pad,
                     dtype=dtype, device=DEVICE, seed=seed)


@needs_triton
@settings(deadline=None, max_examples=20)
@given(M=st.integers(1, 70), K=aligned, N=st.integers(1, 70), n=st.integers(1, 70), kind=KINDS,
       has_bias=st.booleans(), row_pad=st.sampled_from((0, 3)), seed=st.integers(0, 2**16))
def test_triton_descriptor_kernel(kc, M, K, N, n, kind, has_bias, row_pad, seed):
    """Aligned fp16 weights take the descriptor kernel (any row stride of x, ragged N and n)."""
    with only_gemm_family("desc"):
        kc.gather_matmul("triton", M=M, K=K, N=N, n=n, kind=kind, has_bias=has_bias, row_pad=row_pad,
                         dtype=torch.float16, device=DEVICE, seed=seed)


@needs_triton
def test_triton_descriptor_persistent_tiles(kc):
    """Several tiles per program (persistent loop)."""
    with only_gemm_family("desc"):
        kc.gather_matmul("triton", M=300, K=40, N=72, n=250, kind="repeats", has_bias=True, row_pad=0,
                         dtype=torch.float16, device=DEVICE, seed=3)


@needs_triton
def test_triton_pointer_kernel_for_unaligned_rows(kc):
    with only_gemm_family("pointer"):
        kc.gather_matmul("triton", M=50, K=21, N=33, n=40, kind="sorted_subset", has_bias=True, row_pad=0,
                         dtype=torch.float16, device=DEVICE, seed=4)


@needs_triton
def test_triton_candidates_are_public():
    from collider_kernels import tuning

    both = tuning.candidates("gather_matmul", 512)
    assert both and {c["DESC"] for c in both} == {True, False}
    assert all(c["DESC"] for c in tuning.candidates("gather_matmul", 512, pointer=False))
    assert not any(c["DESC"] for c in tuning.candidates("gather_matmul", 512, desc=False))


@needs_triton
def test_triton_fp64_goes_to_torch_under_auto_and_is_refused_explicitly():
    x = torch.randn(9, 7, dtype=torch.float64, device=DEVICE)
    w = torch.randn(5, 7, dtype=torch.float64, device=DEVICE)
    idx = torch.tensor([0, 8, 3], device=DEVICE)
    torch.testing.assert_close(ck.gather_matmul(x, idx, w), x[idx] @ w.t())
    with pytest.raises(RuntimeError, match="float64"):
        ck.gather_matmul(x, idx, w, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("kind", ("sorted_subset", "repeats", "none"))
def test_gpu_triton(kc, dtype, shape, kind):
    M, K, N, n = shape
    for has_bias in (False, True):
        poison_cuda_allocator()
        kc.gather_matmul("triton", M=M, K=K, N=N, n=n, kind=kind, has_bias=has_bias, row_pad=8,
                         dtype=dtype, device="cuda", seed=M + N)


@pytest.mark.gpu
def test_gpu_triton_edge_index_sets(kc):
    for kind in kc.INDEX_KINDS:
        kc.gather_matmul("triton", M=513, K=320, N=130, n=77, kind=kind, has_bias=True, row_pad=0,
                         dtype=torch.bfloat16, device="cuda", seed=5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(5000, 2048, 256, 3001), (700, 1536, 1000, 555), (3000, 512, 264, 2900)])
def test_gpu_triton_descriptor_kernel(kc, shape):
    """bf16 with aligned rows: the descriptor kernel (narrow outputs may take the pointer kernel)."""
    M, K, N, n = shape
    with only_gemm_family("desc") if N > 256 else contextlib.nullcontext():
        poison_cuda_allocator()
        kc.gather_matmul("triton", M=M, K=K, N=N, n=n, kind="sorted_subset", has_bias=True, row_pad=0,
                         dtype=torch.bfloat16, device="cuda", seed=M)


# -------------------------------------------------------------------------------------- CuPy

cupy_only = pytest.mark.skipif("cupy" not in ck.available_backends("gather_matmul", "cuda"),
                               reason="CuPy is not installed")


@pytest.mark.gpu
@cupy_only
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [*GPU_SHAPES, (37, 9, 5, 11)])
@pytest.mark.parametrize("kind", ("sorted_subset", "repeats", "none"))
def test_gpu_cupy(kc, dtype, shape, kind):
    M, K, N, n = shape
    for has_bias in (False, True):
        for row_pad in (0, 3):
            poison_cuda_allocator()
            kc.gather_matmul("cupy", M=M, K=K, N=N, n=n, kind=kind, has_bias=has_bias,
                             row_pad=row_pad, dtype=dtype, device="cuda", seed=M + K)


@pytest.mark.gpu
@cupy_only
@pytest.mark.parametrize("kind", ("empty", "full", "single", "none"))
def test_gpu_cupy_edge_index_sets(kc, kind):
    kc.gather_matmul("cupy", M=129, K=64, N=70, n=5, kind=kind, has_bias=True, row_pad=0,
                     dtype=torch.bfloat16, device="cuda", seed=2)


@pytest.mark.gpu
@cupy_only
def test_gpu_cupy_runs_on_torch_current_stream():
    """Work is ordered on PyTorch's current stream, also a non-default one."""
    s = torch.cuda.Stream()
    x = torch.randn(4000, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    idx = torch.randperm(4000, device="cuda")[:3000]
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        x2 = x * 2  # queued on s; the op must see it without a sync
        y = ck.gather_matmul(x2, idx, w, backend="cupy", validate=False)
    s.synchronize()
    ref = ck.gather_matmul(x * 2, idx, w, backend="torch")
    assert (y.float() - ref.float()).abs().max().item() <= 0.05 * ref.float().abs().max().item()
