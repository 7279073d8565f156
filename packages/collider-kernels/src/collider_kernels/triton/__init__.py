"""Triton backend: importing this package registers its kernels (GPU, or CPU under the interpreter).

Set ``TRITON_INTERPRET=1`` before the first import of triton to run the kernels on CPU tensors.
"""

import functools
import os

import torch
import triton  # noqa: F401  (ImportError here leaves the backend unavailable)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Devices the Triton kernels accept: CUDA, plus CPU when running under the interpreter.
DEVICES = ("cpu", "cuda") if INTERPRET else ("cuda",)
# COLLIDER_TRITON_AUTOTUNE=0 runs fixed GPU configurations instead of tuning (fast test runs).
AUTOTUNE = not INTERPRET and os.environ.get("COLLIDER_TRITON_AUTOTUNE", "1") != "0"
# Input dtypes the kernels take; others (fp64) run the torch backend.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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

from collider_kernels.triton import attention_backward as _attention_backward  # noqa: E402,F401
from collider_kernels.triton import gemm as _gemm  # noqa: E402,F401
from collider_kernels.triton import rotary as _rotary  # noqa: E402,F401
from collider_kernels.triton import rowwise as _rowwise  # noqa: E402,F401
