"""Triton backend: importing this package registers its kernels (GPU, or CPU under the interpreter).

Set ``TRITON_INTERPRET=1`` before the first import of triton to run the kernels on CPU tensors.
"""

import os

import triton  # noqa: F401  (ImportError here leaves the backend unavailable)

# Devices the Triton kernels accept: CUDA, plus CPU when running under the interpreter.
DEVICES = ("cpu", "cuda") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)

from collider_kernels.triton import attention_backward as _attention_backward  # noqa: E402,F401
from collider_kernels.triton import gemm as _gemm  # noqa: E402,F401
from collider_kernels.triton import rowwise as _rowwise  # noqa: E402,F401
