"""``filtered_mean``: the one line a user changes to make token filtering pay in the backward."""

from __future__ import annotations

import torch

from collider_autograd.sparse_grad import TokenSparseTensor


class FilteredMeanFunction(torch.autograd.Function):
    """Scalar ``sum(loss[keep]) / normalizer`` whose backward is a :class:`TokenSparseTensor`."""

    @staticmethod
    def forward(ctx, token_loss, index, normalizer):
        ctx.token_shape = token_loss.shape
        ctx.save_for_backward(index, normalizer)
        flat = token_loss.reshape(-1)
        total = flat.index_select(0, index).sum()
        return torch.where(normalizer > 0, total / normalizer.clamp_min(1e-30), torch.zeros_like(total))

    @staticmethod
    def backward(ctx, grad):
        index, normalizer = ctx.saved_tensors
        scale = torch.where(normalizer > 0, grad / normalizer.clamp_min(1e-30), torch.zeros_like(grad))
        if index.numel() == ctx.token_shape.numel():
            # Everything kept: the ordinary dense backward is the same gradient, and faster.
            return scale.to(grad.dtype).expand(ctx.token_shape).contiguous(), None, None
        values = scale.to(grad.dtype).expand(index.numel()).contiguous()  # (n,)
        return TokenSparseTensor(values, index, ctx.token_shape), None, None


def filtered_mean(
    token_loss: torch.Tensor,
    keep: torch.Tensor,
    normalizer: float | torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    validate: bool = True,
) -> torch.Tensor:
    """Mean of the kept per-token losses, with a backward that only touches kept tokens.

    Replaces ``(token_loss * keep).sum() / keep.sum()``. The value is the same; the gradient
    is a :class:`TokenSparseTensor` over the kept positions, which Collider layers turn into
    a backward over kept rows only (DESIGN.md §2). When every position is kept the gradient
    is an ordinary dense tensor, so the backward is the ordinary dense one.

    Args:
        token_loss: (B, T) floating per-position losses (``labels[:, t]`` predicted at t).
        keep: (B, T) bool mask of positions that contribute.
        normalizer: divisor; default the number of kept positions. Pass a global count when
            averaging across data-parallel ranks or accumulation steps. A zero normalizer
            (nothing kept) gives a loss of 0 with zero gradients.
        labels: optional (B, T) labels; a kept position whose label is ``ignore_index`` is
            an error.
        validate: check that kept losses are finite (a device sync on CUDA).

    Returns:
        A 0-dim tensor in ``token_loss.dtype``.
    """
    if not isinstance(token_loss, torch.Tensor) or not token_loss.is_floating_point():
        got = getattr(token_loss, "dtype", type(token_loss))
        raise TypeError(f"token_loss must be a floating-point tensor, got {got}")
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor, got {getattr(keep, 'dtype', type(keep))}")
    if keep.shape != token_loss.shape:
        raise ValueError(f"keep must have token_loss's shape {tuple(token_loss.shape)}, got {tuple(keep.shape)}")
    if keep.device != token_loss.device:
        raise ValueError(f"keep must be on {token_loss.device}, got {keep.device}")
    if labels is not None:
        if labels.shape != keep.shape:
            raise ValueError(f"labels must have keep's shape {tuple(keep.shape)}, got {tuple(labels.shape)}")
        if bool((keep & (labels == ignore_index)).any()):
            raise ValueError(f"keep selects positions whose label is ignore_index={ignore_index}")
    index = keep.reshape(-1).nonzero().squeeze(1)  # (n,) sorted flat token index
    if validate and not bool(torch.isfinite(token_loss.detach().reshape(-1).index_select(0, index)).all()):
        raise ValueError("token_loss has NaN or infinite values at kept positions")
    if normalizer is None:
        normalizer = torch.tensor(float(index.numel()), device=token_loss.device)
    else:
        normalizer = torch.as_tensor(normalizer, dtype=torch.float32, device=token_loss.device)
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a scalar, got shape {tuple(normalizer.shape)}")
        if validate and not bool(torch.isfinite(normalizer) & (normalizer >= 0)):
            raise ValueError(f"normalizer must be finite and >= 0, got {normalizer.item()}")
    normalizer = normalizer.to(token_loss.dtype)
    return FilteredMeanFunction.apply(token_loss, index, normalizer)
