"""What a run records: ``metrics.jsonl`` (one line per step and per evaluation), the summary
JSON and ``loss.png``."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends records to ``metrics.jsonl``; a resumed run first drops the records of steps
    after its checkpoint (they are trained again)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.records: list[dict] = []
        if resume_step is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record["step"] <= resume_step:
                        self.records.append(record)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def train_records(self) -> list[dict]:
        return [r for r in self.records if "loss" in r]

    def eval_records(self) -> list[dict]:
        return [r for r in self.records if "eval_loss" in r]


def plot(log: MetricsLog, path: Path, title: str) -> bool:
    """Training (kept tokens, all tokens) and held-out loss curves, titled with the data;
    False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train, evals = log.train_records(), log.eval_records()
    marked = [r for r in train if "kept_share_marked" in r]
    if marked:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
        ax2.plot([r["step"] for r in marked], [r["kept_share_marked"] for r in marked], lw=1,
                 label="kept share of marked tokens")
        ax2.plot([r["step"] for r in marked], [r["kept_share_unmarked"] for r in marked], lw=1,
                 label="kept share of other tokens")
        ax2.set_ylim(0, 1)
        ax2.set_xlabel("step")
        ax2.legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.set_xlabel("step")
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["loss_all"] for r in train], lw=1, label="training loss, all tokens")
        ax.plot(steps, [r["loss"] for r in train], lw=1, label="training loss, kept tokens")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_summary(path: Path, summary: dict) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
