"""Rotary position tables as ``transformers`` computes them, for every rope type it scales by.

:func:`rope_spec` reads the rotary settings of a Hugging Face config dict, in the older format
(``rope_scaling`` plus top-level ``rope_theta``/``partial_rotary_factor``) or the newer one
(``rope_parameters``), with ``transformers``' precedence rules. :class:`Rotary` turns integer
positions into the cos/sin tables that :func:`collider_autograd.apply_rotary` rotates with,
including the attention scaling factor that ``yarn`` and ``longrope`` multiply into them.

Supported ``rope_type`` values: ``default``, ``linear``, ``dynamic``, ``yarn``, ``llama3`` and
``longrope``. ``dynamic`` and ``longrope`` depend on the sequence length, taken (as in
``transformers``) as the largest position of the forward call plus one, over the whole batch.
``transformers`` also remembers the largest length a model has seen for ``dynamic``; the
tables here depend on the current call only, which is what ``transformers`` computes for a
freshly built model and whenever lengths only grow (as in generation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# Keys each rope type reads from the rope parameters (besides rope_type/type, rope_theta and
# partial_rotary_factor); anything else there is ignored, as transformers ignores it.
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": (),  # factor defaults to max_position_embeddings / original_max_position_embeddings
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor"),
}
_DEFAULT_THETA = 10000.0


@dataclass(frozen=True)
class RopeSpec:
    """Rotary settings of a model, standardised as ``transformers`` does.

    Attributes:
        rope_type: one of :data:`ROPE_TYPES`.
        theta: the base ``rope_theta``.
        dim: rotated dims of each head, ``int(head_dim * partial_rotary_factor)`` (even).
        max_position_embeddings: the config's value (``dynamic`` scales past it; the default
            of ``factor`` and ``original_max_position_embeddings`` for the others).
        params: the remaining rope parameters (``factor``, ``original_max_position_embeddings``, ...).
    """

    rope_type: str
    theta: float
    dim: int
    max_position_embeddings: int
    params: dict = field(default_factory=dict, hash=False, compare=True)

    @property
    def original_max(self) -> int:
        return int(self.params.get("original_max_position_embeddings") or self.max_position_embeddings)


def _number(where: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config {where}[{key!r}] must be a finite number, got {value!r}")
    return float(value)


def rope_spec(cfg: dict, *, head_dim: int, default_partial: float | None, allow_partial: bool) -> RopeSpec:
    """The :class:`RopeSpec` of Hugging Face config dict ``cfg``.

    Args:
        cfg: the config dict (``rope_scaling`` takes precedence over ``rope_parameters``, as
            in ``transformers``; ``rope_theta`` and ``partial_rotary_factor`` inside them take
            precedence over the top-level keys).
        head_dim: per-head dims of the model.
        default_partial: ``partial_rotary_factor`` when the config has none (Phi: 0.5).
        allow_partial: whether the architecture rotates part of each head (Phi). The
            Llama-family models of ``transformers`` rotate whole heads whatever the factor
            says, so there a factor other than 1 is rejected rather than guessed at.

    Raises:
        ValueError: an unknown or malformed rope type, missing or non-numeric parameters,
            per-layer-type rope parameters, or an odd number of rotated dims.
    """
    where = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    raw = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {where} must be a dict or null, got {type(raw).__name__}")
    nested = sorted(k for k, v in raw.items() if isinstance(v, dict))
    if nested:
        raise ValueError(f"config {where} has per-layer-type rope parameters {nested}; they are not supported")
    params = dict(raw)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config {where} asks for rope_type {rope_type!r}; supported: {list(ROPE_TYPES)}")
    theta = params.pop("rope_theta", None)
    theta = _number(where, "rope_theta", cfg.get("rope_theta", _DEFAULT_THETA) if theta is None else theta)
    partial = params.pop("partial_rotary_factor", None)
    if partial is None:
        partial = cfg.get("partial_rotary_factor")
    if partial is None:
        partial = default_partial
    partial = 1.0 if partial is None else _number(where, "partial_rotary_factor", partial)
    if not allow_partial and partial != 1.0:
        raise ValueError(
            f"config partial_rotary_factor={partial}: model_type {cfg.get('model_type')!r} rotates whole heads "
            "(transformers ignores or fails on this key for it); remove it or set it to 1.0"
        )
    if not 0.0 < partial <= 1.0:
        raise ValueError(f"config partial_rotary_factor must lie in (0, 1], got {partial}")
    dim = int(head_dim * partial)
    if dim % 2 or dim == 0:
        raise ValueError(
            f"rotary dims int(head_dim * partial_rotary_factor) = int({head_dim} * {partial}) = {dim} "
            "must be even and > 0"
        )
    for key in _REQUIRED[rope_type]:
        if params.get(key) is None:
            raise ValueError(f"config {where} with rope_type {rope_type!r} needs {key!r}")
    max_pos = cfg.get("max_position_embeddings")
    if rope_type != "default":
        if max_pos is None:
            raise ValueError(f"config rope_type {rope_type!r} needs max_position_embeddings")
        max_pos = int(_number("config", "max_position_embeddings", max_pos))
        if rope_type in ("yarn", "llama3", "longrope"):
            # transformers gives a top-level original_max_position_embeddings priority (Phi-3 style).
            top = cfg.get("original_max_position_embeddings")
            if top is not None:
                params["original_max_position_embeddings"] = top
            params.setdefault("original_max_position_embeddings", max_pos)
            params["original_max_position_embeddings"] = int(
                _number(where, "original_max_position_embeddings", params["original_max_position_embeddings"])
            )
        for key in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow",
                    "mscale", "mscale_all_dim"):
            if params.get(key) is not None:
                _number(where, key, params[key])
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                factors = params[key]
                if not isinstance(factors, list) or len(factors) != dim // 2:
                    raise ValueError(f"config {where}[{key!r}] must be a list of {dim // 2} numbers (rotary dims / 2)")
                for f in factors:
                    _number(where, key, f)
    return RopeSpec(rope_type, theta, dim, int(max_pos or 0), params)


def _arange_dim(spec: RopeSpec, device) -> torch.Tensor:
    return torch.arange(0, spec.dim, 2, dtype=torch.int64, device=device).float()  # (dim/2,)


def inv_freq(spec: RopeSpec, seq_len: int | None, device=None) -> tuple[torch.Tensor, float]:
    """fp32 inverse frequencies (dim/2,) and the attention scaling of cos/sin, for a forward
    call whose largest position is ``seq_len - 1`` (``None``: at most the pretraining length)."""
    kind, p, theta, dim = spec.rope_type, spec.params, spec.theta, spec.dim
    if kind == "dynamic" and seq_len is not None and seq_len > spec.max_position_embeddings:
        # transformers recomputes with the length as an int64 tensor, so the base is fp32 math.
        n = torch.tensor(seq_len, dtype=torch.int64, device=device)
        base = theta * ((p["factor"] * n / spec.max_position_embeddings) - (p["factor"] - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** (_arange_dim(spec, device) / dim)), 1.0
    if kind == "dynamic":
        n = spec.max_position_embeddings
        base = theta * ((p["factor"] * n / n) - (p["factor"] - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** (_arange_dim(spec, device) / dim)), 1.0
    if kind == "yarn":
        return _yarn(spec, device)
    if kind == "longrope":
        return _longrope(spec, seq_len, device)
    freq = 1.0 / (theta ** (_arange_dim(spec, device) / dim))
    if kind == "linear":
        return freq / p["factor"], 1.0
    if kind == "llama3":
        return _llama3(freq, p), 1.0
    return freq, 1.0


def _llama3(freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / factor, freq)  # long wavelengths: divided by factor
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(spec: RopeSpec, device) -> tuple[torch.Tensor, float]:
    p, theta, dim = spec.params, spec.theta, spec.dim
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or spec.max_position_embeddings / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention = float(mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"]))
        else:
            attention = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep_extrapolated = 1 - ramp.to(device=device, dtype=torch.float)
    freq = interpolation * (1 - keep_extrapolated) + extrapolation * keep_extrapolated
    return freq, float(attention)


def _longrope(spec: RopeSpec, seq_len: int | None, device) -> tuple[torch.Tensor, float]:
    p, original = spec.params, spec.params["original_max_position_embeddings"]
    factor = p.get("factor") or spec.max_position_embeddings / original
    attention = p.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    key = "long_factor" if seq_len is not None and seq_len > original else "short_factor"
    ext = torch.tensor(p[key], dtype=torch.float32, device=device)
    return 1.0 / (ext * spec.theta ** (_arange_dim(spec, device) / spec.dim)), float(attention)


class Rotary:
    """cos/sin tables of a model's rotary settings for given positions.

    The frequencies of a rope type that does not depend on the sequence length are computed
    once per device.
    """

    def __init__(self, spec: RopeSpec):
        self.spec = spec
        self._fixed: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def _freq(self, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        device = positions.device
        if self.spec.rope_type in ("dynamic", "longrope"):
            seq_len = int(positions.max()) + 1 if positions.numel() else 0  # a host sync, these types only
            return inv_freq(self.spec, seq_len, device)
        if device not in self._fixed:
            self._fixed[device] = inv_freq(self.spec, None, device)
        return self._fixed[device]

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer ``positions`` (T,) or (B, T) → cos, sin (…, T, dim) in ``dtype``, computed in
        fp32 and scaled by the rope type's attention factor."""
        freq, scale = self._freq(positions)
        freqs = positions[..., None].float() * freq  # (..., T, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (..., T, dim)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
