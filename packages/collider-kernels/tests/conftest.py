"""Shared checks of a backend against collider_kernels.reference (the ``kc`` fixture).

The interpreter setting and the ``gpu`` skip live in the repository's root conftest.py.
"""

import types

import pytest
import torch
from kernel_testing import INDEX_KINDS, assert_rule, make_index, nan_outputs, rand
from kernel_testing import small_atol as atol_for

import collider_kernels as ck
from collider_kernels import reference


def check_gather_matmul(backend, *, M, K, N, n, kind, has_bias, row_pad, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = rand(M, K, dtype, device, gen, row_pad=row_pad)  # (M, K), rows strided when row_pad
    w = rand(N, K, dtype, device, gen)
    b = rand(1, N, dtype, device, gen)[0] if has_bias else None
    idx = make_index(kind, M, n, gen, device)  # None for kind "none"
    out = ck.gather_matmul(x, idx, w, b, backend=backend)
    ref32 = reference.gather_matmul_reference(x.float(), idx, w.float(), None if b is None else b.float())
    torch_out = ck.gather_matmul(x, idx, w, b, backend="torch")
    assert out.dtype == dtype and out.device == x.device
    assert_rule(out, ref32, torch_out, atol=atol_for(dtype, ref32, K), what=f"gather_matmul[{backend}]")


def check_weight_grad(backend, *, M, K, N, n, kind, row_pad, dtype, device, seed, out_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    x = rand(M, K, dtype, device, gen, row_pad=row_pad)  # (M, K)
    idx = make_index(kind, M, n, gen, device)  # None for kind "none"
    rows = M if idx is None else idx.shape[0]
    g = rand(rows, N, dtype, device, gen, row_pad=row_pad)  # (n, N)
    ref32 = reference.gathered_weight_grad_reference(g.float(), x.float(), idx)
    atol = atol_for(dtype, ref32, rows)
    if out_dtype is None:
        out = ck.gathered_weight_grad(g, x, idx, backend=backend)
        torch_out = ck.gathered_weight_grad(g, x, idx, backend="torch")
        assert out.dtype == dtype
        assert_rule(out, ref32, torch_out, atol=atol, what=f"gathered_weight_grad[{backend}]")
    else:
        # Accumulate into a random (never zero) buffer: out += dYᵀ X[idx].
        init = torch.randn(N, K, generator=gen).to(out_dtype).to(device)
        buf, buf_torch = init.clone(), init.clone()
        res = ck.gathered_weight_grad(g, x, idx, out=buf, backend=backend)
        assert res is buf
        ck.gathered_weight_grad(g, x, idx, out=buf_torch, backend="torch")
        ref_acc = init.float() + ref32
        atol += 1e-6 * (1 + ref_acc.abs().max().item()) if ref_acc.numel() else 0.0
        if out_dtype != torch.float32:
            atol += atol_for(out_dtype, ref_acc, 1)
        assert_rule(buf, ref_acc, buf_torch, atol=atol, what=f"gathered_weight_grad[{backend}] out+=")


def check_scatter(backend, *, n, R, F, deterministic, src_dtype, out_dtype, device, seed, row_pad=0):
    gen = torch.Generator().manual_seed(seed)
    src = rand(n, F, src_dtype, device, gen, row_pad=row_pad)  # (n, F)
    # Few destination rows, so indices repeat.
    idx = torch.randint(0, R, (n,), generator=gen).to(device)
    init = (torch.randn(R, F, generator=gen) * 3).to(out_dtype).to(device)  # large, never zero
    out = init.clone()
    res = ck.scatter_add_rows(src, idx, out=out, deterministic=deterministic, backend=backend)
    assert res is out
    ref32 = init.float() + reference.scatter_add_rows_reference(src.float(), idx, R)
    torch_out = ck.scatter_add_rows(src, idx, out=init.clone(), deterministic=deterministic, backend="torch")
    atol = atol_for(out_dtype, ref32, 1) + 1e-6 * (1 + ref32.abs().max().item())
    assert_rule(out, ref32, torch_out, atol=atol, what=f"scatter_add_rows[{backend}]")
    if deterministic:
        again = ck.scatter_add_rows(src, idx, out=init.clone(), deterministic=True, backend=backend)
        assert torch.equal(again, out), f"scatter_add_rows[{backend}] deterministic run differs"
    fresh = ck.scatter_add_rows(src, idx, R, deterministic=deterministic, backend=backend)
    assert fresh.shape == (R, F) and fresh.dtype == src_dtype


@pytest.fixture
def poison():
    """Every Triton kernel output and workspace allocated NaN-filled during the test."""
    with nan_outputs():
        yield


@pytest.fixture(scope="session")
def kc():
    """The shared backend checks of this conftest."""
    return types.SimpleNamespace(
        gather_matmul=check_gather_matmul,
        weight_grad=check_weight_grad,
        scatter=check_scatter,
        INDEX_KINDS=INDEX_KINDS,
    )
