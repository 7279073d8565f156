"""At which kept fraction does the Collider backward (torch backend) beat the dense
masked-loss backward on CPU? Interleaved medians over keep fractions; writes JSON + markdown.

    python benchmarks/models/cpu_crossover.py --out benchmarks/results/cpu_crossover
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
from tqdm import tqdm

import collider_models
from collider_models.timing import compare_backward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tinyllama-small")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fractions", default="1.0,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2")
    p.add_argument("--out", type=Path, required=True, help="path prefix for .json and .md")
    args = p.parse_args()
    torch.manual_seed(0)
    model = collider_models.from_preset(args.preset)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (args.batch_size, args.seq_len))
    labels = torch.randint(0, V, (args.batch_size, args.seq_len))
    rows = []
    for frac in tqdm([float(f) for f in args.fractions.split(",")], desc="keep fractions"):
        keep = torch.rand(args.batch_size, args.seq_len) < frac
        r = compare_backward(model, ids, labels, keep, repeats=args.repeats)
        rows.append({"keep": frac, "masked_ms": r["masked"]["backward"], "collider_ms": r["collider"]["backward"],
                     "ratio": r["backward_ratio"]})
    # Largest keep below 1.0 from which Collider wins at every smaller measured keep (at keep 1.0
    # filtered_mean emits a dense gradient, so both run the same dense backward).
    crossover = None
    for r in sorted((r for r in rows if r["keep"] < 1.0), key=lambda r: r["keep"]):
        if r["ratio"] >= 1.0:
            break
        crossover = r["keep"]
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "preset": args.preset,
            "preset_shape": {k: v for k, v in collider_models.preset_config(args.preset).items()
                             if k.endswith(("_size", "_layers", "_heads"))},
            "batch_size": args.batch_size, "seq_len": args.seq_len, "repeats": args.repeats}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                         "collider_faster_at_keep_up_to": crossover}, indent=2))
    lines = [f"# CPU backward: Collider (torch backend) vs dense masked loss — {meta['date']}", "",
             f"{args.preset}, B={args.batch_size}, T={args.seq_len}, fp32, torch {meta['torch']}, "
             f"{meta['threads']} threads, median of {args.repeats} interleaved repeats.", "",
             "| keep | dense ms | Collider ms | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['keep']:.1f} | {r['masked_ms']:.1f} | {r['collider_ms']:.1f} | {r['ratio']:.2f} |" for r in rows]
    lines += ["", f"Collider's backward is faster at every measured keep up to {crossover} "
              "(keep 1.0 runs the same dense backward in both modes)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
