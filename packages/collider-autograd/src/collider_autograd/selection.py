"""Token selection: which positions are kept (Rho-1 top-k, per-sequence top-k, threshold, random)."""

from __future__ import annotations

import torch


def _check_scores(scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.dim() != 2:
        raise TypeError(f"scores must be a 2-D (B, T) floating tensor, got {getattr(scores, 'shape', type(scores))}")
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    elif valid.dtype != torch.bool or valid.shape != scores.shape:
        raise ValueError(f"valid must be a bool tensor of shape {tuple(scores.shape)}")
    if bool(torch.isnan(scores[valid]).any()):
        raise ValueError("scores contain NaN at valid positions")
    return valid


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")


def select_top_k(
    scores: torch.Tensor, fraction: float, *, per: str = "batch", valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the highest-scoring ``fraction`` of valid positions.

    Args:
        scores: (B, T) scores, e.g. :func:`excess_loss`.
        fraction: share of valid positions to keep, in [0, 1].
        per: ``"batch"`` ranks all positions together (Rho-1); ``"sequence"`` keeps the same
            share in every sequence.
        valid: (B, T) bool, positions that may be kept (e.g. ``labels != -100``).

    Returns:
        (B, T) bool keep mask; ties are broken by position.
    """
    _check_fraction(fraction)
    valid = _check_scores(scores, valid)
    masked = scores.float().masked_fill(~valid, float("-inf"))
    if per == "batch":
        k = int(round(fraction * int(valid.sum())))
        keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        if k:
            keep[masked.reshape(-1).topk(k, sorted=False).indices] = True
        return keep.view(scores.shape)
    if per == "sequence":
        counts = (fraction * valid.sum(1).float()).round().long()  # (B,)
        order = masked.argsort(dim=1, descending=True, stable=True)  # (B, T)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
        return (ranks < counts[:, None]) & valid
    raise ValueError(f"per must be 'batch' or 'sequence', got {per!r}")


def select_threshold(scores: torch.Tensor, threshold: float, *, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Keep valid positions whose score is strictly above ``threshold``; (B, T) bool."""
    valid = _check_scores(scores, valid)
    return (scores > threshold) & valid


def select_random(
    shape: tuple[int, int], fraction: float, *, valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None, device=None,
) -> torch.Tensor:
    """Keep each valid position independently with probability ``fraction``; (B, T) bool."""
    _check_fraction(fraction)
    keep = torch.rand(shape, generator=generator, device=device) < fraction
    return keep if valid is None else keep & valid


def excess_loss(token_loss: torch.Tensor, reference_loss: torch.Tensor) -> torch.Tensor:
    """Rho-1 score: training model's loss minus a frozen reference model's, (B, T), no grad."""
    if token_loss.shape != reference_loss.shape:
        raise ValueError(f"reference_loss must have shape {tuple(token_loss.shape)}, got {tuple(reference_loss.shape)}")
    return token_loss.detach().float() - reference_loss.detach().float()
