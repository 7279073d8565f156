"""Helpers shared by the kernel tests: index sets, fresh random data, the error rule, and the
cases and checks of the row-wise backwards (SwiGLU, GELU, and the two row norms, which share one
Triton kernel).

The error rule (as in the best kernel libraries): a backend's result ``out`` may differ from an
fp32/fp64 reference by at most twice what the torch backend computing in the same dtype does,
plus a small absolute slack.
"""

import contextlib

import pytest
import torch

import collider_kernels as ck
from collider_kernels import reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # where the Triton tests run (CPU: the interpreter)
GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_only(op: str):
    """Skip marker for tests of ``op``'s Triton backend where it is not available."""
    return pytest.mark.skipif("triton" not in ck.available_backends(op, DEVICE),
                              reason="the Triton backend is not available here")


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
    from collider_kernels.triton import settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(settings, "alloc_output", nan_alloc)
        yield


@contextlib.contextmanager
def only_gemm_family(path: str):
    """Make the other Triton GEMM kernel family fail ("desc" or "pointer"), so a test proves
    which one ran."""
    from collider_kernels.triton import gather_matmul, gathered_weight_grad, gemm

    def fail(*args, **kwargs):
        raise AssertionError("unexpected GEMM kernel family")

    with pytest.MonkeyPatch.context() as mp:
        if path == "desc":
            mp.setattr(gemm, "launch_pointer", fail)
        else:
            mp.setattr(gather_matmul, "launch_desc", fail)
            mp.setattr(gathered_weight_grad, "launch_desc", fail)
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


def swiglu_case(M, I, n, kind, dtype, device, seed, row_pad=0):
    """``(grad, gate, up, index)`` of a SwiGLU backward: gate, up (M, I), grad (n, I)."""
    gen = torch.Generator().manual_seed(seed)
    gate = rand(M, I, dtype, device, gen, scale=3.0, row_pad=row_pad)  # (M, I)
    up = rand(M, I, dtype, device, gen, row_pad=row_pad)
    idx = make_index(kind, M, n, gen, device)
    grad = rand(M if idx is None else idx.shape[0], I, dtype, device, gen, row_pad=row_pad)  # (n, I)
    return grad, gate, up, idx


def check_swiglu(backend, grad, gate, up, idx):
    """``swiglu_backward`` on ``backend`` against the fp32 reference and the torch backend."""
    dgate, dup = ck.swiglu_backward(grad, gate, up, idx, backend=backend)
    ref = reference.swiglu_backward_reference(grad.float(), gate.float(), up.float(), idx)
    base = ck.swiglu_backward(grad, gate, up, idx, backend="torch")
    for name, out, r, b in zip(("dgate", "dup"), (dgate, dup), ref, base, strict=True):
        assert out.dtype == gate.dtype and out.device == gate.device
        assert_rule(out, r, b, atol=small_atol(gate.dtype, r), what=f"swiglu {name}[{backend}]", same_dtype=True)


def gelu_case(M, F, n, kind, dtype, device, seed, row_pad=0, scale=3.0):
    """``(grad, x, index)`` of a GELU backward: x (M, F), grad (n, F)."""
    gen = torch.Generator().manual_seed(seed)
    x = rand(M, F, dtype, device, gen, scale=scale, row_pad=row_pad)  # (M, F)
    idx = make_index(kind, M, n, gen, device)
    grad = rand(M if idx is None else idx.shape[0], F, dtype, device, gen, row_pad=row_pad)  # (n, F)
    return grad, x, idx


def check_gelu(backend, grad, x, idx):
    """``gelu_new_backward`` on ``backend`` against the fp64 reference and the torch backend."""
    dx = ck.gelu_new_backward(grad, x, idx, backend=backend)
    ref = reference.gelu_new_backward_reference(grad.double(), x.double(), idx)
    base = ck.gelu_new_backward(grad, x, idx, backend="torch")
    assert dx.dtype == x.dtype and dx.device == x.device
    assert_rule(dx, ref, base, atol=small_atol(x.dtype, ref), what=f"gelu dx[{backend}]", same_dtype=True)
    return dx


def check_rms(backend, grad, x, w, idx, eps):
    """``rms_norm_backward`` on ``backend`` against the fp32 reference and the torch backend."""
    dx, dw = ck.rms_norm_backward(grad, x, w, eps, idx, backend=backend)
    ref_dx, ref_dw = reference.rms_norm_backward_reference(grad.float(), x.float(), w.float(), eps, idx)
    base_dx, base_dw = ck.rms_norm_backward(grad, x, w, eps, idx, backend="torch")
    assert dx.dtype == x.dtype and dw.dtype == torch.float32 and dw.shape == (x.shape[1],)
    assert_rule(dx, ref_dx, base_dx, atol=small_atol(x.dtype, ref_dx, x.shape[1]), what=f"rms dx[{backend}]",
                same_dtype=True)
    rows = grad.shape[0]
    assert_rule(dw, ref_dw, base_dw, atol=small_atol(torch.float32, ref_dw, rows), what=f"rms dweight[{backend}]",
                same_dtype=True)
    if rows:
        # Same convention as the torch backend (xhat cast to x's dtype): columns agree up to the fp32
        # summation order, except a few where an ulp of rstd moves xhat across a rounding boundary
        # of a 16-bit x.
        x32 = (x if idx is None else x[idx]).float()
        terms = (grad.float() * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).abs().sum(0)
        off = (dw - base_dw).abs() > 4e-6 * terms + 1e-6  # (H,)
        if x.dtype == torch.float32:
            assert not off.any(), f"rms dweight[{backend}] differs from the torch backend"
        elif x.shape[1] >= 8:
            assert off.float().mean() <= 0.25, f"rms dweight[{backend}]: {int(off.sum())} columns differ from torch"
    return dx, dw


def check_ln(backend, grad, x, w, idx, eps):
    """``layer_norm_backward`` on ``backend`` against the fp64 reference and the torch backend."""
    out = ck.layer_norm_backward(grad, x, w, eps, idx, backend=backend)
    ref = reference.layer_norm_backward_reference(grad.double(), x.double(), w.double(), eps, idx)
    base = ck.layer_norm_backward(grad, x, w, eps, idx, backend="torch")
    H, rows = x.shape[1], grad.shape[0]
    assert out[0].dtype == x.dtype and out[0].device == x.device
    assert out[1].dtype == out[2].dtype == torch.float32 and out[1].shape == out[2].shape == (H,)
    assert_rule(out[0], ref[0], base[0], atol=small_atol(x.dtype, ref[0], H), what=f"ln dx[{backend}]", same_dtype=True)
    for name, o, r, b in zip(("dweight", "dbias"), out[1:], ref[1:], base[1:], strict=True):
        assert_rule(o, r, b, atol=small_atol(torch.float32, r, rows), what=f"ln {name}[{backend}]", same_dtype=True)
    return out


def rotary_case(n, H, D, R, T, dtype, device, seed, head_pad=0, table_dtype=None):
    """``(x, cos, sin, positions)`` of a rotary op: x (n, H, D) (with ``head_pad``, the middle
    heads of a wider (n, H + 2 head_pad, D) buffer, as the q or k heads of a fused projection),
    tables (T, R) with repeated halves, positions (n,) with repeats."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H + 2 * head_pad, D, generator=gen).to(dtype).to(device)[:, head_pad: head_pad + H]
    angles = torch.rand(T, R // 2, generator=gen) * 6.0
    emb = torch.cat([angles, angles], dim=-1)  # (T, R)
    cos, sin = (t.to(table_dtype or dtype).to(device) for t in (emb.cos(), emb.sin()))
    positions = torch.randint(0, T, (n,), generator=gen).to(device)
    return x, cos, sin, positions


def ce_case(n, V, dtype, device, seed, *, row_pad=0, ignore_share=0.2, ignore_index=-100, scale=3.0):
    """``(logits, labels)``: logits (n, V) (rows strided with ``row_pad``), labels (n,) int64 with
    about ``ignore_share`` of them ``ignore_index``."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V + row_pad, generator=gen) * scale).to(dtype).to(device)[:, :V]
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_share] = ignore_index
    return logits, labels.to(device)


def mismatch_share(out, base) -> float:
    """Share of elements of ``out`` that differ from ``base`` (0 for empty tensors)."""
    return (out != base).float().mean().item() if out.numel() else 0.0


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
    eps = {torch.float64: 1e-14, torch.float32: 4e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
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


def doc_starts(B: int, T: int, docs: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) int64 key_start of rows packed with up to ``docs`` documents each: the position
    where each token's document begins (random boundaries)."""
    t = torch.arange(T)
    boundary = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        cuts = torch.randint(0, T, (max(0, docs - 1),), generator=gen)
        boundary[b, cuts] = True
    boundary[:, 0] = True
    return torch.where(boundary, t, 0).cummax(1).values


def assert_each_raises(cases) -> None:
    """Each ``(fn, exception type, message pattern)`` of ``cases``: calling ``fn`` raises that
    exception with a message matching the pattern (the bad-input tests of the ops)."""
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()
