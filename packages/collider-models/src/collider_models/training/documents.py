"""Reading training text: ``.txt`` files (one document each) and ``.jsonl`` files (one
document per line, in its ``"text"`` field).

A ``.jsonl`` record may also mark character spans of its text, ``"marked": [[start, end], ...]``
(for example text known to be junk, as in the default corpus's corrupted lines); training then
reports which share of the marked and of the other tokens selection kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUFFIXES = (".txt", ".jsonl")


@dataclass
class Document:
    """A document's text and its marked character spans ``[start, end)``."""

    text: str
    marked: list[tuple[int, int]] = field(default_factory=list)


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


def _spans(value, text: str, where: str) -> list[tuple[int, int]]:
    ok = isinstance(value, list) and all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(i, int) for i in s) and 0 <= s[0] <= s[1] <= len(text)
        for s in value
    )
    if not ok:
        raise ValueError(f"{where}: \"marked\" must be a list of [start, end] character offsets into \"text\"")
    return [(s[0], s[1]) for s in value]


def read_documents(path: Path) -> Iterator[Document]:
    """The documents of one file: a ``.txt`` file is one document; a ``.jsonl`` file holds one
    JSON object with a string ``"text"`` field (and optionally ``"marked"``) per non-empty line."""
    if path.suffix == ".txt":
        yield Document(path.read_text(encoding="utf-8", errors="replace"))
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
            yield Document(text, _spans(record.get("marked", []), text, f"{path}:{number}"))


def read_all(paths: Sequence[Path]) -> list[Document]:
    """Every document of ``paths``, in order."""
    return [doc for p in paths for doc in read_documents(p)]
