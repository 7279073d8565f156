"""Token selection: which positions are kept (Rho-1 top-k, per-sequence top-k, threshold, random)."""

from __future__ import annotations

import numbers

import torch


def _check_scores(scores: torch.Tensor, valid: torch.Tensor | None, validate: bool = True) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.dim() != 2:
        raise TypeError(f"scores must be a 2-D (B, T) floating tensor, got {getattr(scores, 'shape', type(scores))}")
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    elif not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != scores.shape:
        raise ValueError(f"valid must be a bool tensor of shape {tuple(scores.shape)}")
    elif valid.device != scores.device:
        raise ValueError(f"valid must be on {scores.device}, got {valid.device}")
    if validate and bool((torch.isnan(scores) & valid).any()):
        raise ValueError("scores contain NaN at valid positions")
    return valid


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")


def _rank_order(scores: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    """Positions along ``dim`` from best to worst: valid ones first by score (highest first, ties by
    position), invalid ones after all of them, whatever their scores (-inf or NaN included)."""
    order = scores.nan_to_num(nan=0.0).argsort(dim=dim, descending=True, stable=True)
    valid_first = (~valid.gather(dim, order)).to(torch.uint8).argsort(dim=dim, stable=True)
    return order.gather(dim, valid_first)


def top_k_counts(valid: torch.Tensor, fraction: float, *, per: str = "batch") -> torch.Tensor:
    """How many positions :func:`select_top_k` keeps, from the (B, T) bool ``valid`` alone (the
    scores never change it): ``round(fraction * valid positions)``, rounded half to even as
    Python's ``round``, over the batch (a (1,) tensor) or per sequence (``per="sequence"``: (B,)).
    A float64 tensor on ``valid``'s device; no device sync."""
    _check_fraction(fraction)
    if per == "batch":
        return (valid.sum().double() * fraction).round().reshape(1)
    if per == "sequence":
        return (valid.sum(1).double() * fraction).round()
    raise ValueError(f"per must be 'batch' or 'sequence', got {per!r}")


def select_top_k(
    scores: torch.Tensor, fraction: float, *, per: str = "batch", valid: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Keep the highest-scoring ``fraction`` of valid positions.

    Args:
        scores: (B, T) scores, e.g. :func:`excess_loss`; ``-inf``/``inf`` are ordinary scores.
        fraction: share of valid positions to keep, in [0, 1]; the count is rounded to the
            nearest integer (half to even).
        per: ``"batch"`` ranks all positions together (Rho-1); ``"sequence"`` keeps the same
            share of each sequence's valid positions.
        valid: (B, T) bool, positions that may be kept (e.g. ``labels != -100``). Invalid
            positions are never kept, whatever their scores.
        validate: check that no valid score is NaN (a device sync on CUDA). Without the check
            a NaN ranks as a score of 0. The selection itself never syncs.

    Returns:
        (B, T) bool keep mask; ties are broken by position (earlier first).
    """
    valid = _check_scores(scores, valid, validate)
    counts = top_k_counts(valid, fraction, per=per)  # (1,) or (B,)
    # per="batch" ranks one row of B*T positions
    flat_scores, flat_valid = (scores.reshape(1, -1), valid.reshape(1, -1)) if per == "batch" else (scores, valid)
    order = _rank_order(flat_scores, flat_valid, 1)  # (rows, cols) best first
    ranks = torch.empty_like(order)  # each position's place in the order
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=scores.device).expand_as(order))
    return ((ranks < counts[:, None]) & flat_valid).view(scores.shape)


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
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != tuple(shape)):
        raise ValueError(f"valid must be a bool tensor of shape {tuple(shape)}, got {valid.dtype} {tuple(valid.shape)}")
    keep = torch.rand(shape, generator=generator, device=device) < fraction
    return keep if valid is None else keep & valid.to(keep.device)


def excess_loss(token_loss: torch.Tensor, reference_loss: torch.Tensor) -> torch.Tensor:
    """Rho-1 score: training model's loss minus a frozen reference model's, (B, T), no grad."""
    if token_loss.shape != reference_loss.shape:
        raise ValueError(f"reference_loss must have shape {tuple(token_loss.shape)}, got {tuple(reference_loss.shape)}")
    return token_loss.detach().float() - reference_loss.detach().float()
