"""``collider-train``: token-filtered training of a preset or a Hugging Face checkpoint on text.

With no ``--data`` it runs the embedded default: a small Llama-architecture model trained from
scratch, with its own BPE tokenizer, on Shakespeare with a known share of corrupted lines; a
reference model is first trained on clean works, then every step keeps the tokens with the
highest excess loss (training loss minus reference loss) and backpropagates through Collider.
Under ``torchrun --nproc-per-node N`` the same command trains with DDP, or FSDP2 with ``--fsdp``.
"""

from __future__ import annotations

import argparse
import sys
import time

from collider_models.training import TrainConfig, run
from collider_models.training.config import DEFAULT_MODEL, LR_FINE_TUNE, LR_FROM_SCRATCH, PRECISIONS, SELECTIONS

_D = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collider-train", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a preset name (random init, BPE tokenizer trained on the data) or a Hugging Face folder")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help=".txt files (one document each) or .jsonl files with a 'text' field; "
                        "default: the embedded Shakespeare corpus")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/train-<date>-<time>)")
    p.add_argument("--eval-data", nargs="+", metavar="PATH",
                   help="held-out evaluation text (default: every 20th sequence of --data)")
    p.add_argument("--reference", metavar="MODEL",
                   help="reference model of --selection excess: a trained folder sharing the tokenizer, or a preset "
                        "trained first on --reference-data; 'none' for --selection loss|random")
    p.add_argument("--reference-data", nargs="+", metavar="PATH",
                   help="clean text to train the reference model on first, into DIR/reference (without "
                        "--reference, the reference starts as --model)")
    p.add_argument("--reference-steps", type=int, default=_D.reference_steps,
                   help="training steps of the reference model on --reference-data")
    p.add_argument("--selection", default=_D.selection, choices=SELECTIONS,
                   help="'excess': top-k of loss minus the reference's loss (Rho-1); 'loss': top-k of the "
                        "model's own loss; 'random': each token kept with probability --keep")
    p.add_argument("--keep", type=float, default=_D.keep, help="share of tokens kept, in (0, 1]")
    p.add_argument("--steps", type=int, default=_D.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=_D.batch_size, help="sequences per micro-batch and process")
    p.add_argument("--seq-len", type=int, default=_D.seq_len, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=_D.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float,
                   help=f"peak AdamW learning rate (default {LR_FROM_SCRATCH:g} for a preset, "
                        f"{LR_FINE_TUNE:g} for a checkpoint folder)")
    p.add_argument("--warmup", type=int, default=_D.warmup, help="linear warm-up steps before the cosine decay")
    p.add_argument("--precision", default=_D.precision, choices=PRECISIONS,
                   help="bf16: autocast to bfloat16, fp32 master weights and optimizer state")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--eval-every", type=int, default=_D.eval_every, help="steps between evaluations (0: at the end)")
    p.add_argument("--save-every", type=int, default=_D.save_every,
                   help="steps between checkpoints (0: only at the end and when stopped)")
    p.add_argument("--resume", action="store_true", help="continue from DIR's latest complete checkpoint")
    p.add_argument("--seed", type=int, default=_D.seed, help="seed of the initialisation, data order and selection")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 under torchrun (default: DDP)")
    p.add_argument("--vocab-size", type=int,
                   help="tokenizer size of a preset trained from scratch (default: the preset's vocab_size)")
    p.add_argument("--masked-loss", action="store_true",
                   help="use the plain masked-mean loss (dense backward) instead of filtered_mean: the baseline "
                        "to time Collider against")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed command-line arguments."""
    out = args.out or time.strftime("runs/train-%Y%m%d-%H%M%S")
    return TrainConfig(
        model=args.model, data=args.data, out=out, eval_data=args.eval_data, reference=args.reference,
        reference_data=args.reference_data, reference_steps=args.reference_steps, selection=args.selection,
        keep=args.keep, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup, precision=args.precision, device=args.device,
        eval_every=args.eval_every, save_every=args.save_every, resume=args.resume, seed=args.seed, fsdp=args.fsdp,
        vocab_size=args.vocab_size, masked_loss=args.masked_loss,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    cfg = config_from_args(parser.parse_args(argv))
    try:
        return run(cfg)
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
        print(f"collider-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C during a step
        print("\ncollider-train: interrupted; the latest complete checkpoint (if any) is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
