"""Where does a training step make the host wait for the GPU? Runs collider-bench's step (forward,
loss, top-k selection, backward) under ``torch.cuda.set_sync_debug_mode``, which reports every
synchronising CUDA call, and prints each one's Python call site with how often it was hit.

A synchronisation empties the GPU's queue of work: the kernels after it start only as fast as
the host launches them, so a step with one in every layer loses the host's head start in every
layer. The backward runs on the calling thread (``set_multithreading_enabled(False)``) so the
layers' Python is on the stack.

    python benchmarks/models/sync_points.py --preset phi-1.5 --json sync.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import traceback
import warnings
from pathlib import Path

import torch

import collider_models
from collider_models.cli.bench import _forward_loss, _inputs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", nargs="+", default=["tinyllama-1.1b", "qwen2.5-1.5b", "phi-1.5"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--modes", nargs="+", default=["collider", "masked"])
    p.add_argument("--json", type=Path, required=True)
    return p.parse_args(argv)


def _call_site(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frames of this project (else the innermost frames) as one line."""
    own = [f for f in stack if "collider" in f.filename and "sync_points" not in f.filename]
    frames = (own or stack)[-3:]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))


def sync_sites(step) -> dict[str, collections.Counter]:
    """Run ``loss = step()`` (forward) then ``loss.backward()``; per phase, call site -> syncs."""
    sites = {"forward": collections.Counter(), "backward": collections.Counter()}
    phase = "forward"

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[phase][_call_site(traceback.extract_stack()[:-1])] += 1

    with warnings.catch_warnings():  # restores showwarning and the filters
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss = step()
            phase = "backward"
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device("cuda")
    report = {"batch": args.batch, "seq": args.seq, "keep": args.keep, "torch": torch.__version__, "presets": {}}
    torch.autograd.set_multithreading_enabled(False)
    for preset in args.preset:
        torch.manual_seed(0)
        cfg = collider_models.preset_config(preset)
        model = collider_models.from_config(cfg).to(dev, torch.bfloat16)
        ids, labels, keep = _inputs(cfg["vocab_size"], args.batch, args.seq, args.keep, 0, dev)
        report["presets"][preset] = {}
        for mode in args.modes:
            step = functools.partial(_forward_loss, model, ids, labels, keep, mode, args.keep)
            for _ in range(2):  # warm-up: compilation and tuning may synchronise
                model.zero_grad(set_to_none=True)
                step().backward()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            sites = sync_sites(step)
            report["presets"][preset][mode] = {p: dict(c.most_common()) for p, c in sites.items()}
            for p, c in sites.items():
                print(f"{preset} {mode} {p}: {sum(c.values())} synchronisations", flush=True)
                for site, n in c.most_common():
                    print(f"    {n:4d} x {site}")
        del model
        torch.cuda.empty_cache()
    args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
