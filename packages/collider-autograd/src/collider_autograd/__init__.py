"""collider-autograd: the sparsity-carrying gradient, layer Functions/Modules, token selection,
and :func:`filtered_mean` — the one line users change."""

from collider_autograd.densify import SparseGradientError, allow_densify, densify_allowed
from collider_autograd.filtered_mean import filtered_mean
from collider_autograd.layers import (
    Embedding,
    LayerNorm,
    Linear,
    RMSNorm,
    add_rms_norm,
    apply_rotary,
    causal_attention,
    embedding,
    gelu_mlp,
    gelu_new,
    layer_norm,
    linear,
    linear_cross_entropy,
    multi_linear,
    rms_norm,
    rotary_tables,
    swiglu,
    swiglu_mlp,
)
from collider_autograd.selection import excess_loss, select_random, select_threshold, select_top_k, top_k_counts
from collider_autograd.sparse_grad import TokenSparseTensor, densify_counts, reset_densify_counts

__version__ = "0.1.0"

__all__ = [
    "add_rms_norm", "allow_densify", "apply_rotary", "causal_attention", "densify_allowed", "densify_counts",
    "embedding", "Embedding", "excess_loss", "filtered_mean", "gelu_mlp", "gelu_new", "layer_norm", "LayerNorm",
    "Linear", "linear", "linear_cross_entropy", "multi_linear", "reset_densify_counts", "rms_norm", "RMSNorm",
    "rotary_tables", "select_random", "select_threshold", "select_top_k", "SparseGradientError", "swiglu",
    "swiglu_mlp", "TokenSparseTensor", "top_k_counts",
]
