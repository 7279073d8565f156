"""Reading training text: ``.txt`` files (one document each) and ``.jsonl`` files (one
document per line, in its ``"text"`` field)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

SUFFIXES = (".txt", ".jsonl")


def check_paths(paths: Sequence[str | os.PathLike], option: str) -> list[Path]:
    """``paths`` as existing ``.txt``/``.jsonl`` files; a clear error naming ``option`` otherwise."""
    if not paths:
        raise ValueError(f"{option}: give at least one .txt or .jsonl file")
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise ValueError(f"{option}: {str(p)!r} is not a file")
        if p.suffix not in SUFFIXES:
            raise ValueError(f"{option}: {str(p)!r} must end in .txt or .jsonl")
        out.append(p)
    return out


def read_documents(path: Path) -> Iterator[str]:
    """The documents of one file: a ``.txt`` file is one document; a ``.jsonl`` file holds one
    JSON object with a string ``"text"`` field per non-empty line."""
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON object ({e.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: expected a JSON object with a string \"text\" field")
            yield text


def read_all(paths: Sequence[Path]) -> list[str]:
    """Every document of ``paths``, in order."""
    return [doc for p in paths for doc in read_documents(p)]
