"""A seeded synthetic language with learnable structure and unlearnable noise, so token
filtering has something to filter: quick training data for tests (``collider-train`` reads
real text, see :mod:`collider_models.training`)."""

from __future__ import annotations

import torch


class SyntheticCorpus:
    """Sequences from a random sparse bigram chain, with a share of uniformly random tokens.

    Each token has ``branching`` likely successors; with probability ``noise`` a position is
    replaced by a uniform random token (loss that no model can reduce).

    Args:
        vocab_size: number of token ids.
        seed: fixes the chain; batches are drawn from their own generator.
        branching: successors per token.
        noise: share of positions replaced by uniform noise.
    """

    def __init__(self, vocab_size: int, seed: int = 0, branching: int = 4, noise: float = 0.3):
        if vocab_size < branching + 1:
            raise ValueError(f"vocab_size must exceed branching={branching}, got {vocab_size}")
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got {noise}")
        gen = torch.Generator().manual_seed(seed)
        self.vocab_size, self.noise = vocab_size, noise
        rows = [torch.randperm(vocab_size, generator=gen)[:branching] for _ in range(vocab_size)]
        self.successors = torch.stack(rows)  # (V, branching) likely next tokens
        self.gen = torch.Generator().manual_seed(seed + 1)

    def batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), each (B, T); ``labels[:, t]`` is the token after position t,
        and the last position's label is -100 (ignored)."""
        B, T, g = batch_size, seq_len + 1, self.gen
        tokens = torch.empty(B, T, dtype=torch.int64)
        tokens[:, 0] = torch.randint(0, self.vocab_size, (B,), generator=g)
        choice = torch.randint(0, self.successors.shape[1], (B, T), generator=g)
        noise = torch.rand(B, T, generator=g) < self.noise
        random_tokens = torch.randint(0, self.vocab_size, (B, T), generator=g)
        for t in range(1, T):
            nxt = self.successors[tokens[:, t - 1], choice[:, t]]
            tokens[:, t] = torch.where(noise[:, t], random_tokens[:, t], nxt)
        ids = tokens[:, :-1].clone()
        labels = tokens[:, 1:].clone()
        labels[:, -1] = -100
        return ids, labels
