"""Row scatter-add machinery shared by the kernel backends: sorted segments and the driver."""

from __future__ import annotations

from collections.abc import Callable

import torch


def segment_plan(index: torch.Tensor):
    """Sort ``index`` stably into segments of equal rows.

    Returns ``(order, seg_start, seg_row)``: source rows in summation order (n,), segment
    boundaries into ``order`` (S + 1,), and each segment's destination row (S,).
    """
    sorted_rows, order = torch.sort(index.to(torch.int64), stable=True)  # (n,), (n,)
    seg_row, counts = torch.unique_consecutive(sorted_rows, return_counts=True)  # (S,), (S,)
    seg_start = torch.zeros(seg_row.shape[0] + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(counts, 0, out=seg_start[1:])
    return order, seg_start, seg_row


def scatter_rows_with(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor,
                      launch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """``out[index[i]] += src[i]`` through ``launch(src, index, target)``, which gets unit column
    strides (``target`` is ``out`` or a contiguous copy, written back) and a contiguous index."""
    n, F = src.shape
    if n == 0 or F == 0:
        return out
    if src.stride(1) != 1:
        src = src.contiguous()
    target = out if out.stride(1) == 1 else out.contiguous()
    launch(src, index.contiguous(), target)
    if target is not out:
        out.copy_(target)
    return out
