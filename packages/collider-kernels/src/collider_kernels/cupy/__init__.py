"""CuPy backend: importing this package registers its ops (CUDA only).

One module per op (``gather_matmul``, ``gathered_weight_grad``, ``scatter_add_rows``); the DLPack,
stream, row-gather and cuBLAS interop they share is in :mod:`~collider_kernels.cupy._interop`.
"""

import cupy  # noqa: F401  (ImportError here leaves the backend unavailable)

from collider_kernels.cupy import gather_matmul, gathered_weight_grad, scatter_add_rows  # noqa: F401
