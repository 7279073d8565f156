"""Tuning of the Triton kernels: candidate configurations, timing, and the cache of choices.

Every tuned kernel (the gather-GEMM, the gathered weight-gradient GEMM, and the dK/dV and dQ passes
of the masked attention backward) asks :func:`choose` for its configuration on a problem key. The
first time a key comes, each candidate of :func:`candidates` runs as ten calls captured in a CUDA
graph and the fastest by device time (the best of three replays, :func:`collider_kernels.timing.
graph_ms`) is kept in the cache; later calls of the key are a dictionary lookup. Device time, not
eager time: a narrow GEMM runs for less time on the GPU than Python takes to launch it, so eager
timing would rank candidates by host overhead.

Nothing is timed while the caller captures a CUDA graph (the first candidate runs; a later eager
call tunes), under the Triton interpreter, or with ``COLLIDER_TRITON_AUTOTUNE=0`` in the
environment (each kernel's untuned default runs: fast test runs). A candidate that fails to build
is skipped with a warning. :func:`cache` shows the choices made, :func:`clear` forgets them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from collider_kernels import timing

# Triton's interpreter (CPU tests): one small fixed configuration per kernel, never timed.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# COLLIDER_TRITON_AUTOTUNE=0: every kernel runs its untuned default (the first candidate).
ENABLED = not INTERPRET and os.environ.get("COLLIDER_TRITON_AUTOTUNE", "1") != "0"

_GENERATORS: dict[str, Callable[..., list[dict]]] = {}
_CACHE: dict[str, dict[tuple, dict]] = {}


def register_candidates(kernel: str):
    """Decorator registering the candidate generator of ``kernel`` (a tuned kernel's name)."""
    def deco(fn):
        _GENERATORS[kernel] = fn
        _CACHE.setdefault(kernel, {})
        return fn

    return deco


def _loaded() -> None:
    from collider_kernels.backends import _load_optional

    _load_optional()  # the Triton package registers its generators on import


def tuned_kernels() -> tuple[str, ...]:
    """Names of the tuned kernels: ``"gather_matmul"``, ``"gathered_weight_grad"``,
    ``"masked_attention_backward.dkdv"``, ``"masked_attention_backward.dq"`` (Triton installed)."""
    _loaded()
    return tuple(_GENERATORS)


def candidates(kernel: str, *args, **kwargs) -> list[dict]:
    """The configurations tuning times for one problem of ``kernel``; the first is the untuned
    default. The arguments are those of the kernel's generator (see its module)."""
    _loaded()
    if kernel not in _GENERATORS:
        raise KeyError(f"unknown tuned kernel {kernel!r}; tuned kernels: {tuned_kernels()}")
    return _GENERATORS[kernel](*args, **kwargs)


def cache(kernel: str | None = None) -> dict:
    """The choices made so far: ``{key: config}`` of ``kernel`` (a copy), or of every kernel as
    ``{kernel: {key: config}}``. The key layout is documented in each kernel's module."""
    if kernel is None:
        return {name: dict(choices) for name, choices in _CACHE.items()}
    return dict(_CACHE.get(kernel, {}))


def clear(kernel: str | None = None) -> None:
    """Forget the choices of ``kernel`` (every kernel when None): the next call of a key tunes."""
    for name, choices in _CACHE.items():
        if kernel is None or name == kernel:
            choices.clear()


def lookup(kernel: str, key: tuple) -> dict | None:
    """The cached choice of ``kernel`` for ``key``, or None (the kernels' fast path)."""
    return _CACHE[kernel].get(key)


def configure(kernel: str, key: tuple, make_candidates: Callable[[], list[dict]],
              run: Callable[[dict], object]) -> dict:
    """The configuration of ``kernel`` for ``key``: the cached choice, else :func:`choose` over
    ``make_candidates()`` (built only then, so a cached key costs one dictionary lookup)."""
    cfg = _CACHE[kernel].get(key)
    return cfg if cfg is not None else choose(kernel, key, make_candidates(), run)


def bench(fn) -> float:
    """Device milliseconds per call of ``fn`` as tuning measures them."""
    return timing.graph_ms(fn, calls=10, replays=3)


def choose(kernel: str, key: tuple, cands: list[dict], run: Callable[[dict], object]) -> dict:
    """The fastest of ``cands`` for ``key`` of ``kernel`` (``run(cfg)`` makes one call), cached.

    Callers :func:`lookup` the key first, so repeated calls pay no candidate bookkeeping on the
    host. Inside a caller's CUDA-graph capture the first candidate is returned and not cached.
    """
    cfg = cands[0]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return cfg  # no timing inside a caller's graph capture; tuned on a later eager call
    if ENABLED and len(cands) > 1:
        from triton.runtime.errors import OutOfResources

        best, failures = float("inf"), []
        for c in cands:
            try:
                t = bench(lambda c=c: run(c))
            except OutOfResources:  # tile does not fit this dtype
                continue
            except Exception as e:  # a candidate that fails to build is skipped, and said so
                failures.append(e)
                warnings.warn(f"collider: {kernel} candidate {c} failed and is skipped: {type(e).__name__}: {e}",
                              RuntimeWarning, stacklevel=2)
                continue
            if t < best:
                best, cfg = t, c
        if best == float("inf") and failures:
            raise RuntimeError(f"every {kernel} candidate for {key} failed") from failures[-1]
    _CACHE.setdefault(kernel, {})[key] = cfg
    return cfg
