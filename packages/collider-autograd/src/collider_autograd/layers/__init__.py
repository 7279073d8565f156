"""Layer Functions and Modules: dense gradient in → ordinary backward; sparse in → kept rows only."""

from collider_autograd.layers.attention import CausalAttentionFunction, causal_attention
from collider_autograd.layers.embedding import Embedding, EmbeddingFunction, embedding
from collider_autograd.layers.gelu import GeluNewFunction, gelu_new
from collider_autograd.layers.gelu_mlp import GeluMLPFunction, gelu_mlp
from collider_autograd.layers.layer_norm import LayerNorm, LayerNormFunction, layer_norm
from collider_autograd.layers.linear import Linear, LinearFunction, linear
from collider_autograd.layers.linear_cross_entropy import LinearCrossEntropyFunction, linear_cross_entropy
from collider_autograd.layers.multi_linear import MultiLinearFunction, multi_linear
from collider_autograd.layers.rms_norm import AddRMSNormFunction, RMSNorm, RMSNormFunction, add_rms_norm, rms_norm
from collider_autograd.layers.rotary import RotaryFunction, apply_rotary, rotary_tables
from collider_autograd.layers.swiglu import SwiGLUFunction, swiglu
from collider_autograd.layers.swiglu_mlp import SwiGLUMLPFunction, swiglu_mlp

__all__ = [
    "add_rms_norm", "AddRMSNormFunction", "apply_rotary", "causal_attention", "CausalAttentionFunction",
    "embedding", "Embedding", "EmbeddingFunction", "gelu_mlp", "GeluMLPFunction", "gelu_new", "GeluNewFunction",
    "layer_norm", "LayerNorm", "LayerNormFunction", "Linear", "linear", "linear_cross_entropy",
    "LinearCrossEntropyFunction", "LinearFunction", "multi_linear", "MultiLinearFunction", "rms_norm", "RMSNorm",
    "RMSNormFunction", "rotary_tables", "RotaryFunction", "swiglu", "swiglu_mlp", "SwiGLUFunction",
    "SwiGLUMLPFunction",
]
