"""collider-kernels: tensors in, tensors out.

The backward GEMMs of token-filtered training, restricted to kept rows, the masked attention
backward, and the row-wise SwiGLU, GELU (tanh), RMSNorm, LayerNorm and rotary backwards. Every op takes
``backend="auto" | "torch" | "triton" | "cupy"`` and has a dense reference in
:mod:`collider_kernels.reference`.
"""

from collider_kernels._checks import check_attention_masks
from collider_kernels.backends import auto_backend, available_backends, resolve_backend, set_auto_backends
from collider_kernels.gather_matmul import gather_matmul
from collider_kernels.gathered_weight_grad import gathered_weight_grad
from collider_kernels.gelu_backward import gelu_new_backward
from collider_kernels.layer_norm_backward import layer_norm_backward
from collider_kernels.masked_attention import masked_attention_backward, sequence_offsets
from collider_kernels.rms_norm_backward import rms_norm_backward
from collider_kernels.rotary_backward import rotary_backward
from collider_kernels.scatter_add_rows import scatter_add_rows
from collider_kernels.swiglu_backward import swiglu_backward

__version__ = "0.1.0"

__all__ = [
    "auto_backend",
    "available_backends",
    "check_attention_masks",
    "gather_matmul",
    "gathered_weight_grad",
    "gelu_new_backward",
    "layer_norm_backward",
    "masked_attention_backward",
    "resolve_backend",
    "rms_norm_backward",
    "rotary_backward",
    "scatter_add_rows",
    "sequence_offsets",
    "set_auto_backends",
    "swiglu_backward",
]
