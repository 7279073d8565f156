"""``scatter_add_rows`` (``out[index[i]] += src[i]``, the embedding gradient): every backend against
the dense reference, deterministic (fixed summation order) and not.

The torch backend runs on CPU; the Triton backend under the interpreter on CPU (fp32, fp16) and on
CUDA in the ``gpu`` tests; CuPy on CUDA.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import collider_kernels as ck
from collider_kernels import reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CPU_DTYPES = (torch.float32, torch.float16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@settings(deadline=None, max_examples=20)
@given(n=st.integers(0, 50), R=st.integers(1, 10), F=st.integers(1, 30), deterministic=st.booleans(),
       seed=st.integers(0, 2**16))
def test_torch(kc, n, R, F, deterministic, seed):
    kc.scatter("torch", n=n, R=R, F=F, deterministic=deterministic, src_dtype=torch.float32,
               out_dtype=torch.float32, device="cpu", seed=seed)


@settings(deadline=None, max_examples=25)
@given(M=st.integers(1, 40), N=st.integers(1, 40), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_torch_fp64(M, N, n, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, N, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, M, (n,), generator=gen)
    torch.testing.assert_close(ck.scatter_add_rows(g, idx, M, backend="torch"),
                               reference.scatter_add_rows_reference(g, idx, M))


def test_bad_inputs_name_the_argument():
    src = torch.randn(3, 4)
    with pytest.raises(ValueError, match="num_rows or out"):
        ck.scatter_add_rows(src, torch.tensor([0, 1, 1]))
    with pytest.raises(IndexError, match="index"):
        ck.scatter_add_rows(src, torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="index"):
        ck.scatter_add_rows(src, torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="out"):
        ck.scatter_add_rows(src, torch.tensor([0, 1, 1]), out=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="src"):
        ck.scatter_add_rows(src.long(), torch.tensor([0, 1, 1]), 2)


@pytest.mark.skipif("triton" not in ck.available_backends("scatter_add_rows", DEVICE),
                    reason="the Triton backend is not available here")
@settings(deadline=None, max_examples=25)
@given(n=st.integers(0, 60), R=st.integers(1, 12), F=st.integers(1, 90), deterministic=st.booleans(),
       src_dtype=st.sampled_from(CPU_DTYPES), out_dtype=st.sampled_from(CPU_DTYPES),
       row_pad=st.sampled_from((0, 4)), seed=st.integers(0, 2**16))
def test_triton(kc, n, R, F, deterministic, src_dtype, out_dtype, row_pad, seed):
    kc.scatter("triton", n=n, R=R, F=F, deterministic=deterministic, src_dtype=src_dtype,
               out_dtype=out_dtype, device=DEVICE, seed=seed, row_pad=row_pad)


@pytest.mark.gpu
@pytest.mark.parametrize("src_dtype", GPU_DTYPES)
@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("deterministic", (False, True))
def test_gpu_triton(kc, src_dtype, out_dtype, deterministic):
    kc.scatter("triton", n=5000, R=300, F=2048, deterministic=deterministic, src_dtype=src_dtype,
               out_dtype=out_dtype, device="cuda", seed=3, row_pad=16)


@pytest.mark.gpu
@pytest.mark.skipif("cupy" not in ck.available_backends("scatter_add_rows", "cuda"), reason="CuPy is not installed")
@pytest.mark.parametrize("src_dtype", GPU_DTYPES)
@pytest.mark.parametrize("out_dtype", GPU_DTYPES)
def test_gpu_cupy(kc, src_dtype, out_dtype):
    for deterministic in (False, True):
        kc.scatter("cupy", n=3000, R=200, F=1000, deterministic=deterministic, src_dtype=src_dtype,
                   out_dtype=out_dtype, device="cuda", seed=4, row_pad=5)
