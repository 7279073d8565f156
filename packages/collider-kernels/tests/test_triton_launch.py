"""The cached Triton launcher: its specialization key, the plain/fast path decisions and, on the
GPU, that cached launches compute what plain launches do across alignments and sizes."""

import types

import pytest
import torch

pytest.importorskip("triton")

from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from collider_kernels.triton import launch  # noqa: E402


def test_arg_spec_separates_what_triton_specializes_on():
    buf = torch.empty(64, dtype=torch.float16)
    assert launch.arg_spec(buf) != launch.arg_spec(buf[1:])  # 16-byte aligned or not
    assert launch.arg_spec(buf) != launch.arg_spec(buf.float())  # dtype
    assert launch.arg_spec(buf[8:]) == launch.arg_spec(buf[16:])  # both aligned, same dtype
    assert launch.arg_spec(32) == launch.arg_spec(48)  # both multiples of 16
    assert len({launch.arg_spec(v) for v in (1, 2, 16, 2**31, 2**63)}) == 5  # 1, 16k, i32/i64/u64
    assert launch.arg_spec(True) != launch.arg_spec(False)
    assert launch.arg_spec(True) != launch.arg_spec(1)
    assert launch.arg_spec(0.5) == launch.arg_spec(2.0)
    t = torch.empty(32, 64, dtype=torch.float16)
    d1 = TensorDescriptor(t, [32, 64], [64, 1], [16, 32])
    assert launch.arg_spec(d1) != launch.arg_spec(TensorDescriptor(t, [32, 64], [64, 1], [16, 64]))
    assert launch.arg_spec(d1) != launch.arg_spec(TensorDescriptor(t, [30, 64], [64, 1], [16, 32]))
    with pytest.raises(TypeError, match="no fast-launch key"):
        launch.arg_spec("text")


class _FakeCompiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class _FakeKernel:
    """Records plain launches; signature (a, b, n, BLOCK: constexpr, FLAG: constexpr)."""

    arg_names = ["a", "b", "n", "BLOCK", "FLAG"]
    constexprs = [3, 4]

    def __init__(self):
        self.plain = []
        self.compiled = []

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.plain.append((grid, args, meta))
            self.compiled.append(_FakeCompiled())
            return self.compiled[-1]
        return call


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(launch, "INTERPRET", False)
    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 1234)
    monkeypatch.setattr(launch, "driver", types.SimpleNamespace(active=active))
    kernel = _FakeKernel()
    return kernel, launch.Launcher(kernel)


def test_launcher_caches_per_key_and_passes_constexprs_last(fake):
    kernel, launcher = fake
    a, b = torch.empty(64, dtype=torch.float16), torch.empty(64, dtype=torch.float16)
    launcher[(4,)](a, b, 32, BLOCK=16, FLAG=True, num_warps=4)  # first of its key: plain
    assert len(kernel.plain) == 1
    launcher[(5, 2)](a, b, 48, BLOCK=16, FLAG=True, num_warps=4)  # same key: cached launcher
    assert len(kernel.plain) == 1
    (run,) = kernel.compiled[0].runs
    assert run[:7] == (5, 2, 1, 1234, "fn", "meta", None)
    assert run[9:] == (a, b, 48, 16, True)  # runtime args, then constexprs in signature order
    # Anything Triton specializes on, or another constexpr/option, is a new key: plain again.
    for args, meta in (((a[1:], b, 32), {}), ((a, b, 33), {}), ((a, b, 32), {"FLAG": False}),
                       ((a, b, 32), {"num_warps": 8}), ((a.float(), b, 32), {})):
        launcher[(4,)](*args, **{"BLOCK": 16, "FLAG": True, "num_warps": 4, **meta})
    assert len(kernel.plain) == 6


def test_launcher_takes_plain_path_when_it_cannot_key_or_hooks_are_set(fake, monkeypatch):
    kernel, launcher = fake
    a = torch.empty(64, dtype=torch.float16)
    for _ in range(2):
        launcher[(1,)](a, a, 32, BLOCK=16, num_warps=4)  # a constexpr left to its default
        launcher[(1,)](a, a, "x", BLOCK=16, FLAG=True)  # an argument type without a key
        launcher[(1,)](a, a, BLOCK=16, FLAG=True, n=32)  # runtime argument by keyword
    assert len(kernel.plain) == 6
    launcher[(1,)](a, a, 32, BLOCK=16, FLAG=True)
    monkeypatch.setattr(launch._knobs.runtime, "launch_enter_hook", lambda *a: None)
    launcher[(1,)](a, a, 32, BLOCK=16, FLAG=True)  # a profiler hook sees every launch
    assert len(kernel.plain) == 8


@pytest.mark.gpu
def test_gpu_cached_launches_match_plain_launches():
    """Alternate aligned/misaligned inputs and sizes through the cached launcher; every result
    matches the plain ``kernel[grid]`` launch of the same kernel."""
    from collider_kernels.triton import gather_matmul, gemm

    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(4100, 72, device="cuda", dtype=torch.float16, generator=gen)
    w = torch.randn(40, 71, device="cuda", dtype=torch.float16, generator=gen)
    cfg = {**gemm.tile_config(32, 32, 32, 2, 4), "DESC": False}
    for rep in range(3):
        for off, n in ((0, 4096), (1, 4000), (0, 17), (3, 1)):
            x = base[off:off + n, :71]  # row stride 72, start misaligned when off is odd
            idx = torch.randint(0, n, (n,), device="cuda", generator=gen)
            y_fast = torch.full((n, 40), float("nan"), device="cuda", dtype=torch.float16)
            gather_matmul.gather_matmul_into(x, idx, w, None, y_fast, cfg=cfg)
            y_plain = torch.full_like(y_fast, float("nan"))
            strides = (x.stride(0), x.stride(1), w.stride(1), w.stride(0), y_plain.stride(0), 1)
            kernel = gemm.gemm_kernel.kernel  # the plain JIT function under the launcher
            kernel[(triton_cdiv(n, 32) * triton_cdiv(40, 32), 1)](
                x, w, y_plain, y_plain, idx, y_plain, y_plain, y_plain, n, 40, 71, *strides,
                GATHER_A_ROWS=True, GATHER_B_ROWS=False, HAS_BIAS=False, ACCUMULATE=False, ATOMIC=False,
                SPLIT_K=1, UPCAST=False, DOT_PRECISION="tf32", EVEN_K=False,
                BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2,
            )
            assert not y_fast.isnan().any()
            assert torch.equal(y_fast, y_plain), (rep, off, n)
    assert len(gemm.gemm_kernel._cache) >= 2  # cached entries were made and used


def triton_cdiv(a, b):
    return -(-a // b)
