"""Shared checks of a backend against collider_kernels.reference (the ``kc`` fixture).

The interpreter setting and the ``gpu`` skip live in the repository's root conftest.py.
"""

import types

import pytest
import torch

import collider_kernels as ck
from collider_kernels import reference

INDEX_KINDS = ("sorted_subset", "random_repeats", "empty", "full", "single")


def make_index(kind: str, M: int, n: int, gen: torch.Generator, device) -> torch.Tensor:
    """A row index of ``kind`` into M rows (n used by the subset kinds), int64 on ``device``."""
    if kind == "empty":
        idx = torch.empty(0, dtype=torch.int64)
    elif kind == "full":
        idx = torch.arange(M)
    elif kind == "single":
        idx = torch.randint(0, M, (1,), generator=gen)
    elif kind == "sorted_subset":
        idx = torch.randperm(M, generator=gen)[: min(n, M)].sort().values
    else:
        idx = torch.randint(0, M, (n,), generator=gen)
    return idx.to(device)


def rand(shape, dtype, device, gen, *, row_pad: int = 0) -> torch.Tensor:
    """Fresh normal data; with ``row_pad`` the result is a row-strided view of a wider buffer."""
    rows, cols = shape
    buf = torch.randn(rows, cols + row_pad, generator=gen).to(dtype).to(device)
    return buf[:, :cols]


def assert_rule(out, ref32, torch_out, *, atol: float, what: str) -> None:
    """``max|out - ref32| <= 2 max|torch_out - ref32| + atol``; NaN (unwritten poison) always fails."""
    assert out.shape == ref32.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output?)"
    if out.numel() == 0:
        return
    err = (out.double() - ref32.double()).abs().max().item()
    base = (torch_out.double() - ref32.double()).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: max err {err:.3g} > 2 * torch err {base:.3g} + {atol:.3g}"


def atol_for(dtype, ref32, depth: int) -> float:
    """Small absolute slack: relative to the result scale and the reduction depth."""
    scale = ref32.abs().max().item() if ref32.numel() else 1.0
    eps = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    return eps * (1.0 + scale) * (1.0 + depth) ** 0.5 * 0.1 + 1e-6


def check_gather_matmul(backend, *, M, K, N, n, kind, has_bias, row_pad, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = rand((M, K), dtype, device, gen, row_pad=row_pad)  # (M, K), rows strided when row_pad
    w = rand((N, K), dtype, device, gen)
    b = rand((1, N), dtype, device, gen)[0] if has_bias else None
    idx = None if kind == "none" else make_index(kind, M, n, gen, device)
    out = ck.gather_matmul(x, idx, w, b, backend=backend)
    ref32 = reference.gather_matmul_reference(x.float(), idx, w.float(), None if b is None else b.float())
    torch_out = ck.gather_matmul(x, idx, w, b, backend="torch")
    assert out.dtype == dtype and out.device == x.device
    assert_rule(out, ref32, torch_out, atol=atol_for(dtype, ref32, K), what=f"gather_matmul[{backend}]")


def check_weight_grad(backend, *, M, K, N, n, kind, row_pad, dtype, device, seed, out_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    x = rand((M, K), dtype, device, gen, row_pad=row_pad)  # (M, K)
    idx = None if kind == "none" else make_index(kind, M, n, gen, device)
    rows = M if idx is None else idx.shape[0]
    g = rand((rows, N), dtype, device, gen, row_pad=row_pad)  # (n, N)
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
    src = rand((n, F), src_dtype, device, gen, row_pad=row_pad)  # (n, F)
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


@pytest.fixture(scope="session")
def kc():
    """The shared backend checks of this conftest."""
    return types.SimpleNamespace(
        gather_matmul=check_gather_matmul,
        weight_grad=check_weight_grad,
        scatter=check_scatter,
        INDEX_KINDS=INDEX_KINDS,
    )
