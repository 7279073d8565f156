"""``from_hf``: a Collider model over the very parameters of a loaded ``transformers`` model.

The Collider model is built on the meta device and each of its parameters is then *the*
``nn.Parameter`` object of the ``transformers`` model with the same name, so both models
share storage: an optimizer built on either trains both, a tied LM head stays tied, moving
one model's parameters (``.to(device)``) moves the other's, and ``save_pretrained`` of the
``transformers`` model keeps saving what was trained.
"""

from __future__ import annotations

import torch
from torch import nn

from collider_models.registry import ARCHITECTURES, from_config

# Attention implementations of transformers that compute the same softmax attention.
SAME_MATH_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def from_hf(model: nn.Module) -> nn.Module:
    """A Collider model sharing the parameters of a ``transformers`` causal LM.

    Args:
        model: a loaded ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
            ``PhiForCausalLM`` (any registered architecture), in any dtype, on any one device.

    Returns:
        A :class:`~collider_models.CausalLM` whose parameters *are* ``model``'s (same
        ``nn.Parameter`` objects, same ``data_ptr``; ``requires_grad`` flags included), in
        ``model``'s train/eval mode. Its forward equals ``model``'s; train it with
        :func:`~collider_autograd.filtered_mean` and save with ``model.save_pretrained``.

    Raises:
        TypeError: ``model`` is not a ``transformers`` causal LM (a PEFT wrapper, a compiled
            or data-parallel wrapper, another class).
        ValueError: a feature Collider does not implement, named: an unsupported
            ``model_type`` or config feature (e.g. an activation other than the architecture's,
            an unsupported rope type, q/k norms, dropout), quantized
            or non-float weights, tensor subclasses, adapters, activation checkpointing, an
            attention implementation other than ``SAME_MATH_ATTENTION``, parameters on the meta
            device or on several devices, or parameter names and shapes that differ from the
            architecture's.
    """
    _check_instance(model)
    cfg = model.config.to_dict()
    with torch.device("meta"):
        ours = from_config(cfg)  # validates the config features
    _share_parameters(ours, model)
    dtypes = {p.dtype for p in ours.parameters()}
    ours.config.dtype = dtypes.pop() if len(dtypes) == 1 else None
    return ours.train(model.training)


def _check_instance(model: nn.Module) -> None:
    """Reject model instances whose training math or parameters Collider cannot take over."""
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # without transformers there is no transformers model to convert
        raise ImportError("from_hf needs transformers: pip install collider-models[hf]") from e
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        hint = " (PEFT adapters: merge them into the model with merge_and_unload() first)" if "Peft" in name else ""
        raise TypeError(f"model must be a transformers *ForCausalLM model, got {name}{hint}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES or not name.endswith("ForCausalLM"):
        raise TypeError(
            f"model must be a transformers causal LM of model_type {sorted(ARCHITECTURES)} "
            f"(e.g. LlamaForCausalLM), got {name} of model_type {model_type!r}"
        )
    problems = []
    if getattr(model, "_hf_peft_config_loaded", False) or getattr(model, "peft_config", None):
        problems.append("PEFT adapters are loaded (merge them with merge_and_unload() first)")
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        problems.append("the model is quantized")
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        problems.append("gradient checkpointing is enabled (call gradient_checkpointing_disable() first)")
    attn = getattr(model.config, "_attn_implementation", None)
    if attn is not None and attn not in SAME_MATH_ATTENTION:
        problems.append(f"attention implementation {attn!r} (supported: {', '.join(SAME_MATH_ATTENTION)})")
    dropout = {k: v for k, v in model.config.to_dict().items()
               if k.endswith(("dropout", "pdrop")) and isinstance(v, (int, float)) and v > 0}
    if dropout:
        problems.append(f"dropout {dropout} (Collider models have no dropout; set them to 0.0)")
    devices = {p.device for p in model.parameters()}
    if torch.device("meta") in devices:
        problems.append("parameters on the meta device (load the weights first)")
    elif len(devices) > 1:
        problems.append(f"parameters on several devices {sorted(map(str, devices))} (put the model on one)")
    for pname, p in model.named_parameters():
        if type(p.data) is not torch.Tensor or not p.is_floating_point():
            problems.append(f"parameter {pname!r} is a {type(p.data).__name__} of dtype {p.dtype} "
                            "(quantized or distributed weights are not supported)")
            break
    if problems:
        raise ValueError(f"cannot convert {name} to a Collider model: " + "; ".join(problems))


def _share_parameters(ours: nn.Module, model: nn.Module) -> None:
    """Make every parameter of ``ours`` (built on the meta device) the parameter of ``model``
    with the same name. Every name is assigned, so ``ours`` ties exactly what ``model`` ties."""
    theirs = dict(model.named_parameters(remove_duplicate=False))
    names = dict(ours.named_parameters(remove_duplicate=False))
    extra, missing = sorted(theirs.keys() - names.keys()), sorted(names.keys() - theirs.keys())
    if extra or missing:
        raise ValueError(
            f"{type(model).__name__} does not have the parameters of its architecture: "
            f"unexpected {extra[:8]}, missing {missing[:8]} (adapters or modified modules are not supported)"
        )
    for pname, meta in names.items():
        p = theirs[pname]
        if p.shape != meta.shape:
            raise ValueError(f"parameter {pname!r} has shape {list(p.shape)}, the config implies {list(meta.shape)}")
        owner, _, leaf = pname.rpartition(".")
        setattr(ours.get_submodule(owner), leaf, p)
