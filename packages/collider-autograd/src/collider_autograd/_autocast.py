"""Mixed precision through ``torch.autocast``: what the layers' entry points do under it.

A custom autograd Function's forward runs under the caller's autocast, but its backward does
not, so tensors saved in one dtype would meet gradients in another. Each layer's functional
entry point therefore settles the dtypes itself, the way ``torch.autocast`` treats the op
it stands for, and runs its Function with autocast off:

* matmul-like layers (linear, attention, the LM head + loss) cast their floating inputs,
  parameters included, to the autocast dtype (:func:`cast_for_matmul`); the cast is an
  ordinary autograd op, so fp32 master parameters get fp32 gradients;
* the other layers compute in their inputs' dtypes, as the ``transformers`` modules do.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts matmuls to on ``device_type``, or ``None`` when it is off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_for_matmul(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` cast to the autocast dtype of their device when autocast is on there
    (floating tensors only; ``None`` passes through); unchanged otherwise."""
    first = next(t for t in tensors if t is not None)
    dtype = autocast_dtype(first.device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def autocast_off(device_type: str):
    """A context with autocast disabled on ``device_type`` (a no-op when it is off already)."""
    if not torch.is_autocast_enabled(device_type):
        return nullcontext()
    return torch.autocast(device_type, enabled=False)
