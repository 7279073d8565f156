"""Helpers shared by the kernel tests: index sets, fresh random data and the error rule.

The error rule (as in the best kernel libraries): a backend's result ``out`` may differ from an
fp32/fp64 reference by at most twice what the torch backend computing in the same dtype does,
plus a small absolute slack.
"""

import contextlib

import pytest
import torch

# "none" is index=None (all rows in order); "repeats" may repeat rows (embedding gradients).
INDEX_KINDS = ("none", "empty", "single", "sorted_subset", "full", "repeats")


def make_index(kind: str, M: int, n: int, gen: torch.Generator, device) -> torch.Tensor | None:
    """A row index of ``kind`` into M rows (n rows for the subset kinds), int64 on ``device``."""
    if kind == "none":
        return None
    if kind == "empty":
        idx = torch.empty(0, dtype=torch.int64)
    elif kind == "full":
        idx = torch.arange(M)
    elif kind == "single":
        idx = torch.randint(0, M, (1,), generator=gen)
    elif kind == "sorted_subset":
        idx = torch.randperm(M, generator=gen)[: min(n, M)].sort().values
    elif kind == "repeats":
        idx = torch.randint(0, M, (n,), generator=gen)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    return idx.to(device)


def rand(rows: int, cols: int, dtype, device, gen, *, scale=1.0, shift=0.0, row_pad: int = 0) -> torch.Tensor:
    """Fresh normal data (rows, cols); with ``row_pad`` a row-strided view of a wider buffer."""
    buf = (torch.randn(rows, cols + row_pad, generator=gen) * scale + shift).to(dtype).to(device)
    return buf[:, :cols]


def nan_alloc(shape, dtype, device) -> torch.Tensor:
    """An allocator whose outputs are NaN-filled, so unwritten elements fail the checks."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@contextlib.contextmanager
def nan_outputs():
    """Every Triton kernel output (and workspace) allocated NaN-filled while the block runs."""
    from collider_kernels.triton import gemm, rotary, rowwise

    with pytest.MonkeyPatch.context() as mp:
        for module in (gemm, rotary, rowwise):
            mp.setattr(module, "_alloc", nan_alloc)
        yield


def poison_cuda_allocator() -> None:
    """Leave NaN-filled blocks in the CUDA caching allocator, so outputs that torch allocates and a
    kernel fails to write show up as NaN."""
    torch.empty(64 << 20, dtype=torch.float32, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def norm_case(M, H, n, kind, dtype, device, seed, row_pad=0, weight_dtype=None, grad_dtype=None):
    """``(grad, x, weight, index)`` of a normalisation backward (RMSNorm or LayerNorm): x (M, H)
    with a non-zero mean, weight (H,) around 1, grad (n, H) for the rows ``index``."""
    gen = torch.Generator().manual_seed(seed)
    x = rand(M, H, dtype, device, gen, scale=2.0, shift=0.5, row_pad=row_pad)  # (M, H)
    w = rand(1, H, weight_dtype or dtype, device, gen, shift=1.0)[0]  # (H,)
    idx = make_index(kind, M, n, gen, device)
    grad = rand(M if idx is None else idx.shape[0], H, grad_dtype or dtype, device, gen, row_pad=row_pad)
    return grad, x, w, idx


def assert_rule(out, ref32, torch_out, *, atol: float, what: str, same_dtype: bool = False) -> None:
    """``max|out - ref32| <= 2 max|torch_out - ref32| + atol``; NaN (unwritten poison) always fails."""
    assert out.shape == ref32.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    if same_dtype:
        assert out.dtype == torch_out.dtype, f"{what}: dtype {out.dtype} != torch backend {torch_out.dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output?)"
    if out.numel() == 0:
        return
    err = (out.double() - ref32.double()).abs().max().item()
    base = (torch_out.double() - ref32.double()).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: max err {err:.3g} > 2 * torch err {base:.3g} + {atol:.3g}"


def small_atol(dtype, ref32, depth: int = 1) -> float:
    """Small absolute slack: relative to the result scale and the reduction depth. fp32 allows a
    few ulp (GPU fast-math exp in activations)."""
    eps = {torch.float32: 4e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    scale = ref32.abs().max().item() if ref32.numel() else 1.0
    return 0.1 * eps * (1.0 + scale) * (1.0 + depth) ** 0.5 + 1e-6


# Kept sets of one sequence for the attention tests.
KEEP_KINDS = ("empty", "all", "one", "scattered", "runs")


def keep_row(kind: str, T: int, gen: torch.Generator) -> torch.Tensor:
    """(T,) bool kept set of one sequence: none, all, one token, scattered, or contiguous runs."""
    row = torch.zeros(T, dtype=torch.bool)
    if kind == "all":
        row[:] = True
    elif kind == "one":
        row[int(torch.randint(0, T, (1,), generator=gen))] = True
    elif kind == "scattered":
        row = torch.rand(T, generator=gen) < float(torch.rand((), generator=gen)) * 0.9 + 0.05
    elif kind == "runs":
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            a = int(torch.randint(0, T, (1,), generator=gen))
            row[a: a + int(torch.randint(1, max(2, T // 2), (1,), generator=gen))] = True
    elif kind != "empty":
        raise ValueError(f"unknown keep kind {kind!r}")
    return row
