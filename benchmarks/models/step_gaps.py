"""Where does the GPU wait during a training step? One profiled forward + loss + backward per mode
(collider-bench's own step), its kernels laid out on the GPU timeline, and every idle gap between
two kernels charged to the host operation that launched the kernel after it.

A gap whose next kernel was launched after the previous kernel had finished is the host's doing
("host late"): the GPU ran out of queued work. Summed per phase and per launching operation (the
outermost profiled CPU operation around the launch: an autograd node in the backward), the table
says which layers' host code to make cheaper, or whether the step is GPU-bound already; the
busiest kernels of each phase (total time, calls) say where a GPU-bound step's time goes.

    python benchmarks/models/step_gaps.py --preset tinyllama-1.1b --json gaps.json
"""

from __future__ import annotations

import argparse
import bisect
import collections
import functools
import gzip
import json
import os
import tempfile
from pathlib import Path

import torch

import collider_models
from collider_models.cli.bench import _forward_loss, _inputs

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tinyllama-1.1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--modes", nargs="+", default=["masked", "collider"])
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--trace", type=Path, default=None, help="also write the gzipped Chrome trace of the last mode")
    return p.parse_args(argv)


def _top_level(ops: list[dict]) -> tuple[list[float], list[dict]]:
    """The operations of one thread not nested in another, sorted, with their start times."""
    out, end = [], -1.0
    for op in sorted(ops, key=lambda e: (e["ts"], -e.get("dur", 0))):
        if op["ts"] >= end:
            out.append(op)
            end = op["ts"] + op.get("dur", 0)
    return [o["ts"] for o in out], out


def analyse(trace: dict, backward_start_us: float, top: int) -> dict:
    """Busy, idle and host-late time per phase, and idle time per launching operation."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    kernels = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    ops_by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op":
            ops_by_thread[e["tid"]].append(e)
    top_ops = {tid: _top_level(ops) for tid, ops in ops_by_thread.items()}

    def launcher(launch: dict | None) -> str:
        if launch is None:
            return "(no launch record)"
        starts, ops = top_ops.get(launch["tid"], ([], []))
        i = bisect.bisect_right(starts, launch["ts"]) - 1
        if i >= 0 and launch["ts"] <= ops[i]["ts"] + ops[i].get("dur", 0):
            return ops[i]["name"].replace("autograd::engine::evaluate_function: ", "")
        return "(outside any operation)"

    phases = {p: {"kernels": 0, "busy_ms": 0.0, "idle_ms": 0.0, "host_late_ms": 0.0, "by_op": collections.Counter(),
                  "by_kernel": collections.Counter(), "launches": collections.Counter()}
              for p in ("forward", "backward")}
    prev_end = None
    for k in kernels:
        launch = launches.get(k.get("args", {}).get("correlation"))
        phase = "backward" if launch is not None and launch["ts"] >= backward_start_us else "forward"
        ph = phases[phase]
        ph["kernels"] += 1
        ph["busy_ms"] += k.get("dur", 0) / 1e3
        ph["by_kernel"][k["name"][:90]] += k.get("dur", 0) / 1e3
        ph["launches"][k["name"][:90]] += 1
        if prev_end is not None and k["ts"] > prev_end:
            gap = (k["ts"] - prev_end) / 1e3
            ph["idle_ms"] += gap
            if launch is not None and launch["ts"] + launch.get("dur", 0) > prev_end:
                ph["host_late_ms"] += gap
            ph["by_op"][launcher(launch)] += gap
        prev_end = max(prev_end or 0.0, k["ts"] + k.get("dur", 0))
    for ph in phases.values():
        ph["by_op"] = dict(ph["by_op"].most_common(top))
        ph["by_kernel"] = {name: {"ms": ms, "calls": ph["launches"][name]}
                           for name, ms in ph["by_kernel"].most_common(2 * top)}
        del ph["launches"]
    return phases


def profile_step(model, ids, labels, keep, mode: str, select: float) -> tuple[dict, float]:
    """Chrome trace of one step and the host time (trace clock, µs) at which the backward began."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        loss = _forward_loss(model, ids, labels, keep, mode, select)
        with torch.profiler.record_function("collider.backward_start"):
            pass
        loss.backward()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    marks = [e["ts"] for e in trace["traceEvents"] if e.get("name") == "collider.backward_start"]
    return trace, marks[0]


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = collider_models.preset_config(args.preset)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = collider_models.from_config(cfg)
    torch.set_default_dtype(previous)
    ids, labels, keep = _inputs(cfg["vocab_size"], args.batch, args.seq, args.keep, 0, dev)
    report = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "keep": args.keep,
              "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "modes": {}}
    for mode in args.modes:
        step = functools.partial(_forward_loss, model, ids, labels, keep, mode, args.keep)
        for _ in range(3):  # warm-up (tuning, compilation, allocator)
            model.zero_grad(set_to_none=True)
            step().backward()
        trace, start = profile_step(model, ids, labels, keep, mode, args.keep)
        report["modes"][mode] = analyse(trace, start, args.top)
        for phase, ph in report["modes"][mode].items():
            print(f"{mode:9s} {phase:8s} kernels {ph['kernels']:5d} busy {ph['busy_ms']:7.1f} ms "
                  f"idle {ph['idle_ms']:6.1f} ms (host late {ph['host_late_ms']:6.1f} ms)", flush=True)
            for name, ms in ph["by_op"].items():
                print(f"    {ms:6.2f} ms idle before kernels launched by {name}")
            for name, k in ph["by_kernel"].items():
                print(f"    {k['ms']:6.2f} ms busy in {k['calls']:4d} x {name}")
        if args.trace is not None:
            with gzip.open(args.trace, "wt") as f:
                json.dump(trace, f)
    model.zero_grad(set_to_none=True)
    args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
