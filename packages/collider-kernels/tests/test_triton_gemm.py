"""Triton backend of the GEMM/scatter ops against the dense references.

On CPU the kernels run under Triton's interpreter (small fp32/fp16 cases); the ``gpu`` tests
cover bf16/fp16/fp32 on CUDA with the error rule
``max|out - ref32| <= 2 max|out_torch - ref32| + atol``.
"""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import poison_cuda_allocator

import collider_kernels as ck

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CPU_DTYPES = (torch.float32, torch.float16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

small = st.integers(1, 70)
kinds = st.sampled_from(("none", "sorted_subset", "repeats", "empty", "full", "single"))


def test_triton_backend_is_registered():
    for op in ("gather_matmul", "gathered_weight_grad", "scatter_add_rows"):
        assert "triton" in ck.available_backends(op, DEVICE)


@settings(deadline=None, max_examples=25)
@given(M=small, K=small, N=small, n=small, kind=kinds, has_bias=st.booleans(),
       row_pad=st.sampled_from((0, 3)), dtype=st.sampled_from(CPU_DTYPES), seed=st.integers(0, 2**16))
def test_gather_matmul(kc, M, K, N, n, kind, has_bias, row_pad, dtype, seed):
    kc.gather_matmul("triton", M=M, K=K, N=N, n=n, kind=kind, has_bias=has_bias, row_pad=row_pad,
                     dtype=dtype, device=DEVICE, seed=seed)


@settings(deadline=None, max_examples=25)
@given(M=small, K=small, N=small, n=small, kind=kinds, row_pad=st.sampled_from((0, 5)),
       dtype=st.sampled_from(CPU_DTYPES), accumulate=st.booleans(), seed=st.integers(0, 2**16))
def test_gathered_weight_grad(kc, M, K, N, n, kind, row_pad, dtype, accumulate, seed):
    kc.weight_grad("triton", M=M, K=K, N=N, n=n, kind=kind, row_pad=row_pad, dtype=dtype,
                   device=DEVICE, seed=seed, out_dtype=torch.float32 if accumulate else None)


def test_gathered_weight_grad_split_reduction(kc, poison, monkeypatch):
    """A small output with a long reduction splits it over programs: fp16 through the descriptor
    kernel, fp32 through the pointer kernel. Each split's fp32 partial goes to a NaN-filled
    workspace and the last split of a tile adds them in order (bitwise repeatable)."""
    from collider_kernels.triton import gemm

    monkeypatch.setattr(gemm, "num_sms", lambda device: 64)
    assert gemm._split_k(40, 40, 2100, torch.device(DEVICE)) > 1  # and 2x2 tiles of 32x32
    for dtype, path in ((torch.float16, "desc"), (torch.float32, "pointer")):
        with _only(path):
            for out_dtype in (None, torch.float32, torch.float16):
                kc.weight_grad("triton", M=2500, K=40, N=40, n=2100, kind="repeats", row_pad=0,
                               dtype=dtype, device=DEVICE, seed=7, out_dtype=out_dtype)
            g = torch.randn(2100, 40, dtype=dtype, device=DEVICE)
            x = torch.randn(2500, 40, dtype=dtype, device=DEVICE)
            idx = torch.randint(0, 2500, (2100,), device=DEVICE)
            assert torch.equal(ck.gathered_weight_grad(g, x, idx, backend="triton"),
                               ck.gathered_weight_grad(g, x, idx, backend="triton"))


aligned = st.integers(1, 9).map(lambda v: 8 * v)  # fp16 rows of 16-byte multiples: descriptor kernels


@contextlib.contextmanager
def _only(path):
    """Make the other GEMM kernel family fail, so a test proves which one ran."""
    from collider_kernels.triton import gemm

    def fail(*args, **kwargs):
        raise AssertionError("unexpected GEMM kernel family")

    with pytest.MonkeyPatch.context() as mp:
        if path == "desc":
            mp.setattr(gemm, "_launch_pointer", fail)
        else:
            mp.setattr(gemm, "_launch_fwd_desc", fail)
            mp.setattr(gemm, "_launch_wgrad_desc", fail)
        yield


@settings(deadline=None, max_examples=20)
@given(M=small, K=aligned, N=st.integers(1, 70), n=small, kind=kinds, has_bias=st.booleans(),
       row_pad=st.sampled_from((0, 3)), seed=st.integers(0, 2**16))
def test_gather_matmul_descriptor_kernel(kc, M, K, N, n, kind, has_bias, row_pad, seed):
    """Aligned fp16 weights take the descriptor kernel (any row stride of x, ragged N and n)."""
    with _only("desc"):
        kc.gather_matmul("triton", M=M, K=K, N=N, n=n, kind=kind, has_bias=has_bias, row_pad=row_pad,
                         dtype=torch.float16, device=DEVICE, seed=seed)


@settings(deadline=None, max_examples=20)
@given(M=small, K=st.integers(1, 70), N=aligned, n=small, kind=kinds, accumulate=st.booleans(),
       seed=st.integers(0, 2**16))
def test_gathered_weight_grad_descriptor_kernel(kc, M, K, N, n, kind, accumulate, seed):
    """Aligned fp16 grad_out takes the descriptor kernel (ragged K and reduction length)."""
    with _only("desc"):
        kc.weight_grad("triton", M=M, K=K, N=N, n=n, kind=kind, row_pad=0, dtype=torch.float16,
                       device=DEVICE, seed=seed, out_dtype=torch.float32 if accumulate else None)


def test_descriptor_kernels_split_reduction_and_persistent_tiles(kc):
    """Several tiles per program (persistent loop) and a split reduction adding through fp32."""
    from collider_kernels.triton import gemm

    assert gemm._wgrad_candidates(40, 24, 2100, 4)[0]["SPLIT_K"] > 1
    with _only("desc"):
        kc.gather_matmul("triton", M=300, K=40, N=72, n=250, kind="repeats", has_bias=True, row_pad=0,
                         dtype=torch.float16, device=DEVICE, seed=3)
        for out_dtype in (None, torch.float32, torch.float16):
            kc.weight_grad("triton", M=2500, K=24, N=40, n=2100, kind="repeats", row_pad=0,
                           dtype=torch.float16, device=DEVICE, seed=7, out_dtype=out_dtype)


@pytest.mark.parametrize("mode", ("partial", "atomic"))
def test_weight_grad_split_modes(kc, poison, monkeypatch, mode):
    """A split reduction through fp32 partial tiles that the last split to finish a tile adds in
    split order (bitwise reproducible) or through fp32 atomics; into new, fp32-accumulating and
    fp16-accumulating outputs."""
    from collider_kernels.triton import gemm

    cfg = {**gemm._INTERPRET_CFG, "SPLIT_K": 3, "SPLIT_MODE": mode}
    monkeypatch.setattr(gemm, "_wgrad_candidates", lambda *args, **kwargs: [cfg])
    monkeypatch.setattr(gemm, "_CHOICE", {})
    with _only("desc"):
        for out_dtype in (None, torch.float32, torch.float16):
            kc.weight_grad("triton", M=300, K=24, N=40, n=250, kind="repeats", row_pad=0,
                           dtype=torch.float16, device=DEVICE, seed=11, out_dtype=out_dtype)
    assert all(c["SPLIT_MODE"] == mode for c in gemm._CHOICE.values())
    g = torch.randn(250, 40, dtype=torch.float16, device=DEVICE)
    x = torch.randn(300, 24, dtype=torch.float16, device=DEVICE)
    idx = torch.randint(0, 300, (250,), device=DEVICE)
    first = ck.gathered_weight_grad(g, x, idx, backend="triton")
    if mode == "partial":
        assert torch.equal(first, ck.gathered_weight_grad(g, x, idx, backend="triton"))


@pytest.mark.parametrize(("N", "n"), ((224, 250), (64, 250), (128, 250), (160, 20)))
def test_weight_grad_stream_k(kc, poison, monkeypatch, N, n):
    """Stream-K: whole tiles first, then the last partial wave's tiles cut into runs of reduction
    blocks shared by all programs (N = 224: 7 tiles on 4 programs, one program spanning two tiles;
    N = 128: 4 tiles, no stream-K share; N = 160, n = 20: one stream-K tile of two blocks, so only
    two programs); partial tiles in a NaN-filled workspace, added in program order by the last
    program to finish the tile."""
    from collider_kernels.triton import gemm

    cfg = {**gemm._INTERPRET_CFG, "SPLIT_K": 1, "STREAM_K": True}
    monkeypatch.setattr(gemm, "_wgrad_candidates", lambda *args, **kwargs: [cfg])
    monkeypatch.setattr(gemm, "_CHOICE", {})
    sms = gemm.num_sms(torch.device(DEVICE))
    tiles = -(-N // 32)
    sk_tiles, _, programs = gemm._stream_k_plan(N, 24, n, cfg, sms)
    assert (sk_tiles, programs) == (tiles % sms, max(1, min(sms, tiles % sms * -(-n // 16))))
    with _only("desc"):
        for out_dtype in (None, torch.float32, torch.float16):
            kc.weight_grad("triton", M=300, K=24, N=N, n=n, kind="repeats", row_pad=0,
                           dtype=torch.float16, device=DEVICE, seed=N, out_dtype=out_dtype)
    g = torch.randn(n, N, dtype=torch.float16, device=DEVICE)
    x = torch.randn(300, 24, dtype=torch.float16, device=DEVICE)
    idx = torch.randint(0, 300, (n,), device=DEVICE)
    assert torch.equal(ck.gathered_weight_grad(g, x, idx, backend="triton"),
                       ck.gathered_weight_grad(g, x, idx, backend="triton"))


def test_tuner_skips_candidates_that_fail_and_says_so(monkeypatch):
    from collider_kernels.triton import gemm

    monkeypatch.setattr(gemm, "AUTOTUNE", True)
    monkeypatch.setattr(gemm, "_CHOICE", {})
    monkeypatch.setattr(gemm, "_tuning_bench", lambda fn: fn())  # the "time" is what run returns

    def run(c):
        if c["broken"]:
            raise ValueError("does not compile")
        return c["t"]

    cands = [{"broken": True, "t": 0.1}, {"broken": False, "t": 2.0}, {"broken": False, "t": 1.0}]
    with pytest.warns(RuntimeWarning, match="failed and is skipped"):
        assert gemm._tune("key", cands, run) is cands[2]
    assert gemm._CHOICE["key"] is cands[2]
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="every GEMM candidate"):
        gemm._tune("other", [cands[0], cands[0]], run)


def test_deterministic_mode_excludes_atomic_split_candidates(monkeypatch):
    from collider_kernels.triton import gemm

    monkeypatch.setattr(gemm, "INTERPRET", False)  # the GPU candidate lists (nothing is launched)
    det = gemm._wgrad_candidates(256, 2048, 9830, 132, deterministic=True)
    free = gemm._wgrad_candidates(256, 2048, 9830, 132, deterministic=False)
    assert any(c["SPLIT_K"] > 1 for c in det)
    assert all(c.get("SPLIT_MODE") != "atomic" for c in det)
    assert {c["SPLIT_MODE"] for c in free if c["SPLIT_K"] > 1} == {"partial", "atomic"}
    # Stream-K (deterministic) only where the tiles leave a partial last wave on 132 SMs.
    sk = [c for c in det if c.get("STREAM_K")]
    assert sk and all((-(-256 // c["BLOCK_M"]) * -(-2048 // c["BLOCK_N"])) % 132 for c in sk)


def test_pointer_kernel_for_unaligned_rows(kc):
    with _only("pointer"):
        kc.gather_matmul("triton", M=50, K=21, N=33, n=40, kind="sorted_subset", has_bias=True, row_pad=0,
                         dtype=torch.float16, device=DEVICE, seed=4)
        kc.weight_grad("triton", M=50, K=21, N=33, n=40, kind="sorted_subset", row_pad=0,
                       dtype=torch.float16, device=DEVICE, seed=4, out_dtype=torch.float32)


@settings(deadline=None, max_examples=25)
@given(n=st.integers(0, 60), R=st.integers(1, 12), F=st.integers(1, 90), deterministic=st.booleans(),
       src_dtype=st.sampled_from(CPU_DTYPES), out_dtype=st.sampled_from(CPU_DTYPES),
       row_pad=st.sampled_from((0, 4)), seed=st.integers(0, 2**16))
def test_scatter_add_rows(kc, n, R, F, deterministic, src_dtype, out_dtype, row_pad, seed):
    kc.scatter("triton", n=n, R=R, F=F, deterministic=deterministic, src_dtype=src_dtype,
               out_dtype=out_dtype, device=DEVICE, seed=seed, row_pad=row_pad)


def test_fp64_falls_back_to_torch(kc):
    kc.gather_matmul("triton", M=9, K=7, N=5, n=4, kind="repeats", has_bias=True, row_pad=0,
                     dtype=torch.float32, device=DEVICE, seed=1)
    x = torch.randn(9, 7, dtype=torch.float64, device=DEVICE)
    w = torch.randn(5, 7, dtype=torch.float64, device=DEVICE)
    idx = torch.tensor([0, 8, 3], device=DEVICE)
    torch.testing.assert_close(ck.gather_matmul(x, idx, w, backend="triton"), x[idx] @ w.t())


# ---------------------------------------------------------------------------------------------- GPU



GPU_SHAPES = [  # (M, K, N, n)
    (300, 200, 260, 170),
    (2049, 1024, 768, 1300),
    (4096, 2048, 256, 2500),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("kind", ("sorted_subset", "repeats", "none"))
def test_gpu_gather_matmul(kc, dtype, shape, kind):
    M, K, N, n = shape
    for has_bias in (False, True):
        poison_cuda_allocator()
        kc.gather_matmul("triton", M=M, K=K, N=N, n=n, kind=kind, has_bias=has_bias, row_pad=8,
                         dtype=dtype, device="cuda", seed=M + N)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("out_dtype", (None, torch.float32))
def test_gpu_gathered_weight_grad(kc, dtype, shape, out_dtype):
    M, K, N, n = shape
    poison_cuda_allocator()
    kc.weight_grad("triton", M=M, K=K, N=N, n=n, kind="sorted_subset", row_pad=8, dtype=dtype,
                   device="cuda", seed=K, out_dtype=out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("src_dtype", GPU_DTYPES)
@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("deterministic", (False, True))
def test_gpu_scatter_add_rows(kc, src_dtype, out_dtype, deterministic):
    kc.scatter("triton", n=5000, R=300, F=2048, deterministic=deterministic, src_dtype=src_dtype,
               out_dtype=out_dtype, device="cuda", seed=3, row_pad=16)


@pytest.mark.gpu
def test_gpu_edge_index_sets(kc):
    for kind in kc.INDEX_KINDS:
        kc.gather_matmul("triton", M=513, K=320, N=130, n=77, kind=kind, has_bias=True, row_pad=0,
                         dtype=torch.bfloat16, device="cuda", seed=5)
        kc.weight_grad("triton", M=513, K=320, N=130, n=77, kind=kind, row_pad=0,
                       dtype=torch.bfloat16, device="cuda", seed=5, out_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(5000, 2048, 256, 3001), (700, 1536, 1000, 555), (3000, 512, 264, 2900)])
def test_gpu_descriptor_kernels(kc, shape):
    """bf16 with aligned rows: the descriptor kernels, incl. split reductions of narrow outputs."""
    M, K, N, n = shape
    # Narrow forward outputs (N <= 256) may take the pointer kernel; the weight gradient may not.
    with _only("desc") if N > 256 else contextlib.nullcontext():
        poison_cuda_allocator()
        kc.gather_matmul("triton", M=M, K=K, N=N, n=n, kind="sorted_subset", has_bias=True, row_pad=0,
                         dtype=torch.bfloat16, device="cuda", seed=M)
    with _only("desc"):
        for out_dtype in (None, torch.float32):
            kc.weight_grad("triton", M=M, K=K, N=N, n=n, kind="repeats", row_pad=0, dtype=torch.bfloat16,
                           device="cuda", seed=K, out_dtype=out_dtype)


@pytest.mark.gpu
def test_gpu_weight_grad_offsets_past_int32():
    """grad_outᵀ is read column-wise: row r of grad_out sits r·stride elements in, past 2^31 here."""
    n, N, K, M, stride = 17000, 128, 64, 3000, 131072  # 17000 · 131072 > 2^31
    buf = torch.empty(n, stride, dtype=torch.bfloat16, device="cuda")
    g = buf[:, :N]  # (n, N), row stride 131072
    g.normal_()
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    idx = torch.randint(0, M, (n,), device="cuda")
    out = ck.gathered_weight_grad(g, x, idx, backend="triton")
    ref = g.float().t() @ x[idx].float()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err
    del buf


@pytest.mark.gpu
def test_gpu_tuner_times_candidates_once_and_leaves_out_untouched(kc, monkeypatch):
    """With tuning on, the first call of a shape times several candidates (CUDA-graph replays into
    scratch), later calls reuse the choice, and an accumulating call adds into ``out`` once."""
    from collider_kernels.triton import gemm

    timed = []
    bench = gemm._tuning_bench
    monkeypatch.setattr(gemm, "AUTOTUNE", True)
    monkeypatch.setattr(gemm, "_CHOICE", {})
    monkeypatch.setattr(gemm, "_tuning_bench", lambda fn: timed.append(fn) or bench(fn))
    for _ in range(2):
        kc.weight_grad("triton", M=3000, K=512, N=264, n=2900, kind="repeats", row_pad=0,
                       dtype=torch.bfloat16, device="cuda", seed=1, out_dtype=torch.float32)
        kc.gather_matmul("triton", M=3000, K=512, N=264, n=2900, kind="sorted_subset", has_bias=True,
                         row_pad=0, dtype=torch.bfloat16, device="cuda", seed=2)
    assert len(gemm._CHOICE) == 2
    assert len(timed) >= 4  # several candidates per op, timed on the first call only
    n_timed = len(timed)
    kc.weight_grad("triton", M=3000, K=512, N=264, n=2900, kind="repeats", row_pad=0,
                   dtype=torch.bfloat16, device="cuda", seed=3, out_dtype=torch.float32)
    assert len(timed) == n_timed
