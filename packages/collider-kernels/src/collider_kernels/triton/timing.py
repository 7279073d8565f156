"""Device time of a callable without its host launch cost (CUDA graph replay).

The GEMM tuner and the kernel benchmarks use it: a narrow GEMM runs for less time on the GPU than
Python takes to launch it, so timing eager calls would rank candidates by host overhead.
"""

from __future__ import annotations

import torch


def graph_time_ms(fn, *, calls: int = 10, replays: int = 3, reduce=min) -> float:
    """Milliseconds per call of ``fn``: ``calls`` calls captured in one CUDA graph, each replay
    timed with CUDA events, ``reduce`` (``min``, ``statistics.median``...) over ``replays``.

    ``fn`` runs once eagerly first, so compilation and out-of-resource errors happen outside the
    capture. Must not be called while the current stream is being captured.
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
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / calls)
    del graph
    return reduce(times)
