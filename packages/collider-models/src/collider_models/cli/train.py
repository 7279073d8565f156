"""``collider-train``: token-filtered training of a preset model on the embedded default data.

Trains a small TinyLlama-architecture model on a synthetic language whose noise tokens
cannot be learned; each step keeps the top ``--keep`` share of tokens by score and
backpropagates through Collider. The default score is Rho-1's excess loss against a
reference model first trained briefly on the noise-free language. At the end it times the
dense masked-loss backward against the Collider backward on the same batch.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import collider_models
from collider_autograd import excess_loss, filtered_mean, select_random, select_top_k
from collider_models.data import SyntheticCorpus
from collider_models.timing import compare_backward

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collider-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tinyllama-small", choices=sorted(collider_models.PRESETS))
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--keep", type=float, default=0.6, help="share of tokens kept per batch (0, 1]")
    p.add_argument("--selection", default="excess", choices=["excess", "loss", "random"],
                   help="'excess': top-k of loss minus a reference model's loss (Rho-1); "
                        "'loss': top-k of the model's own loss; 'random': uniform")
    p.add_argument("--reference-steps", type=int, default=40,
                   help="training steps of the reference model on noise-free data ('excess')")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--timing-repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="folder for metrics.json")
    return p


def _select(token_loss, valid, args, gen, reference=None, ids=None, labels=None):
    if args.selection == "random":
        return select_random(token_loss.shape, args.keep, valid=valid, generator=gen).to(token_loss.device)
    scores = token_loss.detach()
    if args.selection == "excess":
        with torch.no_grad():
            scores = excess_loss(token_loss, reference.token_loss(ids, labels))
    return select_top_k(scores, args.keep, valid=valid)


def _train_reference(model, args, device):
    """A frozen copy of ``model`` trained on the noise-free language (the Rho-1 reference)."""
    reference = copy.deepcopy(model)
    clean = SyntheticCorpus(model.config.vocab_size, seed=args.seed, noise=0.0)
    opt = torch.optim.AdamW(reference.parameters(), lr=args.lr, weight_decay=0.0)
    for _ in tqdm(range(args.reference_steps), desc="reference", unit="step", file=sys.stdout):
        ids, labels = (t.to(device) for t in clean.batch(args.batch_size, args.seq_len))
        token_loss = reference.token_loss(ids, labels)
        loss = filtered_mean(token_loss, labels != -100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return reference.requires_grad_(False).eval()


def plot_history(history: list[dict], path: Path) -> bool:
    """Write the loss curves to ``path`` (PNG); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["mean_loss"] for h in history], label="loss over all tokens")
    ax.plot(steps, [h["filtered_loss"] for h in history], label="filtered loss (kept tokens)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 < args.keep <= 1.0:
        raise SystemExit(f"--keep must be in (0, 1], got {args.keep}")
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 2 or args.reference_steps < 0:
        raise SystemExit("--steps and --batch-size must be >= 1, --seq-len >= 2, --reference-steps >= 0")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = collider_models.from_preset(args.preset).to(device=device, dtype=_DTYPES[args.dtype])
    corpus = SyntheticCorpus(model.config.vocab_size, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"collider-train: {args.preset} ({n_params / 1e6:.1f}M params) on {device}, "
          f"B={args.batch_size} T={args.seq_len}, keep {args.keep:.0%} by {args.selection}")
    reference = _train_reference(model, args, device) if args.selection == "excess" else None
    history = []
    bar = tqdm(range(args.steps), desc="training", unit="step", file=sys.stdout)
    for step in bar:
        ids, labels = (t.to(device) for t in corpus.batch(args.batch_size, args.seq_len))
        token_loss = model.token_loss(ids, labels)  # (B, T) float32
        valid = labels != -100
        keep = _select(token_loss, valid, args, gen, reference, ids, labels)
        loss = filtered_mean(token_loss, keep)  # the one changed line
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mean_all = float(token_loss.detach()[valid].mean())
        history.append({"step": step, "filtered_loss": loss.item(), "mean_loss": mean_all})
        bar.set_postfix(filtered=f"{loss.item():.3f}", all=f"{mean_all:.3f}")
    ids, labels = (t.to(device) for t in corpus.batch(args.batch_size, args.seq_len))
    with torch.no_grad():
        keep = _select(model.token_loss(ids, labels), labels != -100, args, gen, reference, ids, labels)
    timing = compare_backward(model, ids, labels, keep, repeats=args.timing_repeats)
    print(f"\nloss over all tokens: {history[0]['mean_loss']:.3f} -> {history[-1]['mean_loss']:.3f}")
    print(f"backward on {device}, keep {timing['keep_fraction']:.0%} (median of {args.timing_repeats}):")
    print(f"  dense (masked loss)  {timing['masked']['backward']:9.1f} ms")
    print(f"  Collider             {timing['collider']['backward']:9.1f} ms   ratio {timing['backward_ratio']:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "history": history, "timing": timing}
    (args.out / "metrics.json").write_text(json.dumps(record, indent=2))
    print(f"metrics: {args.out / 'metrics.json'}")
    if plot_history(history, args.out / "loss.png"):
        print(f"loss curves: {args.out / 'loss.png'}")
    else:
        print("loss curves: install matplotlib (collider-models[plot]) for loss.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
