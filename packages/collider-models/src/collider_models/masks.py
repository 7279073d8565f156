"""Padding and packed documents: what each token of a (B, T) batch sees, and its rotary position.

:func:`layout` turns the ``transformers``-style inputs (``attention_mask`` for padding,
``position_ids`` restarting per document) and an explicit per-token ``document_ids`` into a
:class:`Layout`: the rotary positions, and for every query the first key it may attend to
(``key_start``), which :func:`collider_autograd.causal_attention` honours in the forward and in
the masked backward. A query attends to the keys ``key_start .. t`` of its own row (and of its
layer's sliding window), so

* right padding needs no mask at all (real tokens never look ahead);
* left padding starts the real tokens' keys after the padding;
* packed documents start each document's keys at the document's first token, so no token
  attends across a document boundary.

Padding between the real tokens of one document cannot be expressed this way and is
refused. Padded queries attend to the keys of the segment they trail; their outputs are never
used and their labels are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Layout:
    """How the tokens of a (B, T) batch relate.

    Attributes:
        positions: rotary positions, (T,) when every sequence has the same, else (B, T).
        key_start: (B, T) int64 first key index each query attends to; ``None`` when it is 0
            for every real token (plain causal attention).
        real: (B, T) bool, False at padding; ``None`` without padding.
        new_doc: (B, T) bool, True where a document other than the row's first begins;
            ``None`` without packed documents.
    """

    positions: torch.Tensor
    key_start: torch.Tensor | None = None
    real: torch.Tensor | None = None
    new_doc: torch.Tensor | None = None


def _check_tokens(name: str, t, shape: tuple[int, int], device, *, is_mask: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    ok = t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) or (
        is_mask and (t.dtype == torch.bool or t.is_floating_point())
    )
    if not ok:
        kinds = "an integer, bool or floating" if is_mask else "an integer"
        raise TypeError(f"{name} must be {kinds} tensor, got {t.dtype}")
    if t.dim() == 2 and t.shape[0] == 1 and shape[0] != 1 and t.shape[1] == shape[1]:
        t = t.expand(shape)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have input_ids' shape {shape}, got {tuple(t.shape)}")
    return t.to(device)


def _starts(boundary: torch.Tensor) -> torch.Tensor:
    """(B, T) bool boundaries → (B, T) index of the latest boundary at or before each t."""
    T = boundary.shape[1]
    idx = torch.arange(T, device=boundary.device).expand_as(boundary)
    return torch.where(boundary, idx, torch.zeros_like(idx)).cummax(dim=1).values


def shared_rows(positions: torch.Tensor) -> torch.Tensor:
    """(B, T) positions → (T,) when every row holds the same, else unchanged."""
    if positions.shape[0] > 0 and bool((positions == positions[:1]).all()):
        return positions[0]
    return positions


def layout(
    shape: tuple[int, int],
    device,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    past: int = 0,
) -> Layout:
    """The :class:`Layout` of a batch of ``shape`` (B, T).

    Args:
        shape: (B, T) of ``input_ids``.
        device: where the tensors live.
        attention_mask: (B, T) 1 for real tokens, 0 for padding (left, right, or between
            documents).
        position_ids: (B, T) or (1, T) rotary positions, as ``transformers`` takes them. A
            position that does not follow the previous one by 1 starts a new document (the
            rule ``transformers`` uses to detect packed sequences).
        document_ids: (B, T) a document id per token; a change of id starts a new document
            whose rotary positions restart at 0 (unless ``position_ids`` are given).
        past: positions already processed before these (plain positions continue from it).

    Raises:
        ValueError / TypeError: malformed inputs, or padding between the real tokens of one
            document.
    """
    B, T = shape = tuple(shape)
    real = new_doc = None
    if attention_mask is not None:
        mask = _check_tokens("attention_mask", attention_mask, shape, device, is_mask=True)
        if mask.dtype != torch.bool:
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError(
                    "attention_mask must hold 1 (token) or 0 (padding); for packed documents pass "
                    "document_ids or position_ids that restart per document"
                )
            mask = mask != 0
        if not bool(mask.all()):
            real = mask
    boundary = torch.zeros(shape, dtype=torch.bool, device=device)
    if document_ids is not None:
        docs = _check_tokens("document_ids", document_ids, shape, device)
        boundary[:, 1:] |= docs[:, 1:] != docs[:, :-1]
    if position_ids is not None:
        pos = _check_tokens("position_ids", position_ids, shape, device).long()
        if pos.numel() and int(pos.min()) < 0:
            raise ValueError("position_ids must be >= 0")
        boundary[:, 1:] |= (pos[:, 1:] - pos[:, :-1]) != 1
        positions = shared_rows(pos)
    elif document_ids is not None:
        positions = shared_rows(torch.arange(T, device=device) - _starts(boundary))  # restart per document
    else:
        positions = torch.arange(past, past + T, device=device)
    if bool(boundary.any()):
        new_doc = boundary
    if real is None and new_doc is None:
        return Layout(positions)
    # A segment starts at t=0, at a new document and where real tokens follow padding; padding
    # trails the segment before it, so key_start never decreases along a row and right padding
    # alone needs no mask.
    seg = boundary.clone()
    seg[:, 0] = True
    if real is not None:
        seg[:, 1:] |= real[:, 1:] & ~real[:, :-1]
        # A real token right after padding whose previous real token is of the same document
        # (no document boundary between them) would have to skip the padding in between.
        idx = torch.arange(T, device=device).expand(shape)
        prev = torch.where(real, idx, torch.full_like(idx, -1)).cummax(1).values  # last real index <= t
        prev = torch.cat([torch.full_like(prev[:, :1], -1), prev[:, :-1]], 1)  # ... < t
        doc = boundary.long().cumsum(1)
        hole = real & (prev >= 0) & (prev < idx - 1) & (doc == doc.gather(1, prev.clamp_min(0)))
        if bool(hole.any()):
            b, t = (int(i) for i in hole.nonzero()[0])
            raise ValueError(
                f"attention_mask pads inside a document (sequence {b}, position {t} follows padding that follows "
                "real tokens of the same document); only left or right padding, or padding between documents "
                "marked by document_ids / position_ids, is supported"
            )
    key_start = _starts(seg)
    if not bool(key_start.any()):
        key_start = None
    return Layout(positions, key_start, real, new_doc)
