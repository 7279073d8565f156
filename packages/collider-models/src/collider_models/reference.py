"""Dense reference of the Collider gradient contract (see the Design page, ``docs/design.rst``).

Any causal LM whose attention layers expose ``k_proj``/``v_proj`` submodules works (ours or a
``transformers`` model): a forward hook detaches the filtered rows of every K and V
projection, and the loss is the masked mean. Backpropagating it densely gives the gradients
Collider must reproduce.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def detach_filtered_kv(model: nn.Module, keep: torch.Tensor):
    """While active, K and V projection outputs of filtered positions are detached.

    Args:
        model: a module containing attention submodules with ``k_proj`` and ``v_proj``.
        keep: (B, T) bool mask of kept positions.
    """
    def hook(_module, _inputs, out):
        mask = keep[..., None].to(out.device)  # (B, T, 1)
        return torch.where(mask, out, out.detach())

    handles = [
        module.register_forward_hook(hook)
        for name, module in model.named_modules()
        if name.endswith(("k_proj", "v_proj"))
    ]
    if not handles:
        raise ValueError("model has no k_proj/v_proj submodules to detach")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def masked_mean(token_loss: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``sum(token_loss[keep]) / count``; 0 when nothing is kept (the baseline's loss)."""
    count = keep.sum()
    total = (token_loss * keep).sum()
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
