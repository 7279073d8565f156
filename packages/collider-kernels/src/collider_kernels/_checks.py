"""Argument validation shared by the public ops: errors name the argument and what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= num_rows:
            raise IndexError(f"{name} must lie in [0, {num_rows}), got values in [{lo}, {hi}]")
