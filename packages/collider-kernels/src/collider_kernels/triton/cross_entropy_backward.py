"""Triton cross-entropy backward: ``(exp(logits - lse) - onehot(label)) * scale`` per row, in fp32,
over (row, vocabulary block) programs; one read of the logits and one write of the output, which
may be the logits themselves (each element is read before the same program overwrites it). With an
index, output row ``i`` reads logits row ``index[i]``."""

from __future__ import annotations

import triton
import triton.language as tl

from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.triton import settings
from collider_kernels.triton.cross_entropy_forward import ce_config
from collider_kernels.triton.launch import Launcher


@Launcher
@triton.jit
def _ce_bwd_kernel(
    logits_ptr, lse_ptr, labels_ptr, scale_ptr, out_ptr, index_ptr,
    V, blocks_per_row, stride_row, stride_col, stride_out_row, stride_out_col, ignore_index,
    BLOCK_V: tl.constexpr, HAS_INDEX: tl.constexpr,
):
    # grid (n * blocks_per_row,); out (n, V); logits (n, V), or (M, V) read at rows index (n,);
    # lse, scale (n,) fp32.
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    src = row
    if HAS_INDEX:
        src = tl.load(index_ptr + row).to(tl.int64)
    cols = (pid % blocks_per_row) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    label = tl.load(labels_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    x = tl.load(logits_ptr + src * stride_row + cols * stride_col, mask=mask, other=0.0).to(tl.float32)
    grad = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
    grad = tl.where((label >= 0) & (label < V), grad, float("nan"))  # NaN: a label out of range
    grad = tl.where(label == ignore_index, 0.0, grad)
    tl.store(out_ptr + row * stride_out_row + cols * stride_out_col, grad.to(out_ptr.dtype.element_ty), mask=mask)


def launch_cross_entropy_backward(logits, lse, labels, scale, ignore_index, out=None, index=None,
                                  cfg: dict | None = None):
    """dlogits (n, V) in ``out`` (allocated in logits' dtype when None; may be ``logits`` without
    ``index``) of the rows ``index`` of logits, or of all its rows;
    ``cfg`` overrides :func:`~collider_kernels.triton.cross_entropy_forward.ce_config`."""
    n, V = logits.shape
    if index is not None:
        n = index.shape[0]
    if out is None:
        out = settings.alloc_output((n, V), logits.dtype, logits.device)  # (n, V)
    if n == 0:
        return out
    cfg = {**ce_config(V), **(cfg or {})}
    blocks = settings.cdiv(V, cfg["block_v"])
    _ce_bwd_kernel[(n * blocks,)](
        logits, lse.contiguous(), labels.contiguous(), scale.contiguous(), out,
        lse if index is None else index.contiguous(),
        V, blocks, logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), ignore_index,
        BLOCK_V=cfg["block_v"], HAS_INDEX=index is not None, num_warps=cfg["num_warps"],
    )
    return out


@register("cross_entropy_backward", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES)
def cross_entropy_backward_triton(logits, lse, labels, scale, ignore_index, out, index=None):
    """Fused cross-entropy backward (in place when ``out`` is ``logits``; rows ``index`` of it)."""
    return launch_cross_entropy_backward(logits, lse, labels, scale, ignore_index, out, index)
