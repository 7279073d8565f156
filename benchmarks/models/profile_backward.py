"""Where does a backward step spend its GPU time? torch.profiler over one masked-loss and one
Collider backward of a preset (bf16, CUDA); prints the top kernels of each, then the top
operators and autograd nodes by the GPU time of everything they launched.

    python benchmarks/models/profile_backward.py --preset tinyllama-1.1b --out profile.txt
"""

from __future__ import annotations

import argparse

import torch

import collider_models
from collider_autograd import filtered_mean
from collider_models.reference import masked_mean


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tinyllama-1.1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = collider_models.from_preset(args.preset).to("cuda", torch.bfloat16)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (args.batch, args.seq), device="cuda")
    labels = torch.randint(0, V, (args.batch, args.seq), device="cuda")
    keep = torch.rand(args.batch, args.seq, device="cuda") < args.keep
    report = []
    for mode in ("masked", "collider", "masked", "collider"):
        model.zero_grad(set_to_none=True)
        token_loss = model.token_loss(ids, labels)
        loss = filtered_mean(token_loss, keep) if mode == "collider" else masked_mean(token_loss, keep)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            loss.backward()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70)
        ops = events.table(sort_by="cuda_time_total", row_limit=2 * args.rows, max_name_column_width=70)
        report.append(f"== {args.preset} {mode} backward: kernels ==\n{kernels}\n"
                      f"== {args.preset} {mode} backward: operators (GPU time incl. children) ==\n{ops}")
    text = "\n".join(report[2:])  # the second (warm) pass of each mode
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
