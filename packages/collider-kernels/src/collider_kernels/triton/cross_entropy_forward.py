"""Triton cross-entropy forward: each row's logsumexp (online over blocks of the vocabulary, one
read of the row) and its loss, in fp32.

One program per row keeps a running maximum ``m`` and the sum ``s`` of ``exp(x - m)`` and rescales
``s`` when a block raises ``m``: one exponential per element, one read of each logit. Infinite
logits behave as in ``torch.logsumexp`` (a row of ``-inf`` gives ``-inf``, a ``+inf`` gives ``+inf``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from collider_kernels.backends import register
from collider_kernels.dtypes import KERNEL_DTYPES
from collider_kernels.triton import settings
from collider_kernels.triton.launch import Launcher
from collider_kernels.triton.rows import unit_cols
from collider_kernels.tuning import INTERPRET


@triton.jit
def _finite_or_zero(m):
    # The shift of the running sum: m itself, or 0 while m is infinite (nothing finite seen yet,
    # or a +inf logit), so that no inf - inf appears.
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@Launcher
@triton.jit
def _ce_fwd_kernel(
    logits_ptr, labels_ptr, loss_ptr, lse_ptr,
    V, stride_row, ignore_index,
    BLOCK_V: tl.constexpr,
):
    # grid (n,); logits (n, V) unit column stride; loss, lse (n,) fp32.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")  # running maximum
    shift = 0.0  # _finite_or_zero(m): s sums exp(x - shift)
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift_new = _finite_or_zero(m_new)
        alpha = tl.where(m == float("-inf"), 0.0, tl.exp(shift - shift_new))  # s == 0 while m == -inf
        s = s * alpha + tl.sum(tl.exp(x - shift_new), axis=0)
        m = m_new
        shift = shift_new
    lse = shift + tl.log(s)
    label = tl.load(labels_ptr + row).to(tl.int64)
    in_range = (label >= 0) & (label < V)
    picked = tl.load(base + tl.where(in_range, label, 0)).to(tl.float32)
    loss = tl.where(in_range, lse - picked, float("nan"))  # NaN: a label out of range (validate=False)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(label == ignore_index, 0.0, loss))


def ce_config(V: int) -> dict:
    """Vocabulary block and warps of the cross-entropy kernels for ``V`` classes (blocks of at
    most 4096 logits on the GPU, 128 under the interpreter)."""
    block_v = min(128 if INTERPRET else 4096, settings.next_power_of_2(V))
    return {"block_v": block_v, "num_warps": max(1, min(8, block_v // 512))}


def launch_cross_entropy_forward(logits, labels, ignore_index, cfg: dict | None = None):
    """``(loss, lse)`` (n,) fp32; ``cfg`` overrides :func:`ce_config` (block_v, num_warps)."""
    n, V = logits.shape
    loss = settings.alloc_output((n,), torch.float32, logits.device)
    lse = settings.alloc_output((n,), torch.float32, logits.device)
    if n == 0:
        return loss, lse
    logits = unit_cols(logits)
    cfg = {**ce_config(V), **(cfg or {})}
    _ce_fwd_kernel[(n,)](
        logits, labels.contiguous(), loss, lse, V, logits.stride(0), ignore_index,
        BLOCK_V=cfg["block_v"], num_warps=cfg["num_warps"],
    )
    return loss, lse


@register("cross_entropy_forward", "triton", devices=settings.DEVICES, dtypes=KERNEL_DTYPES)
def cross_entropy_forward_triton(logits, labels, ignore_index):
    """Fused cross-entropy forward: each row of logits read once."""
    return launch_cross_entropy_forward(logits, labels, ignore_index)
