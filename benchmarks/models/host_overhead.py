"""Host (Python + launch) time of one training step's forward and backward, Collider against the
masked-loss baseline, with bf16 parameters or fp32 parameters under bf16 autocast.

A batch so small that the GPU finishes each kernel before the host launches the next makes
wall time the host's time. Compare it with the device time of a full-size step (ddp_step_time.py,
collider-bench): where the host takes longer, the step is host-bound. The forward and loss are
collider-bench's (top-k of the token loss keeps 60%, no device sync before the backward).
``--cprofile`` writes the hottest Python functions of Collider's backward.

    python benchmarks/models/host_overhead.py --json out.json [--cprofile out.txt]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import collider_models
from collider_models.cli.bench import _forward_loss
from collider_models.presets import preset_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tinyllama-1.1b")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--params", nargs="+", default=["bf16", "fp32+autocast"], choices=["bf16", "fp32+autocast"])
    p.add_argument("--head-start-ms", type=float, default=0.0,
                   help="keep the GPU busy this long before each backward (a spin kernel), so the host "
                        "launches ahead: a backward whose GPU time then drops was host-bound")
    p.add_argument("--cprofile", type=Path, default=None)
    return p.parse_args(argv)


KEEP = 0.6  # share of tokens kept by top-k of the token loss


def _all_kept(ids: torch.Tensor) -> torch.Tensor:
    return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)


def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles ``torch.cuda._sleep`` spins per millisecond (measured)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm-up
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def phases(model, ids, mode: str, autocast: bool, head_start: int = 0) -> tuple[float, ...]:
    """(forward ms, backward ms, backward host ms, backward GPU ms, forward host ms), each phase
    synchronised.

    Wall times, except the GPU time: a phase's host time is the time until its call returned (its
    kernels launched, not all run); the backward's GPU time runs from the end of a
    ``head_start``-cycle spin kernel queued before it (the host's head start) to its last kernel.
    """
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else nullcontext()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with ctx:
        loss = _forward_loss(model, ids, ids, _all_kept(ids), mode, select=KEEP)  # collider-bench's step
    t_fwd_host = time.perf_counter()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    if head_start:
        torch.cuda._sleep(head_start)
    start.record()
    loss.backward()
    end.record()
    t_host = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return ((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t_host - t1) * 1e3, start.elapsed_time(end),
            (t_fwd_host - t0) * 1e3)


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device("cuda")
    hf = preset_config(args.model)
    ids = torch.randint(0, hf["vocab_size"], (args.batch_size, args.seq_len), device=dev)
    head_start = round(args.head_start_ms * _sleep_cycles_per_ms())
    report = {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "head_start_ms": args.head_start_ms, "device": torch.cuda.get_device_name(dev),
              "torch": torch.__version__, "results": {}}
    for params in args.params:
        torch.manual_seed(0)
        model = collider_models.from_config(hf).to(dev, torch.bfloat16 if params == "bf16" else torch.float32)
        autocast = params != "bf16"
        for mode in ("collider", "masked"):
            for _ in range(3):
                phases(model, ids, mode, autocast)
            runs = [phases(model, ids, mode, autocast, head_start) for _ in range(args.repeats)]
            fwd, bwd, bwd_host, bwd_gpu, fwd_host = (statistics.median(r[i] for r in runs) for i in range(5))
            report["results"][f"{params} {mode}"] = {"forward_ms": fwd, "forward_host_ms": fwd_host,
                                                     "backward_ms": bwd, "backward_host_ms": bwd_host,
                                                     "backward_gpu_ms": bwd_gpu}
            print(f"{params:14s} {mode:9s} forward {fwd:6.1f} ms (host done after {fwd_host:6.1f} ms), "
                  f"backward {bwd:6.1f} ms (host done after {bwd_host:6.1f} ms; GPU {bwd_gpu:6.1f} ms)", flush=True)
        if args.cprofile is not None and params == "bf16":
            prof = cProfile.Profile()
            # The backward runs on the calling thread (not autograd's device thread), so the
            # profiler sees the layers' Python backward code.
            torch.autograd.set_multithreading_enabled(False)
            for _ in range(5):
                loss = _forward_loss(model, ids, ids, _all_kept(ids), "collider", select=KEEP)
                torch.cuda.synchronize()
                prof.enable()
                loss.backward()
                torch.cuda.synchronize()
                prof.disable()
                model.zero_grad(set_to_none=True)
            torch.autograd.set_multithreading_enabled(True)
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text)
            stats.sort_stats("tottime").print_stats(45)
            stats.sort_stats("cumulative").print_stats(60)
            args.cprofile.write_text(text.getvalue())
        del model
    args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
