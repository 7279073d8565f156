"""Settings shared by the Triton kernels: interpreter mode, devices, output allocation, SM count.

Set ``TRITON_INTERPRET=1`` before the first import of triton to run the kernels on CPU tensors.
"""

from __future__ import annotations

import functools

import torch

from collider_kernels.tuning import INTERPRET

# Devices the Triton kernels accept: CUDA, plus CPU when running under the interpreter.
DEVICES = ("cpu", "cuda") if INTERPRET else ("cuda",)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids (Triton's own ``triton.cdiv`` costs microseconds per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0), as ``triton.next_power_of_2``."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def alloc_output(shape, dtype, device) -> torch.Tensor:
    """Uninitialised storage for a kernel output whose every element the kernel writes (tests
    replace it with a NaN-filled allocation to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 stands in for the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
