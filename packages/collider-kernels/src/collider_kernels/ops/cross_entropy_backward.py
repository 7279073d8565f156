"""Cross-entropy backward per row: ``(softmax(logits) - onehot(label)) * scale``, optionally in place
or over rows picked from a larger logits tensor."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_index, check_into, check_labels, check_logits, check_tensor
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import FLOAT_DTYPES, compute_dtype
from collider_kernels.ops.cross_entropy_forward import label_rows

_STAT_DTYPES = (torch.float32, torch.float64)


def cross_entropy_backward(
    logits: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int = -100,
    *,
    index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Gradient of ``sum(scale * loss)`` with respect to the logits of
    :func:`~collider_kernels.cross_entropy_forward`: ``(exp(logits - lse) - onehot(label)) * scale``.

    Computed in fp32 (fp64 when any input is fp64) from the forward's ``lse``; rows whose label
    is ``ignore_index`` get zeros whatever their ``scale`` and ``lse``. ``out`` may be ``logits``
    itself: the gradient then overwrites the logits (an LM head's backward turns a recomputed
    chunk of logits into its gradient without a second buffer). With ``index``, row ``i`` of the
    result is the gradient of row ``index[i]`` of ``logits`` (the kept rows of logits kept from
    the forward, read in place: no gathered copy). With ``validate=False`` a label out of
    ``[0, V)`` (other than ``ignore_index``) gives a NaN row instead of an error.

    Args:
        logits: (n, V) class scores of the forward (any row stride); (M, V) with ``index``.
        lse: (n,) fp32/fp64 logsumexp of each row (the forward's).
        labels: (n,) int64/int32 target class of each row, in ``[0, V)`` or ``ignore_index``.
        scale: (n,) fp32/fp64 gradient of each row's loss (e.g. 1/num_tokens, 0 for dropped rows).
        ignore_index: label of rows without a loss.
        index: optional (n,) int64/int32 rows of ``logits`` in ``[0, M)``; ``lse``, ``labels``,
            ``scale`` and the result then have one row per entry.
        out: (n, V) tensor to write into (``logits`` itself, or one not sharing its memory; with
            ``index``, never ``logits``' memory).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check the labels and the index values (costs a device sync on CUDA).

    Returns:
        dlogits (n, V) in ``logits.dtype``, or ``out``.
    """
    check_logits(logits)
    n = logits.shape[0]
    if index is not None:
        check_index("index", index, n, logits.device, validate=validate)
        n = index.shape[0]
    check_labels(labels, logits, ignore_index, validate=validate, rows=None if index is None else n)
    what = "row of logits" if index is None else "index entry"
    for name, t in (("lse", lse), ("scale", scale)):
        check_tensor(name, t, ndim=1, dtypes=_STAT_DTYPES, device=logits.device)
        if t.shape[0] != n:
            raise ValueError(f"{name} must have one entry per {what} ({n}), got {t.shape[0]}")
    if out is not None and index is not None:
        check_tensor("out", out, dtypes=FLOAT_DTYPES)
        check_into("out", out, (n, logits.shape[1]), out.dtype, logits.device, {"logits": logits})
    elif out is not None:
        check_out(out, logits)
    dtypes = (logits.dtype, lse.dtype, scale.dtype, logits.dtype if out is None else out.dtype)
    fn = resolve_backend("cross_entropy_backward", backend, logits.device, dtypes)
    return fn(logits, lse, labels, scale, ignore_index, out, index)


def check_out(out, logits) -> None:
    """``out`` (n, V) on logits' device, either ``logits`` itself or not sharing its memory."""
    check_tensor("out", out, ndim=2, dtypes=FLOAT_DTYPES, device=logits.device)
    if out.shape != logits.shape:
        raise ValueError(f"out must have logits' shape {tuple(logits.shape)}, got {tuple(out.shape)}")
    same_view = out.data_ptr() == logits.data_ptr() and out.stride() == logits.stride() and out.dtype == logits.dtype
    if not same_view and out.numel() and out.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
        raise ValueError("out must be logits itself (in place) or not share logits' memory")


@register("cross_entropy_backward", "torch")
def _cross_entropy_backward_torch(logits, lse, labels, scale, ignore_index, out, index=None):
    if index is not None:
        logits = logits.index_select(0, index)  # (n, V)
    ct = compute_dtype(logits, lse, scale)
    valid, bad, target = label_rows(labels, logits.shape[1], ignore_index)
    grad = torch.exp(logits.to(ct) - lse.to(ct)[:, None])  # (n, V) softmax
    rows = torch.arange(logits.shape[0], device=logits.device)
    grad[rows, target] -= valid.to(ct)  # minus the one-hot label where a loss is due
    grad *= scale.to(ct)[:, None]
    grad.masked_fill_(~valid[:, None], 0.0).masked_fill_(bad[:, None], float("nan"))
    if out is None:
        return grad.to(logits.dtype)
    return out.copy_(grad)
