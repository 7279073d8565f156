"""Torch backend of the ops against the dense references, argument errors, backend selection."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import collider_kernels as ck
from collider_kernels import backends

small = st.integers(1, 40)
kinds = st.sampled_from(("none", "sorted_subset", "repeats", "empty", "full", "single"))
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@settings(deadline=None, max_examples=25)
@given(M=small, K=small, N=small, n=small, kind=kinds, has_bias=st.booleans(),
       row_pad=st.sampled_from((0, 3)), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_torch_gather_matmul(kc, M, K, N, n, kind, has_bias, row_pad, dtype, seed):
    kc.gather_matmul("torch", M=M, K=K, N=N, n=n, kind=kind, has_bias=has_bias, row_pad=row_pad,
                     dtype=dtype if dtype != torch.float64 else torch.float32, device="cpu", seed=seed)


@settings(deadline=None, max_examples=25)
@given(M=small, K=small, N=small, n=small, kind=kinds, accumulate=st.booleans(), seed=st.integers(0, 2**16))
def test_torch_gathered_weight_grad(kc, M, K, N, n, kind, accumulate, seed):
    kc.weight_grad("torch", M=M, K=K, N=N, n=n, kind=kind, row_pad=2, dtype=torch.float32,
                   device="cpu", seed=seed, out_dtype=torch.float32 if accumulate else None)


@settings(deadline=None, max_examples=25)
@given(M=small, K=small, N=small, n=small, seed=st.integers(0, 2**16))
def test_torch_matches_reference_fp64(M, K, N, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    w = torch.randn(N, K, generator=gen, dtype=torch.float64)
    b = torch.randn(N, generator=gen, dtype=torch.float64)
    g = torch.randn(n, N, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, M, (n,), generator=gen)
    from collider_kernels import reference as ref

    torch.testing.assert_close(ck.gather_matmul(x, idx, w, b, backend="torch"),
                               ref.gather_matmul_reference(x, idx, w, b))
    torch.testing.assert_close(ck.gathered_weight_grad(g, x, idx, backend="torch"),
                               ref.gathered_weight_grad_reference(g, x, idx))
    torch.testing.assert_close(ck.scatter_add_rows(g, idx, M, backend="torch"),
                               ref.scatter_add_rows_reference(g, idx, M))


@settings(deadline=None, max_examples=20)
@given(n=st.integers(0, 50), R=st.integers(1, 10), F=st.integers(1, 30), deterministic=st.booleans(),
       seed=st.integers(0, 2**16))
def test_torch_scatter_add_rows(kc, n, R, F, deterministic, seed):
    kc.scatter("torch", n=n, R=R, F=F, deterministic=deterministic, src_dtype=torch.float32,
               out_dtype=torch.float32, device="cpu", seed=seed)


# ------------------------------------------------------------------------------------- bad inputs


def _data():
    x = torch.randn(6, 4)
    w = torch.randn(3, 4)
    return x, w, torch.tensor([0, 5, 2])


def test_gather_matmul_errors():
    x, w, idx = _data()
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


def test_gathered_weight_grad_errors():
    x, _, idx = _data()
    g = torch.randn(3, 5)
    with pytest.raises(TypeError, match="x"):
        ck.gathered_weight_grad(g, x.half(), idx)
    with pytest.raises(ValueError, match="index"):
        ck.gathered_weight_grad(g, x, idx[:2])
    with pytest.raises(IndexError, match="index"):
        ck.gathered_weight_grad(g, x, torch.tensor([0, 1, 9]))
    with pytest.raises(ValueError, match="x"):
        ck.gathered_weight_grad(g, x, None)
    with pytest.raises(ValueError, match="out"):
        ck.gathered_weight_grad(g, x, idx, out=torch.zeros(4, 5))


def test_scatter_add_rows_errors():
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


# ------------------------------------------------------------------------------ backend selection


def test_auto_on_cpu_is_torch():
    for op in ("gather_matmul", "gathered_weight_grad", "scatter_add_rows"):
        assert backends.resolve_backend(op, "auto", "cpu") is backends._REGISTRY[op]["torch"].fn


def test_unknown_and_unavailable_backends():
    x, w, idx = _data()
    with pytest.raises(ValueError, match="backend"):
        ck.gather_matmul(x, idx, w, backend="nope")
    with pytest.raises(RuntimeError, match="cupy"):
        ck.gather_matmul(x, idx, w, backend="cupy")  # CUDA only (or not installed)


def test_auto_order_on_cuda_lists_every_backend():
    orders = [backends.AUTO_ORDER_CUDA, *backends.AUTO_ORDER_CUDA_BY_OP.values()]
    for order in orders:
        assert sorted(order) == sorted(backends.BACKENDS)


def test_set_auto_backends_restricts_auto_only():
    op = "swiglu_backward"
    assert ck.auto_backend(op, "cpu") == "torch"
    expected = backends.available_backends(op, "cuda")[0]  # listing only: no CUDA tensor is made
    assert ck.auto_backend(op, "cuda") == expected
    previous = ck.set_auto_backends(("torch",))
    try:
        assert ck.auto_backend(op, "cuda") == "torch"
        assert backends.resolve_backend(op, "auto", "cuda") is backends._REGISTRY[op]["torch"].fn
        if "triton" in backends._REGISTRY[op]:  # an explicit backend is unaffected
            assert backends.resolve_backend(op, "triton", "cpu") is backends._REGISTRY[op]["triton"].fn
    finally:
        ck.set_auto_backends(previous)
    assert ck.auto_backend(op, "cuda") == expected
    for bad in (("triton",), ("torch", "nope")):
        with pytest.raises(ValueError, match="subset"):
            ck.set_auto_backends(bad)
