"""Draw the committed benchmark results (benchmarks/results/*.json) as PNGs for the docs.

    python tools/plot_results.py            # writes docs/_static/*.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "_static"


def _save(fig, name: str) -> None:
    fig.tight_layout()
    fig.savefig(OUT / name, dpi=120)
    plt.close(fig)


def plot_cpu_crossover() -> None:
    data = json.loads((RESULTS / "cpu_crossover.json").read_text())
    rows = sorted(data["rows"], key=lambda r: r["keep"])
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot([r["keep"] for r in rows], [r["ratio"] for r in rows], "o-", label="Collider / dense backward")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="proportional to kept share")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xlabel("kept share of tokens")
    ax.set_ylabel("backward time ratio")
    meta = data["meta"]
    ax.set_title(f"CPU ({meta['threads']} threads), {meta['preset']}, B={meta['batch_size']} T={meta['seq_len']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, "cpu_crossover.png")


def plot_versus_liger() -> None:
    """Forward + backward time of the baseline users run today, our dense path and Collider."""
    data = json.loads((RESULTS / "e2e_step_h200.json").read_text())
    results = [r for r in data["results"] if "error" not in r and "baseline" in r["ratios"] and r["keep"] == 0.6]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.26
    for k, (label, get) in enumerate((
        ("transformers + Liger (Phi-1.5: plain transformers), loss-only", lambda r: r[r["ratios"]["baseline"]]),
        ("ours, masked loss (dense backward)", lambda r: r["masked"]),
        ("ours, Collider", lambda r: r["collider"]),
    )):
        xs = [i + (k - 1) * width for i in range(len(results))]
        fwd = [get(r)["forward_ms"] for r in results]
        bwd = [get(r)["backward_ms"] for r in results]
        bars = ax.bar(xs, fwd, width, label=label)
        ax.bar(xs, bwd, width, bottom=fwd, color=bars[0].get_facecolor(), alpha=0.55)
    ax.set_xticks(range(len(results)), [r["preset"] for r in results])
    ax.set_ylabel("forward (solid) + backward ms")
    env = data["environment"]
    ax.set_title(f"{env['device']}, B={data['batch']} T={data['seq']} {data['dtype']}, 40% filtered, "
                 f"liger-kernel {env.get('liger_kernel')}", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, "e2e_versus_liger_h200.png")


def plot_e2e() -> None:
    data = json.loads((RESULTS / "e2e_h200.json").read_text())
    shown = 0.6 if 0.6 in data["keep"] else data["keep"][0]  # one kept share per bar group
    results = [r for r in data["results"] if "error" not in r and r["keep"] == shown]
    names = [r["preset"] for r in results]
    modes = [("masked", "dense (masked loss)"), ("collider", "Collider"), ("ideal", "dense on kept share of T")]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.26
    for k, (mode, label) in enumerate(modes):
        xs = [i + (k - 1) * width for i in range(len(results))]
        ax.bar(xs, [r[mode]["backward_ms"] if mode in r else 0 for r in results], width, label=label)
    ax.set_xticks(range(len(results)), names)
    ax.set_ylabel("backward ms (median)")
    env = data["environment"]
    ax.set_title(f"{env['device']}, B={data['batch']} T={data['seq']} {data['dtype']}, keep {shown:.0%}",
                 fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, "e2e_backward_h200.png")


def plot_attention() -> None:
    data = json.loads((RESULTS / "attention_h200.json").read_text())
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for model in dict.fromkeys(r["model"] for r in data["rows"]):
        rows = sorted((r for r in data["rows"] if r["model"] == model and r["strategy"] == "separate"
                       and r.get("variant", "auto:default") == "auto:default"), key=lambda r: r["keep"])
        ax.plot([r["keep"] for r in rows], [r["ratio"] for r in rows], "o-", label=model)
    ax.plot([0.4, 1.0], [0.4, 1.0], "--", color="grey", label="proportional to kept share")
    ax.set_xlabel("kept share of tokens")
    ax.set_ylabel("masked / dense flash backward")
    ax.set_title("Masked attention backward (Triton) vs PyTorch flash, H200, B=8 T=2048 bf16", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, "attention_h200.png")


def plot_gemm() -> None:
    """Triton over cuBLAS on the compact matrix per layer shape at keep 0.6 (graph and eager)."""
    data = json.loads((RESULTS / "gemm_h200.json").read_text())
    short = {"TinyLlama-1.1B": "TL", "Qwen2.5-1.5B": "Qw", "Phi-1.5": "Phi"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, op, title in zip(axes, ("gather_matmul", "weight_grad"), ("gather-GEMM", "weight gradient"), strict=True):
        rows = [r for r in data["gemm"] if r["keep"] == 0.6 and r["op"] == op and "graph_tflops" in r["triton"]]
        xs = range(len(rows))
        for k, (metric, label) in enumerate((("graph_tflops", "kernel (CUDA graph)"), ("tflops", "eager call"))):
            ratio = [r["triton"][metric] / r["cublas_compact"][metric] for r in rows]
            ax.bar([x + (k - 0.5) * 0.4 for x in xs], ratio, 0.4, label=label)
        ax.axhline(0.9, color="black", lw=0.8, ls="--", label="0.9 target")
        ax.set_xticks(list(xs), [f"{short[r['model']]} {r['layers']}" for r in rows], rotation=60, fontsize=7,
                     ha="right")
        ax.set_title(f"{title}, keep 0.6", fontsize=9)
    axes[0].set_ylabel("Triton / cuBLAS on compact rows")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{data['meta']['gpu']}, bf16, 16384 token rows ({data['meta']['date']})", fontsize=9)
    _save(fig, "gemm_h200.png")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    plot_cpu_crossover()
    plot_e2e()
    plot_versus_liger()
    plot_attention()
    plot_gemm()
    print(f"wrote plots to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
