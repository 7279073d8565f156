"""Shared fixtures: tiny random models and checkpoints of each architecture, built offline."""

import pytest
import torch

import collider_models
from collider_models.presets import preset_config

TINY = {"llama": "tinyllama-tiny", "qwen2": "qwen2.5-tiny", "phi": "phi-tiny"}


def _tiny_dict(preset: str, **overrides) -> dict:
    cfg = preset_config(preset)
    if cfg.get("eos_token_id") is not None and cfg["eos_token_id"] >= cfg["vocab_size"]:
        cfg["bos_token_id"], cfg["eos_token_id"] = 1, 2  # keep special ids inside the tiny vocab
    cfg.update(overrides)
    return cfg


@torch.no_grad()
def _perturb(model, seed: int, std: float = 0.05):
    # Random init leaves biases at 0 and norms at 1; perturb so every parameter matters.
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)
    return model


@pytest.fixture(scope="session")
def tiny_dict():
    """``tiny_dict(arch, **overrides)``: HF config dict of the tiny preset of ``arch``."""
    return lambda arch, **overrides: _tiny_dict(TINY[arch], **overrides)


@pytest.fixture(scope="session")
def make_ours(tiny_dict):
    """``make_ours(arch, seed=0, **overrides)``: a perturbed random Collider model (fp32)."""

    def make(arch, seed=0, **overrides):
        torch.manual_seed(seed)
        return _perturb(collider_models.from_config(tiny_dict(arch, **overrides)), seed)

    return make


@pytest.fixture(scope="session")
def make_hf(tiny_dict):
    """``make_hf(arch, seed=0, dtype=torch.float32, **overrides)``: a perturbed random
    ``transformers`` model in eval mode, built offline from the tiny preset."""
    transformers = pytest.importorskip("transformers", reason="transformers is needed for parity tests")

    def make(arch, seed=0, dtype=torch.float32, **overrides):
        torch.manual_seed(seed)
        config = transformers.AutoConfig.for_model(**tiny_dict(arch, **overrides))
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        return _perturb(model, seed).eval()

    return make


@pytest.fixture(scope="session")
def hf_checkpoint(make_hf, tmp_path_factory):
    """``hf_checkpoint(arch)``: (folder, model) of a tiny fp32 checkpoint saved by ``transformers``."""
    made = {}

    def get(arch):
        if arch not in made:
            model = make_hf(arch, seed=1)
            folder = tmp_path_factory.mktemp(f"hf-{arch}")
            model.save_pretrained(folder)
            made[arch] = (folder, model)
        return made[arch]

    return get


TINY["mistral"] = "mistral-tiny"
