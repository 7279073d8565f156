"""Shared pieces of the Triton row-wise kernels: column layout, tile shapes, gathered row tiles, and
the SwiGLU product the forward and the backward (``with_output``) both compute."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from collider_kernels.triton import settings
from collider_kernels.tuning import INTERPRET


def unit_cols(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit column stride (any row stride)."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def elementwise_config(width: int) -> dict:
    """Tile of an elementwise row kernel (SwiGLU, GELU) for rows of ``width``: about 4096
    elements per program (512 under the interpreter)."""
    if INTERPRET:
        block_i = min(128, settings.next_power_of_2(width))
        return {"block_r": max(1, 512 // block_i), "block_i": block_i, "num_warps": 4}
    block_i = min(1024, settings.next_power_of_2(width))
    return {"block_r": max(1, 4096 // block_i), "block_i": block_i, "num_warps": 4}


def elementwise_grid(n: int, width: int, cfg: dict) -> tuple[int, int]:
    """Launch grid of an elementwise row kernel: (row blocks, column blocks)."""
    return (settings.cdiv(n, cfg["block_r"]), settings.cdiv(width, cfg["block_i"]))


@triton.jit
def row_tile(index_ptr, n, width, GATHER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The (BLOCK_R, BLOCK_C) tile of program (row block, column block): compact output rows,
    the input rows they read (``index`` rows when ``GATHER``), column offsets and the mask."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = offs_r < n
    mask = mask_r[:, None] & (offs_c < width)[None, :]
    rows = offs_r.to(tl.int64)
    if GATHER:
        src = tl.load(index_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
    else:
        src = rows
    return rows, src, offs_c[None, :], mask


@triton.jit
def silu_times(a, b, gate_ptr):
    """``silu(a)`` rounded to the dtype of ``gate_ptr``'s elements, times ``b``, in fp32: what
    ``F.silu(gate) * up`` computes before its result is rounded (``a``, ``b``: fp32 tiles)."""
    silu = (a / (1.0 + tl.exp(-a))).to(gate_ptr.dtype.element_ty).to(tl.float32)
    return silu * b
