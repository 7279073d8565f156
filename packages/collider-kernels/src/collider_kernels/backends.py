"""Backend registry: which implementation of an op runs for a given device, dtypes and call.

The op modules (:mod:`collider_kernels.ops`) register their torch implementations; the Triton and
CuPy packages register theirs when they import cleanly. Each registration names the device types
and dtypes the implementation takes, and optionally a check of the call's arguments for any other
limit (a row too wide for one program). The registry owns the fallbacks: ``backend="auto"``
takes, per op and device, the first backend of the op's order that is registered, allowed by
:func:`set_auto_backends` and takes the call; an explicit backend that cannot take it is an error
that names the op, the backend and what it cannot take.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from collider_kernels.dtypes import FLOAT_DTYPES

BACKENDS = ("torch", "triton", "cupy")
# Device types the registry reports on (available_backends() with no device).
DEVICE_TYPES = ("cpu", "cuda")
# Preference of ``backend="auto"`` on CUDA; CPU always resolves to "torch" (the Triton
# interpreter runs on CPU for tests only), and lists backends in BACKENDS order.
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
    # Fused forwards and per-row cross-entropy: not yet measured on a GPU. Triton first because
    # each kernel reads its inputs once and writes its outputs once where the torch backend runs
    # several elementwise ops with fp32 intermediates (benchmarks/kernels/bench_forward.py times
    # both; revisit this order with its results).
    "rms_norm_forward": ("triton", "torch", "cupy"),
    "swiglu_forward": ("triton", "torch", "cupy"),
    "rotary_forward": ("triton", "torch", "cupy"),
    "cross_entropy_forward": ("triton", "torch", "cupy"),
    "cross_entropy_backward": ("triton", "torch", "cupy"),
}


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of an op and what it takes."""

    fn: Callable
    devices: tuple[str, ...]  # device types
    dtypes: tuple[torch.dtype, ...]  # dtypes of the tensors the op's front door names
    check: Callable[..., str | None] | None = None  # the call's arguments → why not, or None

    def refusal(self, device_type: str, dtypes=(), args=None) -> str | None:
        """Why this implementation cannot take the call, or None when it can."""
        if device_type not in self.devices:
            return f"does not run on device {device_type!r} (runs on {', '.join(self.devices)})"
        for dt in dtypes:
            if dt not in self.dtypes:
                takes = ", ".join(_dtype_name(d) for d in self.dtypes)
                return f"does not take dtype {_dtype_name(dt)} (takes {takes})"
        if self.check is not None and args is not None:
            return self.check(*args)
        return None


_REGISTRY: dict[str, dict[str, Implementation]] = {}
_OPTIONAL_LOADED = False
_AUTO_ALLOWED: tuple[str, ...] = BACKENDS  # what backend="auto" may pick (set_auto_backends)
# (op, device type, dtypes) → the backend "auto" picked, where no call-dependent check took part;
# cleared when a registration or set_auto_backends changes what auto may pick.
_AUTO_CHOICE: dict[tuple, str] = {}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def register(op: str, backend: str, *, devices=DEVICE_TYPES, dtypes=FLOAT_DTYPES, check=None):
    """Decorator registering ``fn`` as ``backend``'s implementation of ``op``, for the device types
    ``devices`` and the ``dtypes``; ``check(*args)`` may return why a call is out of its reach."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = Implementation(fn, tuple(devices), tuple(dtypes), check)
        _AUTO_CHOICE.clear()
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


def registered_ops() -> tuple[str, ...]:
    """The names of every op, sorted."""
    _load_optional()
    return tuple(sorted(_REGISTRY))


def _order(op: str, device_type: str) -> tuple[str, ...]:
    return AUTO_ORDER_CUDA_BY_OP.get(op, AUTO_ORDER_CUDA) if device_type == "cuda" else BACKENDS


def _implementations(op: str) -> dict[str, Implementation]:
    _load_optional()
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"unknown op {op!r}; the ops are {registered_ops()}")
    return impls


def available_backends(op: str | None = None, device: torch.device | str | None = None):
    """Backends that implement ``op`` on ``device``, in ``auto`` preference order.

    ``available_backends(op, device)`` is a list; without a device, a dict of such lists per
    device type (``"cpu"``, ``"cuda"``); without an op, a dict over every op
    (:func:`registered_ops`). Which dtypes each backend takes is not considered here.
    """
    if op is None:
        return {name: available_backends(name, device) for name in registered_ops()}
    if device is None:
        return {dev: available_backends(op, dev) for dev in DEVICE_TYPES}
    impls = _implementations(op)
    dev = torch.device(device).type
    return [b for b in _order(op, dev) if b in impls and dev in impls[b].devices]


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
    _AUTO_CHOICE.clear()
    return previous


def auto_backend(op: str, device: torch.device | str, dtypes=(), args=None) -> str:
    """The backend ``backend="auto"`` resolves ``op`` to on ``device`` (for tensors of ``dtypes``
    and, when given, the call's ``args``): torch on CPU; on CUDA the first backend of the op's
    order that is available, allowed by :func:`set_auto_backends` and takes the call."""
    dev = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (op, dev, tuple(dtypes))
    choice = _AUTO_CHOICE.get(key)  # the per-call host cost of auto: one lookup
    if choice is not None:
        return choice
    impls = _implementations(op)
    order = _order(op, dev) if dev == "cuda" else ("torch",)
    cacheable = True
    for b in order:
        if b in _AUTO_ALLOWED and b in impls:
            cacheable = cacheable and impls[b].check is None  # a check may decide per call
            if impls[b].refusal(dev, dtypes, args) is None:
                if cacheable:
                    _AUTO_CHOICE[key] = b
                return b
    raise RuntimeError(f"no backend of {op} takes this call on {dev} (dtypes {[_dtype_name(d) for d in dtypes]})")


def resolve_backend(op: str, backend: str, device: torch.device | str, dtypes=(), args=None) -> Callable:
    """Return the implementation of ``op`` for ``backend`` on ``device``.

    ``"auto"`` falls back along the op's order (:func:`auto_backend`). An explicit backend that is
    not installed, does not run on the device, does not take one of ``dtypes`` or (given ``args``)
    the call, is a ``RuntimeError`` naming the backend and what it cannot take.
    """
    impls = _implementations(op)
    if backend == "auto":
        return impls[auto_backend(op, device, dtypes, args)].fn
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    dev = torch.device(device).type
    impl = impls.get(backend)
    if impl is None:
        raise RuntimeError(
            f"backend {backend!r} is not available for {op} (is its package installed?); "
            f"available on {dev}: {available_backends(op, device)}"
        )
    reason = impl.refusal(dev, dtypes, args)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} of {op} {reason}; use backend='auto' or 'torch'")
    return impl.fn
