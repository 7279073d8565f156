"""The Triton kernel the rotary forward and backward share: rotate the first ``R`` dims of each
head by the angle of the row's position (forward) or apply the transpose of that map (backward:
the rotation by minus the angle), pass the rest through.

A program takes a (rows, heads) block of ``(n, H, D)`` rows, loads the rows' cos/sin once
(gathered by position) and each head's two rotated halves and its pass-through dims as separate
contiguous tiles (16-byte vector loads where strides allow): each input element is read once
and each output element written once, in fp32. The forward rounds each product and the sum to
the output dtype, as torch's op-by-op ``x * cos + rotate_half(x) * sin`` does (and disables
multiply-add contraction, so fp32 matches too); the backward rounds once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from collider_kernels.triton import settings
from collider_kernels.triton.launch import Launcher
from collider_kernels.tuning import INTERPRET


@triton.jit
def _rounded(t, ROUND: tl.constexpr, y_ptr):
    # t rounded to y's dtype when ROUND (the forward's rounding of each product), in fp32.
    if ROUND:
        t = t.to(y_ptr.dtype.element_ty).to(tl.float32)
    return t


@Launcher
@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, pos_ptr, y_ptr,
    n, H,
    stride_xn, stride_xh, stride_c, stride_s, stride_yn, stride_yh,
    R: tl.constexpr, D: tl.constexpr,  # rotated dims (even, <= D) and head dim
    TRANSPOSE: tl.constexpr,  # the backward: rotate by minus the angle
    ROUND: tl.constexpr,  # round each product and the sum to y's dtype (the forward)
    PASS: tl.constexpr,  # copy dims R..D (not when y is x: they are already there)
    BLOCK_R: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    # grid (cdiv(n, BLOCK_R), cdiv(H, BLOCK_HD)); x/y (n, H, D) unit last stride; cos/sin (P, R).
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_h = tl.program_id(1) * BLOCK_HD + tl.arange(0, BLOCK_HD)
    mask_r = offs_r < n
    mask_rh = mask_r[:, None, None] & (offs_h < H)[None, :, None]  # (BLOCK_R, BLOCK_HD, 1)
    rows = offs_r.to(tl.int64)
    heads = offs_h.to(tl.int64)
    x_vec = x_ptr + rows[:, None, None] * stride_xn + heads[None, :, None] * stride_xh  # (BLOCK_R, BLOCK_HD, 1)
    y_vec = y_ptr + rows[:, None, None] * stride_yn + heads[None, :, None] * stride_yh
    out_ty = y_ptr.dtype.element_ty
    if R > 0:
        half = R // 2
        d = tl.arange(0, BLOCK_HALF)
        pos = tl.load(pos_ptr + rows, mask=mask_r, other=0).to(tl.int64)  # (BLOCK_R,)
        m_t = mask_r[:, None] & (d < half)[None, :]
        c_row = cos_ptr + pos[:, None] * stride_c + d[None, :]  # (BLOCK_R, BLOCK_HALF)
        s_row = sin_ptr + pos[:, None] * stride_s + d[None, :]
        c1 = tl.load(c_row, mask=m_t, other=0.0).to(tl.float32)[:, None, :]  # (BLOCK_R, 1, BLOCK_HALF)
        c2 = tl.load(c_row + half, mask=m_t, other=0.0).to(tl.float32)[:, None, :]
        s1 = tl.load(s_row, mask=m_t, other=0.0).to(tl.float32)[:, None, :]
        s2 = tl.load(s_row + half, mask=m_t, other=0.0).to(tl.float32)[:, None, :]
        if TRANSPOSE:  # dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
            s_first = -s2
            s2 = -s1
            s1 = s_first
        m = mask_rh & (d < half)[None, None, :]
        x1 = tl.load(x_vec + d[None, None, :], mask=m, other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_HD, BLOCK_HALF)
        x2 = tl.load(x_vec + half + d[None, None, :], mask=m, other=0.0).to(tl.float32)
        # y = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        y1 = _rounded(x1 * c1, ROUND, y_ptr) - _rounded(x2 * s1, ROUND, y_ptr)
        y2 = _rounded(x2 * c2, ROUND, y_ptr) + _rounded(x1 * s2, ROUND, y_ptr)
        tl.store(y_vec + d[None, None, :], y1.to(out_ty), mask=m)
        tl.store(y_vec + half + d[None, None, :], y2.to(out_ty), mask=m)
    if D > R and PASS:
        p = tl.arange(0, BLOCK_PASS)
        m = mask_rh & (p < D - R)[None, None, :]
        xp = tl.load(x_vec + R + p[None, None, :], mask=m, other=0.0)
        tl.store(y_vec + R + p[None, None, :], xp.to(out_ty), mask=m)


def rotary_config(H: int, D: int) -> dict:
    """Block of (rows, heads) per program for ``H`` heads of dim ``D``: the largest power of two
    of heads dividing ``H`` (at most 16), rows for about 4096 elements per program (512 under
    the interpreter)."""
    block_hd = min(16, H & -H) if H > 0 else 1
    elements = 512 if INTERPRET else 4096
    return {"block_r": max(1, elements // (block_hd * settings.next_power_of_2(D))), "block_hd": block_hd,
            "num_warps": 4}


def launch_rotary(x, cos, sin, positions, out_dtype, *, transpose: bool, cfg: dict | None = None, out=None):
    """y (n, H, D) in ``out_dtype``: x rotated by the angles of ``positions`` (forward, each
    product and sum rounded to ``out_dtype``) or by minus them (``transpose``: the backward,
    rounded once); ``cfg`` overrides :func:`rotary_config` (block_r, block_hd, num_warps).
    ``out``: an (n, H, D) tensor with unit last stride to write y into; it may be ``x`` (each
    program reads its tile before writing it; the pass-through dims are then left as they are,
    which on an H200 took a Phi-1.5-shaped in-place call from 44-48 us to 14 us; 26 us into a separate
    output)."""
    n, H, D = x.shape
    R = cos.shape[1]
    y = settings.alloc_output((n, H, D), out_dtype, x.device) if out is None else out  # (n, H, D)
    if n == 0 or H == 0 or D == 0:
        return y
    if x.stride(2) != 1:
        x = x.contiguous()
    cos = cos if cos.stride(1) == 1 else cos.contiguous()
    sin = sin if sin.stride(1) == 1 else sin.contiguous()
    in_place = y.data_ptr() == x.data_ptr() and y.stride() == x.stride() and y.dtype == x.dtype
    cfg = {**rotary_config(H, D), **(cfg or {})}
    grid = (settings.cdiv(n, cfg["block_r"]), settings.cdiv(H, cfg["block_hd"]))
    _rotary_kernel[grid](
        x, cos, sin, positions.contiguous(), y,
        n, H, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), y.stride(0), y.stride(1),
        R=R, D=D, TRANSPOSE=transpose, ROUND=not transpose, PASS=not in_place,
        BLOCK_R=cfg["block_r"], BLOCK_HD=cfg["block_hd"], BLOCK_HALF=settings.next_power_of_2(max(1, R // 2)),
        BLOCK_PASS=settings.next_power_of_2(max(1, D - R)), num_warps=cfg["num_warps"], enable_fp_fusion=False,
    )
    return y
