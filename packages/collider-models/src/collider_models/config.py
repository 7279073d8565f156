"""Model configuration read from a Hugging Face config dict (``config.json`` / ``to_dict()``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class ModelConfig:
    """Architecture of a decoder-only LM, in the terms of the shared blocks.

    The HF dict is kept in ``hf_config`` so :meth:`to_hf_dict` writes back what was read.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    mlp: str = "swiglu"  # "swiglu" | "gelu_new"
    parallel_block: bool = False  # attention and MLP read one shared norm (Phi)
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: torch.dtype | None = None
    hf_config: dict = field(default_factory=dict, repr=False)

    @property
    def rot_dim(self) -> int:
        """Dims of each head that rotary rotates (even)."""
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

    def to_hf_dict(self) -> dict:
        """The Hugging Face config dict this was built from (for ``config.json``)."""
        return dict(self.hf_config)


def rope_theta_of(cfg: dict, default: float) -> float:
    """``rope_theta`` from the old top-level key or the newer ``rope_parameters`` dict."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(cfg.get("rope_theta", default))


def partial_rotary_of(cfg: dict, default: float = 1.0) -> float:
    """``partial_rotary_factor`` from the old top-level key or the newer ``rope_parameters`` dict."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        return float(params["partial_rotary_factor"])
    return float(cfg.get("partial_rotary_factor", default))


def dtype_of(cfg: dict) -> torch.dtype | None:
    """Checkpoint dtype from ``dtype`` (new) or ``torch_dtype`` (old), if any."""
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if name is None or name == "auto":
        return None
    name = str(name).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"config dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def check_supported(cfg: dict) -> None:
    """Reject config features the blocks do not implement (rope scaling, sliding windows).

    Plain rotary is ``rope_type`` "default" in ``rope_parameters`` (new format) or a null
    ``rope_scaling`` (old format); anything else would silently change the model.
    """
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"config {key} must be a dict or null, got {type(params).__name__}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ValueError(f"config {key} asks for rope_type {kind!r}; only 'default' rotary is supported")
    if cfg.get("use_sliding_window"):
        raise ValueError("configs with use_sliding_window=True are not supported")
    other = sorted({t for t in cfg.get("layer_types") or () if t != "full_attention"})
    if other:
        raise ValueError(f"config layer_types {other} are not supported (only 'full_attention')")


def require(cfg: dict, *keys: str) -> None:
    """Raise a clear error naming the config keys that are missing."""
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise ValueError(f"config is missing required keys {missing} for model_type {cfg.get('model_type')!r}")


def common_fields(cfg: dict) -> dict:
    """Fields every architecture reads the same way."""
    require(cfg, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    check_supported(cfg)
    heads = int(cfg["num_attention_heads"])
    kv = cfg.get("num_key_value_heads")
    return dict(
        model_type=cfg["model_type"],
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(kv) if kv is not None else heads,
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        dtype=dtype_of(cfg),
        hf_config=dict(cfg),
    )
