"""The ``transformers`` baselines of ``collider-bench``: plain transformers (SDPA) and transformers
patched with Liger-Kernel, both trained with loss-only filtering.

* ``hf``: the same-shaped ``transformers`` model; per-token cross-entropy from its logits and
  the masked mean (the usual way to write Rho-1 filtering);
* ``liger``: the same model patched with Liger-Kernel (fused linear cross-entropy, RMSNorm,
  SwiGLU, rotary), filtered positions' labels set to -100 (loss-only filtering). Liger's fused
  loss computes the input gradient inside the forward, so it must know the kept set before the
  forward: it gets the step's keep mask for free, a favour to the baseline noted in the report.

Liger patches module-level functions and classes of ``transformers``; :func:`build_liger`
restores them right after patching its instance and :func:`liger_functions` swaps Liger's rotary
in only around a Liger step, so the plain ``hf`` model in the same run stays plain.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager

import torch

# model_type -> (Liger patch function, transformers module it patches). Liger has no Phi-1.5 patch.
LIGER_PATCHES = {
    "llama": ("apply_liger_kernel_to_llama", "transformers.models.llama.modeling_llama"),
    "qwen2": ("apply_liger_kernel_to_qwen2", "transformers.models.qwen2.modeling_qwen2"),
    "mistral": ("apply_liger_kernel_to_mistral", "transformers.models.mistral.modeling_mistral"),
}
# Module attributes Liger replaces globally when it patches an instance.
_PATCHED_ATTRS = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP", "Qwen2RMSNorm", "Qwen2MLP",
                  "MistralRMSNorm", "MistralMLP")
LIGER_INSTALL_HINT = "pip install 'collider-models[bench]' (or liger-kernel)"


def liger_unavailable(model_type: str, device: torch.device) -> str | None:
    """Why the Liger baseline cannot run here, or ``None`` when it can."""
    if model_type not in LIGER_PATCHES:
        return f"Liger-Kernel has no patch for model_type {model_type!r}"
    if device.type != "cuda":
        return "Liger-Kernel's kernels run on CUDA GPUs only"
    try:
        importlib.import_module("liger_kernel.transformers")
    except ImportError:
        return f"liger-kernel is not installed ({LIGER_INSTALL_HINT})"
    return None


def transformers_unavailable() -> str | None:
    """Why the ``transformers`` baselines cannot run, or ``None``."""
    try:
        importlib.import_module("transformers")
    except ImportError:
        return "transformers is not installed (pip install 'collider-models[hf]')"
    return None


def build_transformers(cfg: dict) -> torch.nn.Module:
    """The random-init ``transformers`` model of HF config dict ``cfg`` (SDPA attention), in train
    mode, in the current default dtype and device."""
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    return model.train()


def build_liger(cfg: dict) -> torch.nn.Module:
    """:func:`build_transformers` patched with Liger-Kernel (instance patch; the module-level
    replacements Liger makes are undone so other models stay plain)."""
    patch_name, module_name = LIGER_PATCHES[cfg["model_type"]]
    module = importlib.import_module(module_name)
    saved = {a: getattr(module, a) for a in _PATCHED_ATTRS if hasattr(module, a)}
    model = build_transformers(cfg)
    patch = getattr(importlib.import_module("liger_kernel.transformers"), patch_name)
    patch(rope=True, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True, model=model)
    model._liger_functions = {a: getattr(module, a) for a in saved}  # Liger's versions, swapped in per step
    model._liger_module = module
    for a, v in saved.items():
        setattr(module, a, v)
    return model


@contextmanager
def liger_functions(model: torch.nn.Module):
    """While active, the module-level functions Liger patched (rotary) are Liger's."""
    module = getattr(model, "_liger_module", None)
    if module is None:
        yield
        return
    saved = {a: getattr(module, a) for a in model._liger_functions}
    for a, v in model._liger_functions.items():
        setattr(module, a, v)
    try:
        yield
    finally:
        for a, v in saved.items():
            setattr(module, a, v)


def hf_token_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) fp32 cross-entropy of a ``transformers`` model's logits against aligned labels."""
    logits = model(ids).logits  # (B, T, V)
    V = logits.shape[-1]
    flat = torch.nn.functional.cross_entropy(logits.float().view(-1, V), labels.view(-1), reduction="none")
    return flat.view(labels.shape)


def liger_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross-entropy mean over kept positions (filtered labels set to -100)."""
    with liger_functions(model):
        return model(ids, shift_labels=torch.where(keep, labels, -100)).loss
