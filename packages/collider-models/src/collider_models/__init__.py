"""collider-models: Llama, Mistral, Qwen2 and Phi decoder LMs built on collider-autograd."""

from collider_models import llama, mistral, phi, qwen2  # noqa: F401  (register architectures)
from collider_models.blocks import CausalLM, CausalLMOutput, loss_labels, shift_labels
from collider_models.checkpoint import from_pretrained, save_pretrained
from collider_models.config import ModelConfig
from collider_models.generate import KVCache, generate
from collider_models.hf.convert import from_hf
from collider_models.presets import PRESETS, preset_config
from collider_models.registry import from_config


def from_preset(name: str):
    """Randomly initialised model of a named preset (see :data:`PRESETS`)."""
    return from_config(preset_config(name))


__version__ = "0.1.0"

__all__ = [
    "PRESETS", "CausalLM", "CausalLMOutput", "KVCache", "ModelConfig", "from_config", "from_hf", "from_preset",
    "from_pretrained", "generate", "loss_labels", "preset_config", "save_pretrained", "shift_labels",
]
