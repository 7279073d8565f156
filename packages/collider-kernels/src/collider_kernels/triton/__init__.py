"""Triton backend: importing this package registers its kernels (GPU, or CPU under the interpreter).

One module per op, named as the op (``gather_matmul``, ``masked_attention_backward``...); shared
machinery apart: :mod:`~collider_kernels.triton.settings` (interpreter, devices, allocation),
:mod:`~collider_kernels.triton.launch` (cached launches), :mod:`~collider_kernels.triton.gemm`
(tiles, split reductions, stream-K and the pointer-load GEMM of the two GEMM ops) and
:mod:`~collider_kernels.triton.row_norms` (the kernel RMSNorm and LayerNorm share).
"""

import triton  # noqa: F401  (ImportError here leaves the backend unavailable)

from collider_kernels.triton import (  # noqa: F401  (importing registers each op's kernels)
    gather_matmul,
    gathered_weight_grad,
    gelu_new_backward,
    layer_norm_backward,
    masked_attention_backward,
    rms_norm_backward,
    rotary_backward,
    scatter_add_rows,
    swiglu_backward,
)
