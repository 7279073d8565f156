"""Timing, error and problem size shared by the kernel benchmarks (run them as scripts: this folder is
on sys.path)."""

import statistics
import time

import torch

from collider_kernels.triton.timing import graph_time_ms

TOKENS = 16384  # token rows of the GEMM benchmarks (B=8, T=2048)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def time_ms(fn, *, batches: int = 5, budget_ms: float = 20.0, max_reps: int = 100) -> float:
    """Time per call of ``fn`` in ms: calls queued back to back between two CUDA events (launch
    overhead overlaps the GPU work, as in a training step), median over ``batches`` after a warm-up."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3 / 3
    reps = max(3, min(max_reps, int(budget_ms / max(est, 1e-3))))
    times = []
    for _ in range(batches):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / reps)
    return statistics.median(times)



def graph_ms(fn, *, reps: int = 20, batches: int = 5) -> float:
    """Device time per call of ``fn`` in ms without host launch cost: ``reps`` calls captured in one
    CUDA graph, replays timed with CUDA events, median over ``batches``."""
    return graph_time_ms(fn, calls=reps, replays=batches, reduce=statistics.median)
