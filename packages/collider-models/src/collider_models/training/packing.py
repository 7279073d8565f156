"""Packing tokenized documents into fixed-length training sequences, and the order in which a
run reads them.

Documents are joined with the end-of-sequence token into one stream that is cut into
``seq_len``-token sequences (the remainder is dropped). Without separate evaluation data,
every 20th sequence is held out for evaluation. :class:`SequenceOrder` walks the training
sequences epoch by epoch in a seeded random order; a run's data position is the number of
sequences it has consumed, so a resumed run reads exactly what the interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

HOLDOUT_EVERY = 20  # without evaluation data, sequence i is held out when i % 20 == 19


def _stream(parts: Sequence[Sequence], end, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, seq_len) of the parts joined, each followed by ``end``; the remainder is dropped."""
    total = sum(len(p) + 1 for p in parts)
    stream = torch.empty(total, dtype=dtype)
    at = 0
    for part in parts:
        stream[at : at + len(part)] = torch.as_tensor(part, dtype=dtype)
        stream[at + len(part)] = end
        at += len(part) + 1
    n = total // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def pack(docs_ids: Sequence[Sequence[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """(N, seq_len) int64 sequences of the documents joined by ``eos_id`` (each document is
    followed by it)."""
    return _stream(docs_ids, eos_id, seq_len, torch.int64)


def pack_marks(docs_marks: Sequence[Sequence[bool]], seq_len: int) -> torch.Tensor:
    """(N, seq_len) bool marks laid out as :func:`pack` lays out the tokens (EOS unmarked)."""
    return _stream(docs_marks, False, seq_len, torch.bool)


def token_marks(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], length: int) -> torch.Tensor:
    """(n,) bool: which tokens (character spans ``offsets``) overlap a marked span of a text
    of ``length`` characters."""
    chars = torch.zeros(length + 1, dtype=torch.int32)
    for start, end in spans:
        chars[start:end] = 1
    before = torch.cat([torch.zeros(1, dtype=torch.int64), chars.cumsum(0)])  # marked chars before i
    off = torch.as_tensor(offsets, dtype=torch.int64).view(-1, 2)
    return (before[off[:, 1]] - before[off[:, 0]]) > 0


@dataclass
class Packed:
    """Training and evaluation sequences, (N, T) int64 each, the stream's token count, and
    (when the data mark spans) which training tokens are marked, (N, T) bool."""

    train: torch.Tensor
    eval: torch.Tensor
    tokens: int
    train_marked: torch.Tensor | None = None


def split(sequences: torch.Tensor, eval_sequences: torch.Tensor | None, marked: torch.Tensor | None = None) -> Packed:
    """Training/evaluation split: the given evaluation sequences, else every
    :data:`HOLDOUT_EVERY`-th sequence."""
    tokens = sequences.numel()
    if eval_sequences is not None:
        return Packed(sequences, eval_sequences, tokens, marked)
    held = torch.arange(sequences.shape[0]) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    return Packed(sequences[~held], sequences[held], tokens, None if marked is None else marked[~held])


class SequenceOrder:
    """Which training sequences each step reads.

    Epoch ``e`` visits all ``n`` sequences in the order ``randperm(n)`` seeded by ``seed + e``.
    Global position ``q`` (sequences consumed so far by all processes) is sequence
    ``perm_{q // n}[q % n]``. One optimizer step reads ``world * grad_accum * batch``
    consecutive positions: process ``rank``'s micro-batch ``k`` is the ``batch`` positions at
    offset ``(rank * grad_accum + k) * batch``.
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("there are no training sequences")
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        """(count,) sequence indices at global positions ``start .. start + count - 1``."""
        out = []
        q = start
        while len(out) < count:
            epoch, j = divmod(q, self.n)
            take = min(count - len(out), self.n - j)
            out.extend(self._perm(epoch)[j : j + take].tolist())
            q += take
        return torch.tensor(out, dtype=torch.int64)

    def micro_batches(self, position: int, batch: int, grad_accum: int, rank: int, world: int) -> list[torch.Tensor]:
        """The ``grad_accum`` index tensors (batch,) of process ``rank`` for the step that starts
        at global ``position``."""
        base = position + rank * grad_accum * batch
        return [self.indices(base + k * batch, batch) for k in range(grad_accum)]
