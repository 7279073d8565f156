"""CuPy backend: importing this package registers its ops (CUDA only).

Tensors cross between PyTorch and CuPy through DLPack without copies, on PyTorch's current stream.
"""

import cupy  # noqa: F401  (ImportError here leaves the backend unavailable)

from collider_kernels.cupy import gemm as _gemm  # noqa: E402,F401
