"""Benchmark timing shared by the kernel tuner, the kernel benchmarks and ``collider-bench``.

* :class:`Timer`: marks and the milliseconds between two of them (CUDA events on a GPU,
  ``time.perf_counter`` on CPU), for timing the phases of a step.
* :func:`median_ms`: milliseconds per call of a function, the median of timed batches after a
  warm-up, either eager (calls queued back to back, as in a training step) or as CUDA-graph
  replays (device time without the host's launch cost).
* :func:`graph_ms`: the CUDA-graph timing underneath, as the tuner uses it.
"""

from __future__ import annotations

import statistics
import time

import torch


class Timer:
    """Elapsed milliseconds between marks: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        """A point in time (a recorded CUDA event on the current stream, or a perf_counter value)."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        """Milliseconds from mark ``start`` to mark ``end`` (waits for ``end`` on the GPU)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def synchronize(self) -> None:
        """Wait for the device's queued work (nothing to wait for on CPU)."""
        if self.cuda:
            torch.cuda.synchronize()


def graph_ms(fn, *, calls: int = 10, replays: int = 3, reduce=min) -> float:
    """Milliseconds per call of ``fn``: ``calls`` calls captured in one CUDA graph, each replay
    timed with CUDA events, ``reduce`` (``min``, ``statistics.median``...) over ``replays``.

    ``fn`` runs once eagerly first, so compilation and out-of-resource errors happen outside the
    capture. CUDA only; must not be called while the current stream is being captured.
    """
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up on a side stream, as capture expects
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    timer = Timer("cuda")
    times = []
    for _ in range(replays):
        start = timer.mark()
        graph.replay()
        times.append(timer.elapsed_ms(start, timer.mark()) / calls)
    del graph
    return reduce(times)


def median_ms(fn, *, device: torch.device | str = "cuda", graph: bool = False, repeats: int = 5,
              calls: int | None = None, budget_ms: float = 20.0, max_calls: int = 100) -> float:
    """Milliseconds per call of ``fn``: the median over ``repeats`` timed batches after a warm-up.

    Eager (default): each batch is ``calls`` calls queued back to back between two
    :class:`Timer` marks, so launch overhead overlaps the device work as in a training step;
    ``calls`` defaults to what fits ``budget_ms`` (3 to ``max_calls``, from three timed calls).
    ``graph=True`` (CUDA): each batch is a replay of ``calls`` (default 20) calls captured in a
    CUDA graph (:func:`graph_ms`): device time without the host's launch cost.
    """
    if graph:
        return graph_ms(fn, calls=calls or 20, replays=repeats, reduce=statistics.median)
    timer = Timer(device)
    fn()
    timer.synchronize()
    if calls is None:
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        timer.synchronize()
        est = (time.perf_counter() - t0) * 1e3 / 3
        calls = max(3, min(max_calls, int(budget_ms / max(est, 1e-3))))
    times = []
    for _ in range(repeats):
        start = timer.mark()
        for _ in range(calls):
            fn()
        times.append(timer.elapsed_ms(start, timer.mark()) / calls)
    return statistics.median(times)
