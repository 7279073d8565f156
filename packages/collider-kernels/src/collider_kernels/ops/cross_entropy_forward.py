"""Cross-entropy forward per row: the logsumexp of each row of logits and the row's loss."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_labels, check_logits
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import upcast


def cross_entropy_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``lse = logsumexp(logits.float())`` and ``loss = lse - logits[label]``.

    Rows whose label is ``ignore_index`` have loss 0 (their ``lse`` is still computed). The
    Triton kernel reads each row once (an online logsumexp over blocks of the vocabulary) and
    equals the torch backend up to the order of the sum. With ``validate=False`` a label out of
    ``[0, V)`` (other than ``ignore_index``) gives a NaN loss instead of an error.

    Args:
        logits: (n, V) rows of class scores (any row stride).
        labels: (n,) int64/int32 target class of each row, in ``[0, V)`` or ``ignore_index``.
        ignore_index: label of rows without a loss.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check the labels (costs a device sync on CUDA).

    Returns:
        ``(loss, lse)``, each (n,) in fp32 (fp64 for fp64 logits): the natural-log logsumexp is
        what :func:`~collider_kernels.cross_entropy_backward` takes.
    """
    check_logits(logits)
    check_labels(labels, logits, ignore_index, validate=validate)
    fn = resolve_backend("cross_entropy_forward", backend, logits.device, (logits.dtype,))
    return fn(logits, labels, ignore_index)


def label_rows(labels: torch.Tensor, V: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(valid, bad, target)`` of each row: a loss is due (label is not ``ignore_index``), the
    label is out of ``[0, V)`` though due, and the label clamped into range (a safe index)."""
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= V))
    return valid, bad, labels.clamp(0, V - 1).long()


@register("cross_entropy_forward", "torch")
def _cross_entropy_forward_torch(logits, labels, ignore_index):
    x = upcast(logits)  # (n, V) fp32 (fp64)
    lse = torch.logsumexp(x, dim=-1)  # (n,)
    valid, bad, target = label_rows(labels, logits.shape[1], ignore_index)
    picked = x.gather(1, target[:, None]).squeeze(1)  # (n,)
    loss = torch.where(valid, lse - picked, 0.0).masked_fill_(bad, float("nan"))
    return loss, lse
