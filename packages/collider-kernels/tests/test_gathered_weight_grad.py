"""``gathered_weight_grad`` (``grad_outᵀ @ x[index]``, optionally added into ``out``): every backend
against the dense reference, with the split reductions and stream-K schedules of the Triton kernels.

The torch backend runs on CPU; the Triton backend under the interpreter on CPU (fp32, fp16) and on
CUDA in the ``gpu`` tests; CuPy on CUDA. The rule: ``max|out - ref32| <= 2 max|out_torch - ref32| +
atol``. Workspaces and outputs of the Triton kernels are NaN-filled (``poison``).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DEVICE, GPU_DTYPES, make_index, only_gemm_family, poison_cuda_allocator, rand, triton_only

import collider_kernels as ck
from collider_kernels import reference, tuning

KINDS = st.sampled_from(("none", "sorted_subset", "repeats", "empty", "full", "single"))
GPU_SHAPES = [(300, 200, 260, 170), (2049, 1024, 768, 1300), (4096, 2048, 256, 2500)]  # (M, K, N, n)


# --------------------------------------------------------------------------------- torch backend


@settings(deadline=None, max_examples=25)
@given(M=st.integers(1, 40), K=st.integers(1, 40), N=st.integers(1, 40), n=st.integers(1, 40), kind=KINDS,
       accumulate=st.booleans(), seed=st.integers(0, 2**16))
def test_torch(kc, M, K, N, n, kind, accumulate, seed):
    kc.weight_grad("torch", M=M, K=K, N=N, n=n, kind=kind, row_pad=2, dtype=torch.float32,
                   device="cpu", seed=seed, out_dtype=torch.float32 if accumulate else None)


@settings(deadline=None, max_examples=25)
@given(M=st.integers(1, 40), K=st.integers(1, 40), N=st.integers(1, 40), n=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_torch_fp64(M, K, N, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    g = torch.randn(n, N, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, M, (n,), generator=gen)
    torch.testing.assert_close(ck.gathered_weight_grad(g, x, idx, backend="torch"),
                               reference.gathered_weight_grad_reference(g, x, idx))


def test_bad_inputs_name_the_argument():
    x, idx = torch.randn(6, 4), torch.tensor([0, 5, 2])
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


# ------------------------------------------------------------------------------------ Triton

needs_triton = triton_only("gathered_weight_grad")
aligned = st.integers(1, 9).map(lambda v: 8 * v)  # fp16 rows of 16-byte multiples: descriptor kernels


@needs_triton
@settings(deadline=None, max_examples=25)
@given(M=st.integers(1, 70), K=st.integers(1, 70), N=st.integers(1, 70), n=st.integers(1, 70), kind=KINDS,
       row_pad=st.sampled_from((0, 5)), dtype=st.sampled_from((torch.float32, torch.float16)),
       accumulate=st.booleans(), seed=st.integers(0, 2**16))
def test_triton(kc, M, K, N, n, kind, row_pad, dtype, accumulate, seed):
    kc.weight_grad("triton", M=M, K=K, N=N, n=n, kind=kind, row_pad=row_pad, dtype=dtype,
                   device=DEVICE, seed=seed, out_dtype=torch.float32 if accumulate else None)


@needs_triton
@settings(deadline=None, max_examples=20)
@given(M=st.integers(1, 70), K=st.integers(1, 70), N=aligned, n=st.integers(1, 70), kind=KINDS,
       accumulate=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_descriptor_kernel(kc, M, K, N, n, kind, accumulate, seed):
    """Aligned fp16 grad_out takes the descriptor kernel (ragged K and reduction length)."""
    with only_gemm_family("desc"):
        kc.weight_grad("triton", M=M, K=K, N=N, n=n, kind=kind, row_pad=0, dtype=torch.float16,
                       device=DEVICE, seed=seed, out_dtype=torch.float32 if accumulate else None)


@needs_triton
def test_triton_split_reduction(kc, poison, monkeypatch):
    """A small output with a long reduction splits it over programs: fp16 through the descriptor
    kernel, fp32 through the pointer kernel. Each split's fp32 partial goes to a NaN-filled
    workspace and the last split of a tile adds them in order (bitwise repeatable)."""
    from collider_kernels.triton import gemm, settings

    monkeypatch.setattr(settings, "num_sms", lambda device: 64)
    assert gemm.pointer_split(40, 40, 2100, 64) > 1  # and 2x2 tiles of 32x32
    for dtype, path in ((torch.float16, "desc"), (torch.float32, "pointer")):
        with only_gemm_family(path):
            for out_dtype in (None, torch.float32, torch.float16):
                kc.weight_grad("triton", M=2500, K=40, N=40, n=2100, kind="repeats", row_pad=0,
                               dtype=dtype, device=DEVICE, seed=7, out_dtype=out_dtype)
            g = torch.randn(2100, 40, dtype=dtype, device=DEVICE)
            x = torch.randn(2500, 40, dtype=dtype, device=DEVICE)
            idx = torch.randint(0, 2500, (2100,), device=DEVICE)
            assert torch.equal(ck.gathered_weight_grad(g, x, idx, backend="triton"),
                               ck.gathered_weight_grad(g, x, idx, backend="triton"))


@needs_triton
def test_triton_descriptor_split_and_persistent_tiles(kc):
    """Several tiles per program (persistent loop) and a split reduction adding through fp32."""
    assert tuning.candidates("gathered_weight_grad", 40, 24, 2100, 4, pointer=False)[0]["SPLIT_K"] > 1
    with only_gemm_family("desc"):
        for out_dtype in (None, torch.float32, torch.float16):
            kc.weight_grad("triton", M=2500, K=24, N=40, n=2100, kind="repeats", row_pad=0,
                           dtype=torch.float16, device=DEVICE, seed=7, out_dtype=out_dtype)


def _only_config(monkeypatch, cfg):
    """Make ``cfg`` the one candidate of the weight gradient, and forget earlier choices."""
    from collider_kernels.triton import gathered_weight_grad as tw

    monkeypatch.setattr(tw, "_desc_candidates", lambda *args, **kwargs: [cfg])
    tuning.clear("gathered_weight_grad")


@needs_triton
@pytest.mark.parametrize("mode", ("partial", "atomic"))
def test_triton_split_modes(kc, poison, monkeypatch, mode):
    """A split reduction through fp32 partial tiles that the last split to finish a tile adds in
    split order (bitwise reproducible) or through fp32 atomics; into new, fp32-accumulating and
    fp16-accumulating outputs."""
    from collider_kernels.triton.gemm import INTERPRET_CONFIG

    _only_config(monkeypatch, {**INTERPRET_CONFIG, "SPLIT_K": 3, "SPLIT_MODE": mode})
    with only_gemm_family("desc"):
        for out_dtype in (None, torch.float32, torch.float16):
            kc.weight_grad("triton", M=300, K=24, N=40, n=250, kind="repeats", row_pad=0,
                           dtype=torch.float16, device=DEVICE, seed=11, out_dtype=out_dtype)
    assert all(c["SPLIT_MODE"] == mode for c in tuning.cache("gathered_weight_grad").values())
    g = torch.randn(250, 40, dtype=torch.float16, device=DEVICE)
    x = torch.randn(300, 24, dtype=torch.float16, device=DEVICE)
    idx = torch.randint(0, 300, (250,), device=DEVICE)
    first = ck.gathered_weight_grad(g, x, idx, backend="triton")
    if mode == "partial":
        assert torch.equal(first, ck.gathered_weight_grad(g, x, idx, backend="triton"))
    tuning.clear("gathered_weight_grad")


@needs_triton
@pytest.mark.parametrize(("N", "n"), ((224, 250), (64, 250), (128, 250), (160, 20)))
def test_triton_stream_k(kc, poison, monkeypatch, N, n):
    """Stream-K: whole tiles first, then the last partial wave's tiles cut into runs of reduction
    blocks shared by all programs (N = 224: 7 tiles on 4 programs, one program spanning two tiles;
    N = 128: 4 tiles, no stream-K share; N = 160, n = 20: one stream-K tile of two blocks, so only
    two programs); partial tiles in a NaN-filled workspace, added in program order by the last
    program to finish the tile."""
    from collider_kernels.triton import gemm, settings

    cfg = {**gemm.INTERPRET_CONFIG, "SPLIT_K": 1, "STREAM_K": True}
    _only_config(monkeypatch, cfg)
    sms = settings.num_sms(torch.device(DEVICE))
    tiles = -(-N // 32)
    sk_tiles, _, programs = gemm.stream_k_plan(N, 24, n, cfg, sms)
    assert (sk_tiles, programs) == (tiles % sms, max(1, min(sms, tiles % sms * -(-n // 16))))
    with only_gemm_family("desc"):
        for out_dtype in (None, torch.float32, torch.float16):
            kc.weight_grad("triton", M=300, K=24, N=N, n=n, kind="repeats", row_pad=0,
                           dtype=torch.float16, device=DEVICE, seed=N, out_dtype=out_dtype)
    g = torch.randn(n, N, dtype=torch.float16, device=DEVICE)
    x = torch.randn(300, 24, dtype=torch.float16, device=DEVICE)
    idx = torch.randint(0, 300, (n,), device=DEVICE)
    assert torch.equal(ck.gathered_weight_grad(g, x, idx, backend="triton"),
                       ck.gathered_weight_grad(g, x, idx, backend="triton"))
    tuning.clear("gathered_weight_grad")


@needs_triton
def test_deterministic_mode_excludes_atomic_split_candidates(monkeypatch):
    from collider_kernels.triton import gathered_weight_grad as tw

    monkeypatch.setattr(tw, "INTERPRET", False)  # the GPU candidate lists (nothing is launched)
    det = tuning.candidates("gathered_weight_grad", 256, 2048, 9830, 132, pointer=False, deterministic=True)
    free = tuning.candidates("gathered_weight_grad", 256, 2048, 9830, 132, pointer=False, deterministic=False)
    assert any(c["SPLIT_K"] > 1 for c in det)
    assert all(c.get("SPLIT_MODE") != "atomic" for c in det)
    assert {c["SPLIT_MODE"] for c in free if c["SPLIT_K"] > 1} == {"partial", "atomic"}
    # Stream-K (deterministic) only where the tiles leave a partial last wave on 132 SMs.
    sk = [c for c in det if c.get("STREAM_K")]
    assert sk and all((-(-256 // c["BLOCK_M"]) * -(-2048 // c["BLOCK_N"])) % 132 for c in sk)


@needs_triton
def test_triton_pointer_kernel_for_unaligned_rows(kc):
    with only_gemm_family("pointer"):
        kc.weight_grad("triton", M=50, K=21, N=33, n=40, kind="sorted_subset", row_pad=0,
                       dtype=torch.float16, device=DEVICE, seed=4, out_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("out_dtype", (None, torch.float32))
def test_gpu_triton(kc, dtype, shape, out_dtype):
    M, K, N, n = shape
    poison_cuda_allocator()
    kc.weight_grad("triton", M=M, K=K, N=N, n=n, kind="sorted_subset", row_pad=8, dtype=dtype,
                   device="cuda", seed=K, out_dtype=out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_gpu_torch_accumulates_unrounded(dtype):
    """Adding into an fp32 buffer on CUDA, the torch backend adds the fp32 product (one GEMM with an
    fp32 output) in place: no larger error than an fp32 reference's rounding, far below a product
    rounded to the inputs' dtype first."""
    gen = torch.Generator().manual_seed(3)
    M, K, N, n = 3000, 384, 1000, 2100
    x = rand(M, K, dtype, "cuda", gen)
    g = rand(n, N, dtype, "cuda", gen)
    idx = make_index("sorted_subset", M, n, gen, "cuda")
    init = torch.randn(N, K, generator=gen).cuda()
    ref = init.double() + g.double().t() @ x[idx].double()
    buf = init.clone()
    assert ck.gathered_weight_grad(g, x, idx, out=buf, backend="torch") is buf
    err = (buf.double() - ref).abs().max().item()
    rounded = (init + (g.t() @ x[idx]).float()).double()  # the product rounded to dtype, then added
    assert err < 1e-3 * ref.abs().max().item(), err
    assert err < 0.25 * (rounded - ref).abs().max().item()


@pytest.mark.gpu
def test_gpu_triton_edge_index_sets(kc):
    for kind in kc.INDEX_KINDS:
        kc.weight_grad("triton", M=513, K=320, N=130, n=77, kind=kind, row_pad=0,
                       dtype=torch.bfloat16, device="cuda", seed=5, out_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(5000, 2048, 256, 3001), (700, 1536, 1000, 555), (3000, 512, 264, 2900)])
def test_gpu_triton_descriptor_kernel(kc, shape):
    """bf16 with aligned rows: the descriptor kernel, incl. split reductions of narrow outputs."""
    M, K, N, n = shape
    with only_gemm_family("desc"):
        for out_dtype in (None, torch.float32):
            kc.weight_grad("triton", M=M, K=K, N=N, n=n, kind="repeats", row_pad=0, dtype=torch.bfloat16,
                           device="cuda", seed=K, out_dtype=out_dtype)


@pytest.mark.gpu
def test_gpu_triton_offsets_past_int32():
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


# -------------------------------------------------------------------------------------- CuPy

cupy_only = pytest.mark.skipif("cupy" not in ck.available_backends("gathered_weight_grad", "cuda"),
                               reason="CuPy is not installed")


@pytest.mark.gpu
@cupy_only
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [*GPU_SHAPES, (37, 9, 5, 11)])
@pytest.mark.parametrize("out_dtype", (None, torch.float32, torch.float16))
def test_gpu_cupy(kc, dtype, shape, out_dtype):
    M, K, N, n = shape
    poison_cuda_allocator()
    kc.weight_grad("cupy", M=M, K=K, N=N, n=n, kind="repeats", row_pad=8, dtype=dtype,
                   device="cuda", seed=N, out_dtype=out_dtype)


@pytest.mark.gpu
@cupy_only
@pytest.mark.parametrize("kind", ("empty", "full", "single", "none"))
def test_gpu_cupy_edge_index_sets(kc, kind):
    kc.weight_grad("cupy", M=129, K=64, N=70, n=5, kind=kind, row_pad=0, dtype=torch.bfloat16,
                   device="cuda", seed=2, out_dtype=torch.float32)
