"""Model configuration read from a Hugging Face config dict (``config.json`` / ``to_dict()``).

Every architecture lists the config fields ``transformers`` accepts for it, each classified
(:class:`Field`): **honoured** (read, and the model computes what ``transformers`` computes
with it), **rejected unless** it has one of the values the blocks implement (a clear error
names it otherwise), **dropout** (training-time randomness, which Collider does not apply:
non-zero values are refused when training, see :meth:`ModelConfig.train_without_dropout`) or
**no effect on the math** (metadata, generation and runtime settings). Keys no architecture
lists are ignored, as ``transformers`` ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from collider_models.rope import RopeSpec, rope_spec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

HONOURED = "honoured"
REJECTED_UNLESS = "rejected unless"
DROPOUT = "dropout"
NO_MATH = "no effect on the math"


@dataclass(frozen=True)
class Field:
    """How the blocks treat one config field.

    Attributes:
        kind: :data:`HONOURED`, :data:`REJECTED_UNLESS`, :data:`DROPOUT` or :data:`NO_MATH`.
        default: the value ``transformers`` uses when the key is absent.
        allowed: for :data:`REJECTED_UNLESS`, the accepted values.
    """

    kind: str
    default: object = None
    allowed: tuple = ()


def honoured(default=None) -> Field:
    return Field(HONOURED, default)


def only(*allowed, default=None) -> Field:
    return Field(REJECTED_UNLESS, allowed[0] if default is None else default, tuple(allowed))


def dropout() -> Field:
    return Field(DROPOUT, 0.0)


def no_math(default=None) -> Field:
    return Field(NO_MATH, default)


# Fields of every transformers config (PreTrainedConfig) and the core sizes.
COMMON_FIELDS: dict[str, Field] = {
    "model_type": honoured(),
    "vocab_size": honoured(),
    "hidden_size": honoured(),
    "intermediate_size": honoured(),
    "num_hidden_layers": honoured(),
    "num_attention_heads": honoured(),
    "num_key_value_heads": honoured(),
    "head_dim": honoured(),
    "tie_word_embeddings": honoured(False),
    "initializer_range": honoured(0.02),
    "max_position_embeddings": honoured(),
    "rope_parameters": honoured(),
    "rope_scaling": honoured(),
    "rope_theta": honoured(),
    "partial_rotary_factor": honoured(),
    "original_max_position_embeddings": honoured(),
    "dtype": honoured(),
    "torch_dtype": honoured(),
    "attention_dropout": dropout(),
    "is_encoder_decoder": only(False),
    "quantization_config": only(None),
    "_name_or_path": no_math(),
    "architectures": no_math(),
    "transformers_version": no_math(),
    "bos_token_id": no_math(),
    "eos_token_id": no_math(),
    "pad_token_id": no_math(),
    "use_cache": no_math(True),
    "output_attentions": no_math(False),
    "output_hidden_states": no_math(False),
    "return_dict": no_math(True),
    "chunk_size_feed_forward": no_math(0),  # read by chunked encoder models only
    "problem_type": no_math(),  # sequence-classification heads only
    "id2label": no_math(),
    "label2id": no_math(),
    "tokenizer_class": no_math(),
    "auto_map": no_math(),
}


@dataclass
class ModelConfig:
    """Architecture of a decoder-only LM, in the terms of the shared blocks.

    The HF dict is kept in ``hf_config`` so :meth:`to_hf_dict` writes back what was read.
    ``layer_windows`` holds each layer's sliding window (``None``: plain causal attention),
    as ``transformers`` decides it per layer. ``dropout`` lists the non-zero dropout fields
    of the config, which Collider does not apply.
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
    rope: RopeSpec | None = None
    layer_windows: tuple = ()
    dropout: dict = field(default_factory=dict)
    hf_config: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.rope is None:
            dim = int(self.head_dim * self.partial_rotary_factor) // 2 * 2
            self.rope = RopeSpec("default", self.rope_theta, dim, 0, {})
        if not self.layer_windows:
            self.layer_windows = (None,) * self.num_layers

    @property
    def rot_dim(self) -> int:
        """Dims of each head that rotary rotates (even)."""
        return self.rope.dim

    def to_hf_dict(self) -> dict:
        """The Hugging Face config dict this was built from (for ``config.json``)."""
        return dict(self.hf_config)

    def to_dict(self) -> dict:
        """Same as :meth:`to_hf_dict` (the name ``transformers`` integrations call)."""
        return self.to_hf_dict()

    def train_without_dropout(self) -> None:
        """Allow training although the config asks for dropout: Collider applies none, so the
        model trains as with every dropout probability set to 0 (the saved config keeps the
        original values)."""
        self.dropout = {}


def dtype_of(cfg: dict) -> torch.dtype | None:
    """Checkpoint dtype from ``dtype`` (new) or ``torch_dtype`` (old), if any."""
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if name is None or name == "auto":
        return None
    name = str(name).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"config dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def as_int(cfg: dict, key: str, minimum: int = 1) -> int:
    """``cfg[key]`` as an integer >= ``minimum``, or a clear error naming the key."""
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config {key} must be an integer >= {minimum}, got {value!r}")
    return value


def as_float(cfg: dict, key: str) -> float:
    """``cfg[key]`` as a float, or a clear error naming the key."""
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config {key} must be a number, got {value!r}")
    return float(value)


def resolve(cfg: dict, fields: dict[str, Field]) -> dict:
    """``cfg`` with every listed field's default filled in, after rejecting values the blocks
    do not implement.

    Raises:
        ValueError: naming the first field whose value is not an accepted one.
    """
    out = dict(cfg)
    for key, spec in fields.items():
        if key not in out:
            out[key] = spec.default
        elif spec.kind == REJECTED_UNLESS and out[key] not in spec.allowed:
            shown = " or ".join(repr(a) for a in spec.allowed)
            raise ValueError(
                f"config {key}={out[key]!r} is not supported for model_type {cfg.get('model_type')!r} "
                f"(only {shown}): the model would compute something else"
            )
    return out


def base_fields(cfg: dict, fields: dict[str, Field], *, default_partial: float | None = None,
                allow_partial: bool = False) -> dict:
    """:class:`ModelConfig` keyword arguments every architecture reads the same way.

    Args:
        cfg: the Hugging Face config dict as given.
        fields: the architecture's field table (:data:`COMMON_FIELDS` plus its own).
        default_partial, allow_partial: rotary settings, see :func:`collider_models.rope.rope_spec`.
    """
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if cfg.get(k) is None]
    if missing:
        raise ValueError(f"config is missing required keys {missing} for model_type {cfg.get('model_type')!r}")
    c = resolve(cfg, fields)
    heads = as_int(c, "num_attention_heads")
    if c["num_key_value_heads"] is None:
        c["num_key_value_heads"] = heads
    kv = as_int(c, "num_key_value_heads")
    if heads % kv:
        raise ValueError(f"config num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    if c["head_dim"] is None:
        c["head_dim"] = as_int(c, "hidden_size") // heads
    head_dim = as_int(c, "head_dim")
    # The rotary keys as given (absent and null differ there), with the architecture's default length.
    rope_cfg = {**cfg, "max_position_embeddings": c["max_position_embeddings"]}
    rope = rope_spec(rope_cfg, head_dim=head_dim, default_partial=default_partial, allow_partial=allow_partial)
    drops = {}
    for key, spec in fields.items():
        if spec.kind == DROPOUT:
            p = 0.0 if c[key] is None else as_float(c, key)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"config {key} must lie in [0, 1), got {p}")
            if p:
                drops[key] = p
    return dict(
        model_type=c["model_type"],
        vocab_size=as_int(c, "vocab_size"),
        hidden_size=as_int(c, "hidden_size"),
        intermediate_size=as_int(c, "intermediate_size"),
        num_layers=as_int(c, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        rope_theta=rope.theta,
        partial_rotary_factor=rope.dim / head_dim,
        rope=rope,
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        initializer_range=as_float(c, "initializer_range"),
        dtype=dtype_of(cfg),
        dropout=drops,
        hf_config=dict(cfg),
    )


def sliding_window_of(cfg: dict, key: str = "sliding_window") -> int | None:
    """A config's sliding window: ``None`` (plain causal attention) or a positive integer."""
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config {key} must be a positive integer or null, got {value!r}")
    return value


def layer_windows_of(layer_types: list, window: int | None, num_layers: int) -> tuple:
    """Per-layer windows from ``layer_types`` ("full_attention" / "sliding_attention")."""
    if not isinstance(layer_types, (list, tuple)) or len(layer_types) != num_layers:
        raise ValueError(f"config layer_types must list one type per layer ({num_layers}), got {layer_types!r}")
    unknown = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if unknown:
        raise ValueError(f"config layer_types {unknown} are not supported (only 'full_attention', 'sliding_attention')")
    if "sliding_attention" in layer_types and window is None:
        raise ValueError("config layer_types has 'sliding_attention' layers but no sliding window is set")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)
