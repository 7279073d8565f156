"""collider-kernels: tensors in, tensors out.

The backward GEMMs of token-filtered training, restricted to kept rows, the masked attention
backward (with sliding windows and packed documents), the row-wise SwiGLU, GELU (tanh), RMSNorm,
LayerNorm and rotary backwards, and fused forwards (RMSNorm, SwiGLU, rotary) and per-row
cross-entropy (forward and backward) for the dense path. Every op takes ``backend="auto" | "torch" | "triton" |
"cupy"`` and has a dense reference in :mod:`collider_kernels.reference`. The registry
(:func:`registered_ops`, :func:`available_backends`) says which backends exist where;
:mod:`collider_kernels.tuning` and :mod:`collider_kernels.timing` are the tuner and the timer the
kernels and benchmarks share.
"""

from collider_kernels._checks import check_attention_masks, check_label_values
from collider_kernels.backends import (
    auto_backend,
    available_backends,
    registered_ops,
    resolve_backend,
    set_auto_backends,
)
from collider_kernels.ops.cross_entropy_backward import cross_entropy_backward
from collider_kernels.ops.cross_entropy_forward import cross_entropy_forward
from collider_kernels.ops.gather_matmul import gather_matmul
from collider_kernels.ops.gathered_weight_grad import gathered_weight_grad
from collider_kernels.ops.gelu_new_backward import gelu_new_backward
from collider_kernels.ops.layer_norm_backward import layer_norm_backward
from collider_kernels.ops.masked_attention_backward import masked_attention_backward, sequence_offsets
from collider_kernels.ops.rms_norm_backward import rms_norm_backward
from collider_kernels.ops.rms_norm_forward import rms_norm_forward
from collider_kernels.ops.rotary_backward import rotary_backward
from collider_kernels.ops.rotary_forward import rotary_forward
from collider_kernels.ops.scatter_add_rows import scatter_add_rows
from collider_kernels.ops.swiglu_backward import swiglu_backward
from collider_kernels.ops.swiglu_forward import swiglu_forward

__version__ = "0.1.0"

__all__ = [
    "auto_backend",
    "available_backends",
    "check_attention_masks",
    "check_label_values",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "gather_matmul",
    "gathered_weight_grad",
    "gelu_new_backward",
    "layer_norm_backward",
    "masked_attention_backward",
    "registered_ops",
    "resolve_backend",
    "rms_norm_backward",
    "rms_norm_forward",
    "rotary_backward",
    "rotary_forward",
    "scatter_add_rows",
    "sequence_offsets",
    "set_auto_backends",
    "swiglu_backward",
    "swiglu_forward",
]
