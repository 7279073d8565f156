"""Backend registry: which implementation of an op runs for a given device.

Each op module registers its torch implementation; the Triton and CuPy packages register
theirs when they import cleanly. ``backend="auto"`` picks, per op and device, the first
registered backend in :data:`AUTO_ORDER_CUDA_BY_OP` (else :data:`AUTO_ORDER_CUDA`) that
supports the device.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "triton", "cupy")
# Preference of ``backend="auto"`` on CUDA; CPU always resolves to "torch".
AUTO_ORDER_CUDA = ("triton", "cupy", "torch")
# Per-op preference where measured (benchmarks/results/gemm_h200.md, H200, bf16, model shapes):
# geomean eager time per call over all shapes and keeps, gather_matmul: torch 0.413 ms, triton
# 0.415, cupy 0.561; gathered_weight_grad: torch 0.420, triton 0.475, cupy 0.563; scatter_add_rows
# (embedding grad): triton 0.09-0.13 ms, torch 0.16-0.20, cupy 0.92-0.94.
AUTO_ORDER_CUDA_BY_OP = {
    "gather_matmul": ("torch", "triton", "cupy"),
    "gathered_weight_grad": ("torch", "triton", "cupy"),
    "scatter_add_rows": ("triton", "torch", "cupy"),
    # Fused row-wise backwards (benchmarks/results/rowwise_h200.md, H200, bf16, 16384 rows): Triton
    # 8-15x faster than the op-by-op torch backward. CuPy has no implementation (listed for order).
    "swiglu_backward": ("triton", "torch", "cupy"),
    "rms_norm_backward": ("triton", "torch", "cupy"),
    # LayerNorm and GELU (tanh) at Phi-1.5's widths (same file): Triton 7-11x and 29x faster.
    "layer_norm_backward": ("triton", "torch", "cupy"),
    "gelu_new_backward": ("triton", "torch", "cupy"),
    # Rotary backward at the three models' query shapes (same file): Triton 2.9-5.5x faster.
    "rotary_backward": ("triton", "torch", "cupy"),
}


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    devices: tuple[str, ...]  # device types this implementation accepts


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_OPTIONAL_LOADED = False
_AUTO_ALLOWED: tuple[str, ...] = BACKENDS  # what backend="auto" may pick (set_auto_backends)


def register(op: str, backend: str, devices: tuple[str, ...] = ("cpu", "cuda")):
    """Decorator registering ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, devices)
        return fn

    return deco


def _load_optional() -> None:
    # Importing a backend package registers its ops; a missing dependency just leaves it out.
    global _OPTIONAL_LOADED
    if _OPTIONAL_LOADED:
        return
    _OPTIONAL_LOADED = True
    for name in ("collider_kernels.triton", "collider_kernels.cupy"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """Backends that implement ``op`` on ``device`` (in ``auto`` preference order)."""
    _load_optional()
    dev = torch.device(device).type
    impls = _REGISTRY.get(op, {})
    order = AUTO_ORDER_CUDA_BY_OP.get(op, AUTO_ORDER_CUDA) if dev == "cuda" else ("torch", "triton", "cupy")
    return [b for b in order if b in impls and dev in impls[b].devices]


def set_auto_backends(names: tuple[str, ...] | list[str] | None = None) -> tuple[str, ...]:
    """Restrict what ``backend="auto"`` may pick to ``names`` (``None``: every backend).

    ``"torch"`` must be among them (it is the fallback of every op). Ops called with an explicit
    backend are unaffected. Returns the previous setting, so it can be restored.
    """
    global _AUTO_ALLOWED
    new = BACKENDS if names is None else tuple(names)
    unknown = [b for b in new if b not in BACKENDS]
    if unknown or "torch" not in new:
        raise ValueError(f"names must be a subset of {BACKENDS} containing 'torch', got {names!r}")
    previous, _AUTO_ALLOWED = _AUTO_ALLOWED, new
    return previous


def auto_backend(op: str, device: torch.device | str) -> str:
    """The backend ``backend="auto"`` resolves ``op`` to on ``device``."""
    if torch.device(device).type != "cuda":
        return "torch"
    return next(b for b in available_backends(op, device) if b in _AUTO_ALLOWED)


def resolve_backend(op: str, backend: str, device: torch.device | str) -> Callable:
    """Return the implementation of ``op`` for ``backend`` on ``device``.

    ``"auto"`` means the torch backend on CPU and, on CUDA, the first available backend of the
    op's order (:data:`AUTO_ORDER_CUDA_BY_OP`) allowed by :func:`set_auto_backends`. An explicit
    backend that cannot run there is an error.
    """
    _load_optional()
    dev = torch.device(device).type
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"unknown op {op!r}")
    if backend == "auto":
        return impls[auto_backend(op, device)].fn
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    impl = impls.get(backend)
    if impl is None:
        raise RuntimeError(
            f"backend {backend!r} is not available for {op} (is its package installed?); "
            f"available on {dev}: {available_backends(op, device)}"
        )
    if dev not in impl.devices:
        raise RuntimeError(f"backend {backend!r} of {op} does not run on device {dev!r}")
    return impl.fn
