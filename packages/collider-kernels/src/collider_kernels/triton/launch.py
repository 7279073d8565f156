"""Low-overhead launches of ``@triton.jit`` kernels.

``kernel[grid](...)`` re-derives Triton's specialization of every argument, hashes the options and
checks the kernel's globals on every call: about 30 µs of host time per launch on an H200 host
(``benchmarks/kernels/gemm_host.py``), as long as a whole narrow GEMM on the GPU. A
:class:`Launcher` keeps the compiled kernel per specialization key and calls its launcher directly.

The key holds the compile-time arguments and, for each runtime argument, every property Triton
specializes on (tensor dtype and 16-byte alignment; integer divisibility by 16, value 1 and width;
for tensor descriptors the same of their base, shape and strides, and the block shape). It is at
least as fine as Triton's own key, so two calls share a compiled kernel only when Triton would
give them the same one. The first call of each key, any argument of another type, a registered
launch hook (profilers) and the interpreter all take the plain ``kernel[grid](...)`` path.
"""

from __future__ import annotations

import functools

import torch
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

from collider_kernels.tuning import INTERPRET

try:  # where Triton keeps its launch hooks (absent: always take the plain path)
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton
    _knobs = None


def _int_spec(v: int) -> tuple:
    return (v % 16 == 0, v == 1, -(2**31) <= v < 2**31, v < 2**63)


def _hook_active(hook) -> bool:
    # Triton keeps launch hooks in a chain object (empty: no hook) or, in older versions, bare.
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_active() -> bool:
    rt = _knobs.runtime
    return _hook_active(rt.launch_enter_hook) or _hook_active(rt.launch_exit_hook)


def arg_spec(a) -> tuple:
    """What Triton may specialize a runtime argument on (``TypeError`` for types not handled)."""
    t = type(a)
    if t is torch.Tensor or isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if t is int:
        return _int_spec(a)
    if t is bool:
        return (bool, a)
    if t is float:
        return (float,)  # passed as fp32, never specialized
    if t is TensorDescriptor:
        base = a.base
        return (base.dtype, base.data_ptr() % 16 == 0, tuple(a.block_shape), a.padding,
                tuple(_int_spec(s) for s in a.shape), tuple(_int_spec(s) for s in a.strides))
    raise TypeError(f"no fast-launch key for {t.__name__}")


class Launcher:
    """A ``@triton.jit`` kernel with cached launches: ``Launcher(kernel)[grid](*args, **meta)``
    runs like ``kernel[grid](*args, **meta)``; use it as a decorator above ``@triton.jit``.

    The fast path takes the runtime arguments positionally, in order, and every constexpr and
    launch option (``num_warps``...) by keyword; constexprs must follow every runtime parameter in
    the kernel's signature. Other calls take the plain path.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self._cache: dict[tuple, tuple] = {}
        self._fast = False
        if INTERPRET or _knobs is None:
            return
        names = list(kernel.arg_names)
        const_idx = set(kernel.constexprs)
        self._n_runtime = len(names) - len(const_idx)
        # Fast path only when every constexpr follows the runtime parameters (ours all do).
        self._fast = const_idx == set(range(self._n_runtime, len(names)))
        self._const_names = names[self._n_runtime:]

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **meta):
        if not self._fast or len(args) != self._n_runtime or _hooks_active():
            return self.kernel[grid](*args, **meta)
        device = driver.active.get_current_device()
        try:
            key = (device, tuple(meta.items()), *map(arg_spec, args))
        except TypeError:
            return self.kernel[grid](*args, **meta)
        entry = self._cache.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **meta)
            usable = all(name in meta for name in self._const_names) and all(
                hasattr(compiled, a) for a in ("run", "function", "packed_metadata"))
            if usable:  # every constexpr given: the launcher takes them after the runtime args
                self._cache[key] = (compiled, tuple(meta[name] for name in self._const_names))
            return compiled
        compiled, consts = entry
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = driver.active.get_current_stream(device)
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None,
                     None, None, *args, *consts)
        return compiled
