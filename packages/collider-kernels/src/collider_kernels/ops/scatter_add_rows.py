"""Row scatter-add: ``out[index[i]] += src[i]`` (embedding gradient; densifying kept rows)."""

from __future__ import annotations

import torch

from collider_kernels._checks import check_index, check_tensor
from collider_kernels.backends import register, resolve_backend
from collider_kernels.dtypes import FLOAT_DTYPES


def scatter_add_rows(
    src: torch.Tensor,
    index: torch.Tensor,
    num_rows: int | None = None,
    *,
    out: torch.Tensor | None = None,
    deterministic: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Add row ``src[i]`` into row ``index[i]`` of a (num_rows, F) result.

    Indices may repeat (embedding gradients); with ``deterministic=True`` the sum over
    repeated rows is computed in a fixed order, so results are bitwise reproducible.

    Args:
        src: (n, F) rows to add.
        index: (n,) destination row of each source row.
        num_rows: rows of a new zero-filled result; give this or ``out``.
        out: (R, F) tensor to accumulate into in place (any float dtype, e.g. fp32).
        deterministic: fixed summation order for repeated indices.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cupy"``.
        validate: check that ``index`` lies in range (costs a device sync on CUDA).

    Returns:
        (R, F) result (``out`` when given).
    """
    check_tensor("src", src, ndim=2, dtypes=FLOAT_DTYPES)
    if (num_rows is None) == (out is None):
        raise ValueError("give exactly one of num_rows or out")
    if out is None:
        if num_rows < 0:
            raise ValueError(f"num_rows must be >= 0, got {num_rows}")
        out = src.new_zeros((num_rows, src.shape[1]))
    else:
        check_tensor("out", out, ndim=2, dtypes=FLOAT_DTYPES, device=src.device)
        if out.shape[1] != src.shape[1]:
            raise ValueError(f"out must have {src.shape[1]} columns like src, got {out.shape[1]}")
    check_index("index", index, out.shape[0], src.device, validate=validate)
    if index.shape[0] != src.shape[0]:
        raise ValueError(f"index must have {src.shape[0]} entries (rows of src), got {index.shape[0]}")
    fn = resolve_backend("scatter_add_rows", backend, src.device, (src.dtype, out.dtype))
    return fn(src, index, out, deterministic)


@register("scatter_add_rows", "torch")
def _scatter_add_rows_torch(src, index, out, deterministic):
    src = src.to(out.dtype)
    if deterministic and src.is_cuda:
        # index_put_ with accumulate=True sorts indices and sums in a fixed order on CUDA.
        out.index_put_((index.long(),), src, accumulate=True)
    else:
        out.index_add_(0, index.long(), src)
    return out
