"""The shared benchmark timer: marks and elapsed milliseconds, the median time per call."""

import time

import pytest
import torch

from collider_kernels import timing


def test_cpu_timer_measures_perf_counter_time():
    timer = timing.Timer("cpu")
    start = timer.mark()
    time.sleep(0.02)
    ms = timer.elapsed_ms(start, timer.mark())
    assert 15 <= ms < 1000


def test_median_ms_on_cpu_counts_calls():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    ms = timing.median_ms(fn, device="cpu", repeats=3, calls=4)
    assert 1.5 <= ms < 100
    assert len(calls) == 1 + 3 * 4  # one warm-up call, then three batches of four
    calls.clear()
    timing.median_ms(fn, device="cpu", repeats=2, budget_ms=10.0)  # calls from the budget: 3 to 5
    assert 1 + 3 + 2 * 3 <= len(calls) <= 1 + 3 + 2 * 5


@pytest.mark.gpu
def test_gpu_timer_and_graph_timing():
    x = torch.randn(2048, 2048, device="cuda")
    timer = timing.Timer("cuda")
    start = timer.mark()
    y = x @ x
    assert timer.elapsed_ms(start, timer.mark()) > 0
    eager = timing.median_ms(lambda: x @ x)
    graph = timing.median_ms(lambda: torch.mm(x, x, out=y), graph=True)
    assert 0 < graph < 10 * eager and 0 < eager
    assert timing.graph_ms(lambda: torch.mm(x, x, out=y), calls=5, replays=2) > 0
