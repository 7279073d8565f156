"""Triton backend: importing this package registers its kernels (GPU, or CPU under the interpreter).

One module per op, named as the op (``gather_matmul``, ``masked_attention_backward``...); shared
machinery apart: :mod:`~collider_kernels.triton.settings` (interpreter, devices, allocation),
:mod:`~collider_kernels.triton.launch` (cached launches), :mod:`~collider_kernels.triton.gemm`
(tiles, split reductions, stream-K and the pointer-load GEMM of the two GEMM ops),
:mod:`~collider_kernels.triton.row_norms` (the kernel the RMSNorm and LayerNorm backwards share),
:mod:`~collider_kernels.triton.rotary` (the kernel of the rotary forward and backward) and
:mod:`~collider_kernels.triton.rows` (tiles and helpers of the row-wise kernels).
"""

import triton  # noqa: F401  (ImportError here leaves the backend unavailable)

from collider_kernels.triton import (  # noqa: F401  (importing registers each op's kernels)
    cross_entropy_backward,
    cross_entropy_forward,
    gather_matmul,
    gathered_weight_grad,
    gelu_new_backward,
    layer_norm_backward,
    masked_attention_backward,
    rms_norm_backward,
    rms_norm_forward,
    rotary_backward,
    rotary_forward,
    scatter_add_rows,
    swiglu_backward,
    swiglu_forward,
)
