"""The tuning module: candidates of every tuned kernel, the cache and clearing it, failing
candidates, and that tuning trials never touch the real outputs (GEMM accumulation into ``out``,
the attention's dQ accumulator)."""

import pytest
import torch

import collider_kernels as ck
from collider_kernels import tuning

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
KERNELS = ("gather_matmul", "gathered_weight_grad", "masked_attention_backward.dkdv", "masked_attention_backward.dq")


def test_every_tuned_kernel_has_candidates():
    assert set(tuning.tuned_kernels()) == set(KERNELS)
    args = {"gather_matmul": (512,), "gathered_weight_grad": (256, 2048, 9830, 132),
            "masked_attention_backward.dkdv": (64,), "masked_attention_backward.dq": (128,)}
    for kernel in KERNELS:
        cands = tuning.candidates(kernel, *args[kernel])
        assert cands and all(isinstance(c, dict) for c in cands)
    with pytest.raises(KeyError, match="unknown tuned kernel"):
        tuning.candidates("nope")


def test_cache_and_clear(monkeypatch):
    monkeypatch.setattr(tuning, "_CACHE", {"a": {}, "b": {}})
    cands = [{"x": 1}, {"x": 2}]
    assert tuning.choose("a", ("k",), cands, lambda c: None) is cands[0]  # not timed: the first
    tuning.choose("b", ("k",), cands, lambda c: None)
    assert tuning.cache("a") == {("k",): cands[0]} and tuning.lookup("a", ("k",)) is cands[0]
    assert set(tuning.cache()) == {"a", "b"}
    tuning.clear("a")
    assert tuning.cache("a") == {} and tuning.cache("b")
    tuning.clear()
    assert tuning.cache() == {"a": {}, "b": {}}


def test_choose_skips_candidates_that_fail_and_says_so(monkeypatch):
    monkeypatch.setattr(tuning, "ENABLED", True)
    monkeypatch.setattr(tuning, "_CACHE", {})
    monkeypatch.setattr(tuning, "bench", lambda fn: fn())  # the "time" is what run returns

    def run(c):
        if c["broken"]:
            raise ValueError("does not compile")
        return c["t"]

    cands = [{"broken": True, "t": 0.1}, {"broken": False, "t": 2.0}, {"broken": False, "t": 1.0}]
    with pytest.warns(RuntimeWarning, match="failed and is skipped"):
        assert tuning.choose("k", "key", cands, run) is cands[2]
    assert tuning.cache("k")["key"] is cands[2]
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="every k candidate"):
        tuning.choose("k", "other", [cands[0], cands[0]], run)


@pytest.mark.parametrize("strategy", ("separate", "atomic"))
def test_attention_tuning_trials_leave_the_gradients_exact(monkeypatch, strategy):
    """With tuning on, the dK/dV and dQ passes time several candidates (trial launches, the atomic
    strategy's into a scratch accumulator), cache the fastest, and the gradients stay exact."""
    if CUDA:
        pytest.skip("the CPU variant (interpreter blocks, fake timings); the GPU tunes for real in test_gpu_*")
    from test_masked_attention_backward import Case, assert_close_rel

    from collider_kernels.triton import masked_attention_backward as tab

    monkeypatch.setattr(tuning, "ENABLED", True)
    monkeypatch.setattr(tab, "DQ_STRATEGY", strategy)
    times = iter([2.0, 1.0, 3.0, 5.0, 4.0, 6.0])
    trials = []

    def bench(fn):
        for _ in range(3):  # several trial launches per candidate, as graph timing does
            fn()
        trials.append(fn)
        return next(times)

    monkeypatch.setattr(tuning, "bench", bench)
    blocks = {"dkdv": [{"BLOCK_N": 32, "BLOCK_M": 16}, {"BLOCK_N": 16, "BLOCK_M": 16}, {"BLOCK_N": 64, "BLOCK_M": 16}],
              "dq": [{"BLOCK_M": 16, "BLOCK_N": 16}, {"BLOCK_M": 32, "BLOCK_N": 16}, {"BLOCK_M": 16, "BLOCK_N": 32}]}
    monkeypatch.setattr(tab, "dkdv_candidates", lambda head_dim: blocks["dkdv"])
    monkeypatch.setattr(tab, "dq_candidates", lambda head_dim: blocks["dq"])
    tuning.clear()
    try:
        case = Case(2, 50, 4, 2, 16, ("scattered", "runs"), torch.float16, seed=3, window=9, docs=2)
        res = ck.masked_attention_backward(*case.args()[:7], backend="triton", **case.public_kwargs())
        assert_close_rel(res, case.ref, 1e-2, f"tuned {strategy}")
        assert len(trials) == 6
        assert list(tuning.cache("masked_attention_backward.dkdv").values()) == [blocks["dkdv"][1]]
        assert list(tuning.cache("masked_attention_backward.dq").values()) == [blocks["dq"][1]]
        again = ck.masked_attention_backward(*case.args()[:7], backend="triton", **case.public_kwargs())
        assert len(trials) == 6  # the cached choice: no more timing
        for a, b in zip(res, again, strict=True):
            assert torch.equal(a, b)
    finally:
        tuning.clear()


@pytest.mark.gpu
def test_gpu_gemm_tuner_times_candidates_once_and_leaves_out_untouched(kc, monkeypatch):
    """With tuning on, the first call of a shape times several candidates (CUDA-graph replays into
    scratch), later calls reuse the choice, and an accumulating call adds into ``out`` once."""
    timed = []
    bench = tuning.bench
    monkeypatch.setattr(tuning, "ENABLED", True)
    tuning.clear()
    monkeypatch.setattr(tuning, "bench", lambda fn: timed.append(fn) or bench(fn))
    for _ in range(2):
        kc.weight_grad("triton", M=3000, K=512, N=264, n=2900, kind="repeats", row_pad=0,
                       dtype=torch.bfloat16, device="cuda", seed=1, out_dtype=torch.float32)
        kc.gather_matmul("triton", M=3000, K=512, N=264, n=2900, kind="sorted_subset", has_bias=True,
                         row_pad=0, dtype=torch.bfloat16, device="cuda", seed=2)
    assert len(tuning.cache("gathered_weight_grad")) == 1 and len(tuning.cache("gather_matmul")) == 1
    assert len(timed) >= 4  # several candidates per op, timed on the first call only
    n_timed = len(timed)
    kc.weight_grad("triton", M=3000, K=512, N=264, n=2900, kind="repeats", row_pad=0,
                   dtype=torch.bfloat16, device="cuda", seed=3, out_dtype=torch.float32)
    assert len(timed) == n_timed


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ("separate", "atomic"))
def test_gpu_attention_tuner_times_both_passes(monkeypatch, strategy):
    """bf16 on the GPU: the first call of a shape class tunes both passes (graph-timed trials),
    the result obeys the bf16 rule, later calls reuse the choice."""
    from test_masked_attention_backward import Case, assert_rule

    from collider_kernels.ops.masked_attention_backward import _masked_attention_backward_torch
    from collider_kernels.triton import masked_attention_backward as tab

    monkeypatch.setattr(tuning, "ENABLED", True)
    monkeypatch.setattr(tab, "DQ_STRATEGY", strategy)
    timed = []
    bench = tuning.bench
    monkeypatch.setattr(tuning, "bench", lambda fn: timed.append(fn) or bench(fn))
    tuning.clear()
    case = Case(2, 700, 12, 2, 128, ("scattered", "runs"), torch.bfloat16, seed=1, truth=torch.float32)
    res = ck.masked_attention_backward(*case.args()[:7], backend="triton")
    assert_rule(res, case.ref, _masked_attention_backward_torch(*case.args()), f"tuned {strategy}")
    assert len(timed) == len(tab.dkdv_candidates(128)) + len(tab.dq_candidates(128))
    ck.masked_attention_backward(*case.args()[:7], backend="triton")
    assert len(timed) == len(tab.dkdv_candidates(128)) + len(tab.dq_candidates(128))
