"""``model_type`` → architecture builder and the config fields it classifies."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ARCHITECTURES: dict[str, Callable[[dict], nn.Module]] = {}
# model_type → {config key: collider_models.config.Field}
ARCHITECTURE_FIELDS: dict[str, dict] = {}


def register_architecture(model_type: str, fields: dict):
    """Decorator registering a builder ``(hf_config_dict) -> model`` for ``model_type``, with
    the table of config fields it honours, rejects or ignores (see :mod:`collider_models.config`)."""

    def deco(fn):
        ARCHITECTURES[model_type] = fn
        ARCHITECTURE_FIELDS[model_type] = fields
        return fn

    return deco


def from_config(cfg: dict) -> nn.Module:
    """Build a randomly initialised model from a Hugging Face config dict.

    Args:
        cfg: as ``transformers``' ``config.to_dict()`` produces it or a checkpoint's
            ``config.json`` holds it; ``model_type`` selects the architecture.

    Raises:
        ValueError: an unknown ``model_type``, or a config field whose value the blocks do
            not implement (named in the message).
    """
    if not isinstance(cfg, dict):
        raise TypeError(f"cfg must be a dict (a Hugging Face config), got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unknown model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type](cfg)
