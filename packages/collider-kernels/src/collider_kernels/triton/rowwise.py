"""Triton row-wise backwards: SwiGLU, RMSNorm, GELU (tanh) and LayerNorm over (optionally gathered) rows.

The kernels read each kept input row once through ``index`` (no gathered copy is made), compute
in fp32 and write each output once in the output dtype.

* SwiGLU and GELU: elementwise over (rows, columns) tiles; input rows are gathered, ``grad`` and
  the outputs are compact.
* RMSNorm and LayerNorm (one kernel): a program owns a contiguous run of rows and holds a whole
  row in registers (the row reductions need all of it); it writes ``dx`` per row and its partial
  ``dweight`` (and LayerNorm's ``dbias``) sums to row ``pid`` of an fp32 (sums, programs, H)
  buffer, which torch sums afterwards (deterministic: the split depends only on the GPU and the
  shape).

Block shapes are fixed heuristics of the row width (these kernels are memory-bound); under
``TRITON_INTERPRET=1`` small blocks keep the interpreter fast. fp64 inputs, and RMSNorm/LayerNorm
rows wider than :data:`MAX_RMS_WIDTH`, run the torch backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from collider_kernels.backends import register
from collider_kernels.gelu_backward import GELU_COEF, SQRT_2_OVER_PI, _gelu_new_backward_torch
from collider_kernels.layer_norm_backward import _layer_norm_backward_torch
from collider_kernels.rms_norm_backward import _rms_norm_backward_torch
from collider_kernels.swiglu_backward import _swiglu_backward_torch
from collider_kernels.triton import DEVICES, INTERPRET, KERNEL_DTYPES, num_sms
from collider_kernels.triton import alloc_output as _alloc
from collider_kernels.triton.launch import Launcher

# Widest RMSNorm/LayerNorm row held in registers by one program; wider rows use the torch backend.
MAX_RMS_WIDTH = 16384


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit column stride (any row stride)."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


# ------------------------------------------------------------------------------------------ SwiGLU


@Launcher
@triton.jit
def _swiglu_bwd_kernel(
    grad_ptr, gate_ptr, up_ptr, index_ptr, dgate_ptr, dup_ptr,
    n, I,
    stride_grad, stride_gate, stride_up, stride_out,
    GATHER: tl.constexpr,  # input row r is gate/up row index[r]
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_r = offs_r < n
    mask = mask_r[:, None] & (offs_i < I)[None, :]
    rows = offs_r.to(tl.int64)
    if GATHER:
        src = tl.load(index_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
    else:
        src = rows
    cols = offs_i[None, :]
    g = tl.load(grad_ptr + rows[:, None] * stride_grad + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(gate_ptr + src[:, None] * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(up_ptr + src[:, None] * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    dgate = g * b * s * (1.0 + a * (1.0 - s))
    dup = g * (a * s)
    out = rows[:, None] * stride_out + cols
    tl.store(dgate_ptr + out, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + out, dup.to(dup_ptr.dtype.element_ty), mask=mask)


def swiglu_config(I: int) -> dict:
    """Tile of the SwiGLU kernel for width ``I``: about 4096 elements per program."""
    if INTERPRET:
        block_i = min(128, triton.next_power_of_2(I))
        return {"block_r": max(1, 512 // block_i), "block_i": block_i, "num_warps": 4}
    block_i = min(1024, triton.next_power_of_2(I))
    return {"block_r": max(1, 4096 // block_i), "block_i": block_i, "num_warps": 4}


def launch_swiglu_backward(grad, gate, up, index, cfg: dict | None = None):
    """Run the SwiGLU kernel; ``cfg`` overrides :func:`swiglu_config` (block_r, block_i, num_warps)."""
    n, I = grad.shape
    dgate = _alloc((n, I), gate.dtype, gate.device)  # (n, I)
    dup = _alloc((n, I), gate.dtype, gate.device)
    if n == 0 or I == 0:
        return dgate, dup
    grad, gate, up = _rows(grad), _rows(gate), _rows(up)
    index = None if index is None else index.contiguous()
    cfg = {**swiglu_config(I), **(cfg or {})}
    grid = (triton.cdiv(n, cfg["block_r"]), triton.cdiv(I, cfg["block_i"]))
    _swiglu_bwd_kernel[grid](
        grad, gate, up, dgate if index is None else index, dgate, dup,
        n, I, grad.stride(0), gate.stride(0), up.stride(0), dgate.stride(0),
        GATHER=index is not None, BLOCK_R=cfg["block_r"], BLOCK_I=cfg["block_i"],
        num_warps=cfg["num_warps"],
    )
    return dgate, dup


@register("swiglu_backward", "triton", DEVICES)
def swiglu_backward_triton(grad, gate, up, index):
    """Fused SwiGLU backward with the row gather inside the kernel."""
    if gate.dtype not in KERNEL_DTYPES or grad.dtype not in KERNEL_DTYPES:
        return _swiglu_backward_torch(grad, gate, up, index)
    return launch_swiglu_backward(grad, gate, up, index)


# ------------------------------------------------------------------------------ RMSNorm, LayerNorm


@Launcher
@triton.jit
def _norm_bwd_kernel(
    grad_ptr, x_ptr, w_ptr, index_ptr, dx_ptr, part_ptr,
    n, H, rows_per_prog, eps, inv_h,  # inv_h = 1/H from the host: exact for H = 1
    stride_grad, stride_x, stride_dx, stride_part,
    GATHER: tl.constexpr,  # row r is x row index[r]
    CENTER: tl.constexpr,  # LayerNorm (subtract the mean; dbias partials too), else RMSNorm
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
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    part = part_ptr + pid.to(tl.int64) * H + cols
    tl.store(part, tl.sum(dw, axis=0), mask=mask_h)
    if CENTER:
        tl.store(part + stride_part, tl.sum(db, axis=0), mask=mask_h)


def rms_config(H: int) -> dict:
    """Rows per step, warps and programs per SM of the RMSNorm/LayerNorm kernel for width ``H``."""
    block_h = triton.next_power_of_2(H)
    if INTERPRET:
        return {"block_r": max(1, min(8, 1024 // block_h)), "num_warps": 4, "programs_per_sm": 2}
    block_r = max(1, min(16, 4096 // block_h))
    num_warps = max(4, min(16, block_r * block_h // 512))
    return {"block_r": block_r, "num_warps": num_warps, "programs_per_sm": 8}


layer_norm_config = rms_config


def _launch_norm_backward(grad, x, weight, eps, index, cfg, center: bool):
    """dx (n, H) and the fp32 parameter sums: (dweight,) for RMSNorm, (dweight, dbias) for LayerNorm."""
    n, H = grad.shape
    sums = 2 if center else 1
    dx = _alloc((n, H), x.dtype, x.device)  # (n, H)
    if n == 0 or H == 0:
        return dx, *torch.zeros(sums, H, dtype=torch.float32, device=x.device)
    grad, x = _rows(grad), _rows(x)
    weight = weight.contiguous()
    index = None if index is None else index.contiguous()
    cfg = {**rms_config(H), **(cfg or {})}
    block_r = cfg["block_r"]
    programs = max(1, min(triton.cdiv(n, block_r), cfg["programs_per_sm"] * num_sms(x.device)))
    rows_per_prog = triton.cdiv(n, programs)
    programs = triton.cdiv(n, rows_per_prog)  # every program owns at least one row
    part = _alloc((sums, programs, H), torch.float32, x.device)  # partial sums, each row written once
    _norm_bwd_kernel[(programs,)](
        grad, x, weight, dx if index is None else index, dx, part,
        n, H, rows_per_prog, eps, 1.0 / H,
        grad.stride(0), x.stride(0), dx.stride(0), part.stride(0),
        GATHER=index is not None, CENTER=center, BLOCK_R=block_r, BLOCK_H=triton.next_power_of_2(H),
        num_warps=cfg["num_warps"],
    )
    return dx, *part.sum(1)  # (H,) each, summed in a fixed order


def launch_rms_norm_backward(grad, x, weight, eps, index, cfg: dict | None = None):
    """RMSNorm ``(dx, dweight)``; ``cfg`` overrides :func:`rms_config` (block_r, num_warps, programs_per_sm)."""
    return _launch_norm_backward(grad, x, weight, eps, index, cfg, center=False)


def launch_layer_norm_backward(grad, x, weight, eps, index, cfg: dict | None = None):
    """LayerNorm ``(dx, dweight, dbias)``; ``cfg`` overrides :func:`rms_config`."""
    return _launch_norm_backward(grad, x, weight, eps, index, cfg, center=True)


@register("rms_norm_backward", "triton", DEVICES)
def rms_norm_backward_triton(grad, x, weight, eps, index):
    """Fused RMSNorm backward (dx and dweight in one pass) with the row gather inside the kernel."""
    dtypes_ok = all(t.dtype in KERNEL_DTYPES for t in (grad, x, weight))
    if not dtypes_ok or x.shape[1] > MAX_RMS_WIDTH:
        return _rms_norm_backward_torch(grad, x, weight, eps, index)
    return launch_rms_norm_backward(grad, x, weight, eps, index)


@register("layer_norm_backward", "triton", DEVICES)
def layer_norm_backward_triton(grad, x, weight, eps, index):
    """Fused LayerNorm backward (dx, dweight and dbias in one pass) with the row gather inside the kernel."""
    dtypes_ok = all(t.dtype in KERNEL_DTYPES for t in (grad, x, weight))
    if not dtypes_ok or x.shape[1] > MAX_RMS_WIDTH:
        return _layer_norm_backward_torch(grad, x, weight, eps, index)
    return launch_layer_norm_backward(grad, x, weight, eps, index)


# ------------------------------------------------------------------------------------- GELU (tanh)


@Launcher
@triton.jit
def _gelu_new_bwd_kernel(
    grad_ptr, x_ptr, index_ptr, dx_ptr,
    n, F, c, coef,
    stride_grad, stride_x, stride_dx,
    GATHER: tl.constexpr,  # input row r is x row index[r]
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_r = offs_r < n
    mask = mask_r[:, None] & (offs_f < F)[None, :]
    rows = offs_r.to(tl.int64)
    if GATHER:
        src = tl.load(index_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
    else:
        src = rows
    cols = offs_f[None, :]
    g = tl.load(grad_ptr + rows[:, None] * stride_grad + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + src[:, None] * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = c * (x + coef * x * x * x)
    # t = tanh(u) through s = exp(-2|u|) in (0, 1]: 1 + t and 1 - t² without cancellation or overflow.
    s = tl.exp(-2.0 * tl.abs(u))
    inv = 1.0 / (1.0 + s)
    one_plus_t = tl.where(u >= 0, 2.0 * inv, 2.0 * s * inv)
    one_minus_t2 = 4.0 * s * inv * inv
    dgelu = 0.5 * one_plus_t + 0.5 * x * one_minus_t2 * c * (1.0 + 3.0 * coef * x * x)
    tl.store(dx_ptr + rows[:, None] * stride_dx + cols, (g * dgelu).to(dx_ptr.dtype.element_ty), mask=mask)


def gelu_config(F: int) -> dict:
    """Tile of the GELU kernel for width ``F``: about 4096 elements per program."""
    return swiglu_config(F)


def launch_gelu_new_backward(grad, x, index, cfg: dict | None = None):
    """Run the GELU kernel; ``cfg`` overrides :func:`gelu_config` (block_r, block_i, num_warps)."""
    n, F = grad.shape
    dx = _alloc((n, F), x.dtype, x.device)  # (n, F)
    if n == 0 or F == 0:
        return dx
    grad, x = _rows(grad), _rows(x)
    index = None if index is None else index.contiguous()
    cfg = {**gelu_config(F), **(cfg or {})}
    grid = (triton.cdiv(n, cfg["block_r"]), triton.cdiv(F, cfg["block_i"]))
    _gelu_new_bwd_kernel[grid](
        grad, x, dx if index is None else index, dx,
        n, F, SQRT_2_OVER_PI, GELU_COEF,
        grad.stride(0), x.stride(0), dx.stride(0),
        GATHER=index is not None, BLOCK_R=cfg["block_r"], BLOCK_F=cfg["block_i"],
        num_warps=cfg["num_warps"],
    )
    return dx


@register("gelu_new_backward", "triton", DEVICES)
def gelu_new_backward_triton(grad, x, index):
    """Fused GELU (tanh) backward with the row gather inside the kernel."""
    if x.dtype not in KERNEL_DTYPES or grad.dtype not in KERNEL_DTYPES:
        return _gelu_new_backward_torch(grad, x, index)
    return launch_gelu_new_backward(grad, x, index)
