"""CuPy backend (CUDA only) of the GEMM/scatter ops against the dense references."""

import pytest
import torch
from kernel_testing import poison_cuda_allocator

import collider_kernels as ck

if not torch.cuda.is_available():
    pytest.skip("the CuPy backend needs a CUDA GPU; none is available here", allow_module_level=True)
pytest.importorskip("cupy", reason="CuPy is not installed")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = [(300, 200, 260, 170), (2049, 1024, 768, 1300), (4096, 2048, 256, 2500), (37, 9, 5, 11)]



pytestmark = pytest.mark.gpu


def test_cupy_backend_is_registered():
    for op in ("gather_matmul", "gathered_weight_grad", "scatter_add_rows"):
        assert "cupy" in ck.available_backends(op, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ("sorted_subset", "repeats", "none"))
def test_gather_matmul(kc, dtype, shape, kind):
    M, K, N, n = shape
    for has_bias in (False, True):
        for row_pad in (0, 3):
            poison_cuda_allocator()
            kc.gather_matmul("cupy", M=M, K=K, N=N, n=n, kind=kind, has_bias=has_bias,
                             row_pad=row_pad, dtype=dtype, device="cuda", seed=M + K)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_dtype", (None, torch.float32, torch.float16))
def test_gathered_weight_grad(kc, dtype, shape, out_dtype):
    M, K, N, n = shape
    poison_cuda_allocator()
    kc.weight_grad("cupy", M=M, K=K, N=N, n=n, kind="repeats", row_pad=8, dtype=dtype,
                   device="cuda", seed=N, out_dtype=out_dtype)


@pytest.mark.parametrize("kind", ("empty", "full", "single", "none"))
def test_edge_index_sets(kc, kind):
    kc.gather_matmul("cupy", M=129, K=64, N=70, n=5, kind=kind, has_bias=True, row_pad=0,
                     dtype=torch.bfloat16, device="cuda", seed=2)
    kc.weight_grad("cupy", M=129, K=64, N=70, n=5, kind=kind, row_pad=0, dtype=torch.bfloat16,
                   device="cuda", seed=2, out_dtype=torch.float32)


@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_scatter_add_rows(kc, src_dtype, out_dtype):
    for deterministic in (False, True):
        kc.scatter("cupy", n=3000, R=200, F=1000, deterministic=deterministic, src_dtype=src_dtype,
                   out_dtype=out_dtype, device="cuda", seed=4, row_pad=5)


def test_runs_on_torch_current_stream(kc):
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
