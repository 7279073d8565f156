"""Step time of Collider against the masked-loss baseline under DDP and FSDP2 (or on one GPU).

Runs the training job's own step (``collider_models.training.step.accumulate_gradients`` with
the job's optimizer, gradient clipping and bf16 autocast over fp32 master weights) on a random-init
preset fed random token ids, 60% of tokens kept by their own loss. Collider and masked-loss steps
alternate on the same model in one run; each step is timed with CUDA events on every process and a
step's time is the slowest process's. Medians after warm-up; ``--profile`` adds rank 0's
per-kernel device time of a few steps of each mode.

    torchrun --standalone --nproc-per-node 2 benchmarks/models/ddp_step_time.py --engine ddp --json out.json
    torchrun --standalone --nproc-per-node 2 benchmarks/models/ddp_step_time.py --engine fsdp --json out.json
    python benchmarks/models/ddp_step_time.py --engine single --json out.json   # one GPU, no wrapper
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import traceback
import warnings
from pathlib import Path

import torch

import collider_models
from collider_models.presets import preset_config
from collider_models.training import distributed
from collider_models.training.loop import MAX_GRAD_NORM, make_optimizer
from collider_models.training.step import Selection, accumulate_gradients

MODES = ("collider", "masked")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=("ddp", "fsdp", "single"))
    p.add_argument("--model", default="tinyllama-1.1b")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per process")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each mode")
    p.add_argument("--steps", type=int, default=15, help="timed steps of each mode")
    p.add_argument("--profile", type=Path, default=None, help="write rank 0's kernel table here")
    p.add_argument("--check-syncs", action="store_true",
                   help="list where one step of each mode makes the host wait for the GPU (rank 0)")
    p.add_argument("--json", type=Path)
    p.add_argument("--tabulate", type=Path, nargs="+", metavar="JSON",
                   help="print a markdown table of earlier results instead of running")
    args = p.parse_args(argv)
    if not args.tabulate and (args.engine is None or args.json is None):
        p.error("--engine and --json are required (or --tabulate)")
    return args


def markdown(reports: list[dict]) -> str:
    """A markdown table of ``reports`` (one row each): medians and the Collider / masked ratios."""
    rows = ["| engine | GPUs | sequences per GPU | Collider step ms | masked step ms | step ratio | "
            "fwd+bwd ratio | commit |", "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        m, q = r["median"], r["ratio_collider_over_masked"]
        rows.append(f"| {r['engine']} | {r['processes']} | {r['batch_size_per_process']} | "
                    f"{m['collider']['step_ms']:.1f} | {m['masked']['step_ms']:.1f} | {q['step_ms']:.3f} | "
                    f"{q['fwd_bwd_ms']:.3f} | {str(r.get('commit'))[:7]} |")
    return "\n".join(rows) + "\n"


def one_step(model, opt, ids, sel, d, step: int, mode: str) -> tuple[float, float]:
    """One optimizer step; (forward+backward ms, whole step ms) by CUDA events, slowest process."""
    start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    distributed.barrier(d)
    start.record()
    accumulate_gradients(model, [ids], sel, d, step=step, precision="bf16", masked_loss=mode == "masked")
    mid.record()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    opt.step()
    opt.zero_grad(set_to_none=True)
    end.record()
    torch.cuda.synchronize()
    times = torch.tensor([start.elapsed_time(mid), start.elapsed_time(end)], device=d.device)
    if d.active:
        torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)
    return tuple(times.tolist())


def host_syncs(model, opt, ids, sel, d, step: int, mode: str) -> dict[str, int]:
    """Where one step synchronises the host with the GPU: {"file:line <- file:line ...": count},
    from PyTorch's sync debug mode (the innermost frames of this project's code)."""
    found: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "collider" in f.filename or "benchmarks" in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[::-1][:4])
        found[where] = found.get(where, 0) + 1

    shown = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            one_step(model, opt, ids, sel, d, step, mode)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = shown
    return found


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tabulate:
        print(markdown([json.loads(Path(f).read_text()) for f in args.tabulate]), end="")
        return
    if args.engine != "single" and not distributed.launched():
        raise SystemExit(f"--engine {args.engine} runs under torchrun --nproc-per-node N")
    d = distributed.init("cuda")
    hf = preset_config(args.model)
    hf.update(vocab_size=args.vocab_size)
    torch.manual_seed(0)
    model = collider_models.from_config(hf).to(d.device)
    model = distributed.wrap(model, d, args.engine == "fsdp", "bf16")
    opt = make_optimizer(model, lr=1e-5, device=d.device)
    sel = Selection("loss", args.keep)
    gen = torch.Generator(device=d.device).manual_seed(1 + d.rank)
    times = {m: {"fwd_bwd_ms": [], "step_ms": []} for m in MODES}
    step = 0
    syncs = {}
    if args.check_syncs:
        for mode in MODES:
            for _ in range(2):  # the second step: tuning and compilation are done
                ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=d.device, generator=gen)
                syncs[mode] = host_syncs(model, opt, ids, sel, d, step, mode)
                step += 1
    for r in range(args.warmup + args.steps):
        order = MODES if r % 2 == 0 else MODES[::-1]  # alternate which mode goes first
        for mode in order:
            ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=d.device, generator=gen)
            fb, st = one_step(model, opt, ids, sel, d, step, mode)
            step += 1
            if r >= args.warmup:
                times[mode]["fwd_bwd_ms"].append(fb)
                times[mode]["step_ms"].append(st)
    if args.profile is not None:
        from torch.profiler import ProfilerActivity, profile

        tables = []
        for mode in MODES:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=d.device,
                                        generator=gen)
                    one_step(model, opt, ids, sel, d, step, mode)
                    step += 1
            table = prof.key_averages().table(sort_by="device_time_total", row_limit=30, max_name_column_width=70)
            tables.append(f"== {mode}: 3 steps, rank 0 ==\n{table}")
        if d.main:
            args.profile.write_text("\n\n".join(tables) + "\n")
    if d.main:
        med = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
        report = {
            "what": "Collider vs masked-loss optimizer step, the training job's step code; bf16 autocast, fp32 "
                    "master weights, fused AdamW on CUDA; random ids, keep by loss; CUDA events, slowest process",
            "engine": args.engine, "processes": d.world, "model": args.model, "vocab_size": args.vocab_size,
            "batch_size_per_process": args.batch_size, "seq_len": args.seq_len, "keep": args.keep,
            "warmup": args.warmup, "steps": args.steps,
            "device": torch.cuda.get_device_name(d.device), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": os.environ.get("COLLIDER_BENCH_COMMIT"),
            "median": med,
            "ratio_collider_over_masked": {k: med["collider"][k] / med["masked"][k] for k in ("fwd_bwd_ms", "step_ms")},
            "tokens_per_s": {m: d.world * args.batch_size * args.seq_len / (med[m]["step_ms"] / 1e3) for m in MODES},
            "host_syncs": syncs,
            "samples": times,
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"{args.engine} x{d.world}: step Collider {med['collider']['step_ms']:.1f} ms, masked "
              f"{med['masked']['step_ms']:.1f} ms (ratio {report['ratio_collider_over_masked']['step_ms']:.3f}); "
              f"fwd+bwd {med['collider']['fwd_bwd_ms']:.1f} vs {med['masked']['fwd_bwd_ms']:.1f} ms "
              f"(ratio {report['ratio_collider_over_masked']['fwd_bwd_ms']:.3f})", flush=True)
        for mode, places in syncs.items():
            print(f"host syncs of one {mode} step:", *(f"  {n} x {w}" for w, n in places.items()), sep="\n")
    distributed.shutdown(d)


if __name__ == "__main__":
    main()
