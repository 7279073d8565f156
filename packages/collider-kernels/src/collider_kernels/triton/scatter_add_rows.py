"""Triton row scatter-add ``out[index[i]] += src[i]`` (the embedding gradient).

Deterministic by default: rows are sorted into segments of equal destination (see
:func:`collider_kernels._segments.segment_plan`) and each program sums a segment in that fixed
order. When an fp32 ``out`` allows it and determinism is not asked for, fp32 atomics add the rows
in any order instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from collider_kernels._segments import scatter_rows_with, segment_plan
from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.triton import settings
from collider_kernels.triton.launch import Launcher
from collider_kernels.tuning import INTERPRET


@Launcher
@triton.jit
def _segment_sum_kernel(
    src_ptr, order_ptr, seg_start_ptr, seg_row_ptr, out_ptr,
    F, stride_src, stride_out,
    BLOCK_F: tl.constexpr,
):
    """One program per (segment of equal destination rows, column block): sum in sorted order."""
    seg = tl.program_id(0)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    start = tl.load(seg_start_ptr + seg)
    stop = tl.load(seg_start_ptr + seg + 1)
    row = tl.load(seg_row_ptr + seg).to(tl.int64)
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for i in range(start, stop):
        r = tl.load(order_ptr + i).to(tl.int64)
        acc += tl.load(src_ptr + r * stride_src + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    o = out_ptr + row * stride_out + offs_f
    acc += tl.load(o, mask=mask_f, other=0.0).to(tl.float32)
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask_f)


@Launcher
@triton.jit
def _atomic_scatter_kernel(
    src_ptr, index_ptr, out_ptr, n, F, stride_src, stride_out,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """``out[index[i]] += src[i]`` with fp32 atomics (summation order not fixed)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_r = offs_r < n
    mask = mask_r[:, None] & (offs_f < F)[None, :]
    rows = tl.load(index_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
    vals = tl.load(src_ptr + offs_r.to(tl.int64)[:, None] * stride_src + offs_f[None, :], mask=mask, other=0.0)
    tl.atomic_add(out_ptr + rows[:, None] * stride_out + offs_f[None, :], vals.to(tl.float32), mask=mask)



@register("scatter_add_rows", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES)
def scatter_add_rows_triton(src, index, out, deterministic):
    """``out[index[i]] += src[i]``; deterministic (sorted segments) unless fp32 ``out`` allows atomics."""

    def launch(src, index, target):
        n, F = src.shape
        block_f = 64 if INTERPRET else min(1024, settings.next_power_of_2(F))
        if not deterministic and target.dtype == torch.float32:
            block_r = 16
            grid = (settings.cdiv(n, block_r), settings.cdiv(F, block_f))
            _atomic_scatter_kernel[grid](
                src, index, target, n, F, src.stride(0), target.stride(0), BLOCK_R=block_r, BLOCK_F=block_f
            )
        else:
            order, seg_start, seg_row = segment_plan(index)
            grid = (seg_row.shape[0], settings.cdiv(F, block_f))
            _segment_sum_kernel[grid](
                src, order, seg_start, seg_row, target, F, src.stride(0), target.stride(0), BLOCK_F=block_f
            )

    return scatter_rows_with(src, index, out, launch)
