"""The Triton kernel shared by the RMSNorm and LayerNorm backwards, over (optionally gathered) rows.

A program owns a contiguous run of rows and holds a whole row in registers (the row reductions
need all of it); it writes ``dx`` per row and its partial ``dweight`` (and LayerNorm's ``dbias``)
sums to row ``pid`` of an fp32 (sums, programs, H) buffer, which a second kernel sums over the
programs (deterministic: the split depends only on the GPU and the shape, the order is fixed). Block shapes are fixed
heuristics of the row width (the kernel is memory-bound). Rows wider than
:data:`MAX_NORM_WIDTH` are out of its reach (:func:`too_wide`): ``backend="auto"`` takes the
torch backend for them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from collider_kernels.triton import settings
from collider_kernels.triton.launch import Launcher
from collider_kernels.triton.rows import unit_cols
from collider_kernels.tuning import INTERPRET

# Widest RMSNorm/LayerNorm row held in registers by one program.
MAX_NORM_WIDTH = 16384


def width_refusal(width: int) -> str | None:
    """Why a kernel holding whole rows cannot take rows of ``width`` (wider than
    :data:`MAX_NORM_WIDTH`), or None."""
    if width > MAX_NORM_WIDTH:
        return f"does not take rows wider than {MAX_NORM_WIDTH} (got {width})"
    return None


def too_wide(grad, x, weight, eps, index, residual_grad=None) -> str | None:
    """Why the backward kernel cannot take these arguments (:func:`width_refusal`), or None."""
    return width_refusal(x.shape[1])


@Launcher
@triton.jit
def _norm_bwd_kernel(
    grad_ptr, x_ptr, w_ptr, index_ptr, res_ptr, dx_ptr, part_ptr,
    n, H, rows_per_prog, eps, inv_h,  # inv_h = 1/H from the host: exact for H = 1
    stride_grad, stride_x, stride_res, stride_dx, stride_part,
    GATHER: tl.constexpr,  # row r is x row index[r]
    CENTER: tl.constexpr,  # LayerNorm (subtract the mean; dbias partials too), else RMSNorm
    ADD_RESIDUAL: tl.constexpr,  # dx += the residual branch's gradient row (same rows as grad)
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask_h = cols < H
    w = tl.load(w_ptr + cols, mask=mask_h, other=0.0).to(tl.float32)  # (BLOCK_H,)
    dw = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    db = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    start = pid * rows_per_prog
    stop = min(n, start + rows_per_prog)
    for r0 in range(start, stop, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < stop
        mask = mask_r[:, None] & mask_h[None, :]
        rows = offs_r.to(tl.int64)
        if GATHER:
            src = tl.load(index_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
        else:
            src = rows
        x = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + rows[:, None] * stride_grad + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if CENTER:
            xc = tl.where(mask, x - (tl.sum(x, axis=1) * inv_h)[:, None], 0.0)
        else:
            xc = x
        var = tl.sum(xc * xc, axis=1) * inv_h  # (BLOCK_R,) variance, or mean square
        rstd = tl.math.rsqrt(tl.where(mask_r, var + eps, 1.0))  # rows past the end stay finite when eps == 0
        xhat = xc * rstd[:, None]
        dxhat = g * w[None, :]
        proj = tl.sum(dxhat * xhat, axis=1) * inv_h  # (BLOCK_R,)
        if CENTER:
            dw += g * xhat
            db += g
            dx = rstd[:, None] * (dxhat - (tl.sum(dxhat, axis=1) * inv_h)[:, None] - xhat * proj[:, None])
        else:
            # RMSNorm's dweight sees the normalised row after the forward's cast to x's dtype.
            dw += g * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
            dx = rstd[:, None] * (dxhat - xhat * proj[:, None])
        if ADD_RESIDUAL:
            dx += tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    part = part_ptr + pid.to(tl.int64) * H + cols
    tl.store(part, tl.sum(dw, axis=0), mask=mask_h)
    if CENTER:
        tl.store(part + stride_part, tl.sum(db, axis=0), mask=mask_h)


@Launcher
@triton.jit
def _sum_parts_kernel(part_ptr, out_ptr, P, H, stride_s, stride_p, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    # grid (cdiv(H, BLOCK_H), sums): out[s, h] = sum over p of part[s, p, h], in a fixed order.
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    s = tl.program_id(1).to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & (cols < H)[None, :]
        acc += tl.load(part_ptr + s * stride_s + rows[:, None] * stride_p + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + s * H + cols, tl.sum(acc, axis=0), mask=cols < H)


def sum_parts(part: torch.Tensor) -> torch.Tensor:
    """(sums, programs, H) fp32 partial sums → (sums, H), summed over programs in a fixed order.

    One pass over the buffer with every column block in its own program: torch's ``sum(1)`` of
    this layout (a reduction over the middle dimension) takes several times longer."""
    sums, P, H = part.shape
    out = settings.alloc_output((sums, H), torch.float32, part.device)
    block_h = 16 if INTERPRET else 32
    _sum_parts_kernel[(settings.cdiv(H, block_h), sums)](
        part, out, P, H, part.stride(0), part.stride(1), BLOCK_P=16 if INTERPRET else 256, BLOCK_H=block_h,
        num_warps=4 if INTERPRET else 8,
    )
    return out


def norm_config(H: int) -> dict:
    """Rows per step, warps and programs per SM of the RMSNorm/LayerNorm kernel for width ``H``."""
    block_h = settings.next_power_of_2(H)
    if INTERPRET:
        return {"block_r": max(1, min(8, 1024 // block_h)), "num_warps": 4, "programs_per_sm": 2}
    block_r = max(1, min(16, 4096 // block_h))
    num_warps = max(4, min(16, block_r * block_h // 512))
    return {"block_r": block_r, "num_warps": num_warps, "programs_per_sm": 8}


def launch_norm_backward(grad, x, weight, eps, index, cfg, center: bool, residual_grad=None):
    """dx (n, H) and the fp32 parameter sums: (dweight,) for RMSNorm (``center`` False), (dweight,
    dbias) for LayerNorm; ``residual_grad`` (n, H) is added to dx in fp32 before its one rounding;
    ``cfg`` overrides :func:`norm_config` (block_r, num_warps, programs_per_sm)."""
    n, H = grad.shape
    sums = 2 if center else 1
    dx = settings.alloc_output((n, H), x.dtype, x.device)  # (n, H)
    if n == 0 or H == 0:
        return dx, *torch.zeros(sums, H, dtype=torch.float32, device=x.device)
    grad, x = unit_cols(grad), unit_cols(x)
    res = grad if residual_grad is None else unit_cols(residual_grad)
    weight = weight.contiguous()
    index = None if index is None else index.contiguous()
    cfg = {**norm_config(H), **(cfg or {})}
    block_r = cfg["block_r"]
    programs = max(1, min(settings.cdiv(n, block_r), cfg["programs_per_sm"] * settings.num_sms(x.device)))
    rows_per_prog = settings.cdiv(n, programs)
    programs = settings.cdiv(n, rows_per_prog)  # every program owns at least one row
    part = settings.alloc_output((sums, programs, H), torch.float32, x.device)  # partial sums, rows written once
    _norm_bwd_kernel[(programs,)](
        grad, x, weight, dx if index is None else index, res, dx, part,
        n, H, rows_per_prog, eps, 1.0 / H,
        grad.stride(0), x.stride(0), res.stride(0), dx.stride(0), part.stride(0),
        GATHER=index is not None, CENTER=center, ADD_RESIDUAL=residual_grad is not None,
        BLOCK_R=block_r, BLOCK_H=settings.next_power_of_2(H),
        num_warps=cfg["num_warps"],
    )
    return dx, *sum_parts(part)  # (H,) each, summed in a fixed order

