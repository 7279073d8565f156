"""Where does a backward step spend its GPU time? torch.profiler over one masked-loss and one
Collider backward of a preset (bf16, CUDA); prints the top kernels of each.

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
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            loss.backward()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows)
        report.append(f"== {args.preset} {mode} backward ==\n{table}")
    text = "\n".join(report[2:])  # the second (warm) pass of each mode
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
