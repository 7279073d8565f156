"""Argument validation shared by the public ops: errors name the argument and what was expected."""

from __future__ import annotations

import torch

from collider_kernels.dtypes import FLOAT_DTYPES


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_index(name: str, index, num_rows: int, device, *, validate: bool = True) -> None:
    """``index`` is a 1-D int64/int32 tensor of row numbers in ``[0, num_rows)``."""
    check_tensor(name, index, ndim=1, dtypes=(torch.int64, torch.int32), device=device)
    if validate and index.numel() > 0:
        check_index_values(name, index, num_rows)


def check_index_values(name: str, index: torch.Tensor, num_rows: int) -> None:
    """Every entry of ``index`` lies in ``[0, num_rows)`` (reads the values: a device sync on CUDA,
    so no backward pass calls it)."""
    lo, hi = torch.stack(torch.aminmax(index)).tolist()
    if lo < 0 or hi >= num_rows:
        raise IndexError(f"{name} must lie in [0, {num_rows}), got values in [{lo}, {hi}]")


def check_into(name: str, t, shape: tuple, dtype: torch.dtype, device, inputs: dict, same_as=None) -> None:
    """``t`` is a tensor of ``shape`` and ``dtype`` on ``device`` with unit last stride: a buffer
    an op writes its result into (any other strides, e.g. a view of a larger buffer). It shares no
    memory with the op's ``inputs`` (name → tensor), except that it may be exactly ``same_as`` (the
    same view: an op that works in place)."""
    check_tensor(name, t, dtypes=(dtype,), device=device)
    if tuple(t.shape) != tuple(shape) or (t.numel() > 1 and t.stride(-1) != 1):
        raise ValueError(f"{name} must be {tuple(shape)} with unit last stride, got {tuple(t.shape)} "
                         f"with strides {t.stride()}")
    if t.numel() == 0:
        return
    storage = t.untyped_storage().data_ptr()
    for other_name, other in inputs.items():
        if other is None or other.numel() == 0 or other.untyped_storage().data_ptr() != storage:
            continue
        if other is same_as and other.data_ptr() == t.data_ptr() and other.stride() == t.stride():
            continue
        exact = f" or be {other_name} itself" if other is same_as else ""
        raise ValueError(f"{name} must not share memory with {other_name}{exact} (the op reads it while writing)")


def check_row_grad(grad, x, index, *, validate: bool, x_name: str = "x") -> None:
    """``grad`` (n, F) holds the rows ``index`` of ``x`` (M, F), or all M rows when index is None."""
    check_tensor("grad", grad, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    if index is None:
        rows = x.shape[0]
    else:
        check_index("index", index, x.shape[0], x.device, validate=validate)
        rows = index.shape[0]
    if tuple(grad.shape) != (rows, x.shape[1]):
        what = f"{x_name}'s rows" if index is None else "one row per index entry"
        raise ValueError(f"grad must be ({rows}, {x.shape[1]}) ({what}), got {tuple(grad.shape)}")


def check_norm_params(x, weight, eps) -> float:
    """x (M, H), weight (H,) and eps >= 0 of a normalisation; returns ``float(eps)``."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be ({x.shape[1]},) to match x, got {tuple(weight.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return float(eps)


def check_norm_args(grad, x, weight, eps, index, *, validate: bool) -> tuple:
    """grad (n, H) of the rows ``index`` of x (M, H), weight (H,), eps >= 0 of a normalisation
    backward; returns the arguments of its implementations, ``(grad, x, weight, float(eps), index)``."""
    eps = check_norm_params(x, weight, eps)
    check_row_grad(grad, x, index, validate=validate)
    return grad, x, weight, eps, index


def check_same_shape(name: str, t, like_name: str, like) -> None:
    """``t`` has the shape of ``like``."""
    if t.shape != like.shape:
        raise ValueError(f"{name} must have {like_name}'s shape {tuple(like.shape)}, got {tuple(t.shape)}")


def check_labels(labels, logits, ignore_index, *, validate: bool, rows: int | None = None) -> None:
    """labels (n,) int64/int32 of the rows of logits (n, V) (or of ``rows`` rows picked from it),
    each in ``[0, V)`` or equal to ``ignore_index`` (values checked when ``validate``: a device
    sync on CUDA)."""
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32), device=logits.device)
    n, V = logits.shape
    what = "row of logits"
    if rows is not None:
        n, what = rows, "index entry"
    if labels.shape[0] != n:
        raise ValueError(f"labels must have one entry per {what} ({n}), got {labels.shape[0]}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if validate and n:
        check_label_values(labels, V, ignore_index)


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every entry of ``labels`` (any shape) lies in ``[0, num_classes)`` or equals
    ``ignore_index``; an ``IndexError`` naming the first bad value otherwise (a device sync on CUDA)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise IndexError(f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}, got {value}")


def check_logits(logits) -> None:
    """logits (n, V) floating, with at least one class."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one column (class), got shape "
                         f"{tuple(logits.shape)}")


def check_attention_masks(batch: int, seqlen: int, device, *, window=None, key_start=None,
                          validate: bool = True) -> None:
    """``window``: None or an int >= 1; ``key_start``: None or a (B, T) integer tensor with
    ``0 <= key_start[b, t] <= t``, non-decreasing in ``t`` (values checked when ``validate``)."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1 (keys each query sees, itself included), got {window!r}")
    if key_start is None:
        return
    check_tensor("key_start", key_start, ndim=2, dtypes=(torch.int64, torch.int32), device=device)
    if tuple(key_start.shape) != (batch, seqlen):
        raise ValueError(f"key_start must be ({batch}, {seqlen}), got {tuple(key_start.shape)}")
    if validate and key_start.numel():
        t = torch.arange(seqlen, device=key_start.device)
        if not bool(((key_start >= 0) & (key_start <= t)).all()):
            raise ValueError("key_start must satisfy 0 <= key_start[b, t] <= t (a query sees itself)")
        if seqlen > 1 and not bool((key_start[:, 1:] >= key_start[:, :-1]).all()):
            raise ValueError("key_start must be non-decreasing along each sequence (contiguous documents)")


def check_rotary_args(name: str, x, cos, sin, positions, *, validate: bool) -> None:
    """``x`` (n, H, D) rows (``name``: "x" or "grad"), cos/sin (P, R) tables with R even and
    <= D, positions (n,) int64/int32 in ``[0, P)`` (checked when ``validate``)."""
    check_tensor(name, x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("cos", cos, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("sin", sin, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.shape[1] % 2 or cos.shape[1] > x.shape[2]:
        raise ValueError(f"cos/sin width must be even and <= head dim {x.shape[2]}, got {cos.shape[1]}")
    check_index("positions", positions, cos.shape[0], x.device, validate=validate)
    if positions.shape[0] != x.shape[0]:
        raise ValueError(f"positions must have one entry per row of {name} ({x.shape[0]}), got {positions.shape[0]}")
