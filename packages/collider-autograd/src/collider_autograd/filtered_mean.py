"""``filtered_mean``: the one line a user changes to make token filtering pay in the backward."""

from __future__ import annotations

import itertools
import numbers

import torch

from collider_autograd.sparse_grad import TokenSparseTensor

_TERM_IDS = itertools.count()


class FilteredMeanFunction(torch.autograd.Function):
    """Scalar ``sum(loss[keep]) / normalizer`` whose backward is a :class:`TokenSparseTensor`.

    The sum and the division run in fp32 (fp64 for fp64 losses), whatever the loss dtype.
    """

    @staticmethod
    def forward(ctx, token_loss, index, normalizer):
        acc = torch.promote_types(token_loss.dtype, torch.float32)
        total = token_loss.reshape(-1).index_select(0, index).sum(dtype=acc)  # fp32 even for fp16 losses
        ctx.token_shape = token_loss.shape
        ctx.loss_dtype = token_loss.dtype
        ctx.term = next(_TERM_IDS)  # this term's identity in the sparse gradient
        ctx.save_for_backward(index, normalizer, total)
        if index.numel() == 0:
            return torch.zeros((), dtype=token_loss.dtype, device=token_loss.device)
        return (total / normalizer.to(acc)).to(token_loss.dtype)

    @staticmethod
    def backward(ctx, grad):
        index, normalizer, total = ctx.saved_tensors
        n = index.numel()
        norm = normalizer.to(total.dtype)
        d_loss = d_norm = None
        if ctx.needs_input_grad[0]:
            scale = grad.to(total.dtype) / norm if n else grad.new_zeros((), dtype=total.dtype)
            values = scale.to(ctx.loss_dtype).expand(n).contiguous()  # (n,) one value per kept position
            d_loss = TokenSparseTensor(values, index, ctx.token_shape, {ctx.term})
        if ctx.needs_input_grad[2]:
            d_norm = -grad.to(total.dtype) * total / norm**2 if n else torch.zeros_like(norm)
            d_norm = d_norm.to(normalizer.dtype)
        return d_loss, None, d_norm


def _normalizer(normalizer, kept: int, like: torch.Tensor, validate: bool) -> torch.Tensor:
    """The divisor as a 0-dim floating tensor (fp32, or fp64 for fp64 losses; a floating tensor
    passed by the caller is kept as it is, so that a normalizer that requires grad gets one)."""
    acc = torch.promote_types(like.dtype, torch.float32)
    if normalizer is None:
        return torch.full((), float(kept), dtype=acc, device=like.device)
    if isinstance(normalizer, torch.Tensor):
        bad_dtype = normalizer.dtype == torch.bool or normalizer.is_complex()
        if isinstance(normalizer, TokenSparseTensor) or bad_dtype or normalizer.dim() != 0:
            raise TypeError(
                f"normalizer must be a number or a 0-dim real tensor, got a tensor of shape "
                f"{tuple(normalizer.shape)} and dtype {normalizer.dtype}"
            )
        value = normalizer.to(like.device)
        value = value if value.is_floating_point() else value.to(acc)
        if validate:
            _check_normalizer(float(value.detach()), kept)
        return value
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(f"normalizer must be a number, a 0-dim tensor or None, got {type(normalizer).__name__}")
    _check_normalizer(float(normalizer), kept)  # free for a number: always checked
    return torch.full((), float(normalizer), dtype=acc, device=like.device)  # a fill: no host-to-device copy


def _check_normalizer(value: float, kept: int) -> None:
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"normalizer must be finite and >= 0, got {value}")
    if value == 0 and kept:
        raise ValueError(
            f"normalizer is 0 but {kept} positions are kept (the loss would be infinite): pass the number "
            f"of kept positions (summed over ranks or accumulation steps), or None to count them"
        )


def _kept_index(keep: torch.Tensor, kept_count: int | None, validate: bool) -> torch.Tensor:
    """(n,) sorted positions of the True entries of the flat ``keep``; no device sync when the
    count is given and not validated."""
    if kept_count is None:
        return keep.nonzero().squeeze(1)
    if isinstance(kept_count, bool) or not isinstance(kept_count, numbers.Integral) or not (
        0 <= kept_count <= keep.numel()
    ):
        raise ValueError(f"kept_count must be an integer in [0, {keep.numel()}] (keep's size), got {kept_count!r}")
    if validate and int(keep.sum()) != kept_count:
        raise ValueError(f"kept_count is {kept_count} but keep has {int(keep.sum())} True positions")
    return torch.nonzero_static(keep, size=int(kept_count)).squeeze(1)


def filtered_mean(
    token_loss: torch.Tensor,
    keep: torch.Tensor,
    normalizer: float | torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    validate: bool = True,
    kept_count: int | None = None,
) -> torch.Tensor:
    """Mean of the kept per-token losses, with a backward that only touches kept tokens.

    Replaces ``(token_loss * keep).sum() / keep.sum()``. The value is the same; the gradient
    is a :class:`TokenSparseTensor` over the kept positions, which Collider layers turn into
    a backward over kept rows only, under the gradient contract of the Design page: the keys
    and values of filtered positions are detached in every attention layer. When every
    position is kept the layers run their ordinary dense backward.

    Ops applied to ``token_loss`` before this call (slicing, indexing, reshapes, per-token
    weights, ``where``) act as on the dense model. Several ``filtered_mean`` terms with the same
    ``keep`` sum exactly; terms with different kept sets, or a dense term on the same forward,
    raise :class:`~collider_autograd.SparseGradientError` during the backward (call
    ``backward`` on each term instead).

    Args:
        token_loss: floating per-position losses, e.g. (B, T) with ``labels[:, t]`` predicted at
            t. Summed and divided in fp32 (fp64 for fp64 losses) whatever its dtype.
        keep: bool mask of ``token_loss``'s shape: the positions that contribute.
        normalizer: divisor; default the number of kept positions. Pass a global count when
            averaging across data-parallel ranks or accumulation steps (a number or a 0-dim
            tensor; a floating tensor that requires grad gets its gradient). Nothing kept gives
            a loss of 0 with zero gradients, whatever the normalizer; a normalizer of 0 with
            positions kept is an error.
        labels: optional labels of ``keep``'s shape; a kept position whose label is
            ``ignore_index`` is an error.
        validate: check that kept losses are finite, a tensor normalizer is valid and
            ``kept_count`` is right (a device sync on CUDA). Numbers are always checked.
        kept_count: the number of kept positions, when the caller knows it (e.g. a top-k
            selection): the kept index is then built without a device sync, so the host can
            queue the backward while the GPU still runs the forward. With ``validate=False`` a
            wrong count is not detected here: the caller must check it (e.g. against
            ``keep.sum()`` after the backward).

    Returns:
        A 0-dim tensor in ``token_loss.dtype``.
    """
    if not isinstance(token_loss, torch.Tensor) or not token_loss.is_floating_point():
        got = getattr(token_loss, "dtype", type(token_loss))
        raise TypeError(f"token_loss must be a floating-point tensor, got {got}")
    if token_loss.dim() == 0:
        raise ValueError("token_loss must have at least one (token) dim, got a 0-dim tensor")
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
    index = _kept_index(keep.reshape(-1), kept_count, validate)  # (n,) sorted flat token index
    if validate and not bool(torch.isfinite(token_loss.detach().reshape(-1).index_select(0, index)).all()):
        raise ValueError("token_loss has NaN or infinite values at kept positions")
    normalizer = _normalizer(normalizer, index.numel(), token_loss, validate)
    return FilteredMeanFunction.apply(token_loss, index, normalizer)
