"""CuPy interop shared by the CuPy ops: DLPack views, PyTorch's stream, the row gather, cuBLAS.

Tensors cross from PyTorch through DLPack (no copies) and everything runs on PyTorch's current CUDA
stream. CuPy has no bfloat16 dtype, so 16-bit tensors are handed over as int16 views and typed
explicitly (``CUDA_R_16BF`` / ``CUDA_R_16F``) for cuBLAS and by hand in the raw kernels; the
dtype table :data:`TYPES` holds all of it. The dense products run through cuBLAS ``gemmEx`` with
fp32 compute.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import cupy
import numpy as np
import torch

try:
    from cupy_backends.cuda.libs import cublas
except ImportError:  # older layouts
    from cupy.cuda import cublas  # type: ignore[no-redef]

DEVICES = ("cuda",)

# cuBLAS enums (stable across CUDA releases).
OP_N, OP_T = 0, 1
_CUBLAS_COMPUTE_32F, _CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
_CUBLAS_GEMM_DEFAULT = -1


@dataclass(frozen=True)
class DeviceType:
    """How a torch float dtype is handed to CUDA code."""

    cuda: int  # cudaDataType_t for cuBLAS
    carrier: torch.dtype  # the dtype it is viewed as before DLPack, so CuPy can import it
    ctype: str  # C type in the raw kernels
    suffix: str  # of the raw kernels' load_/store_ conversion functions


TYPES = {
    torch.float32: DeviceType(0, torch.float32, "float", "f32"),
    torch.float16: DeviceType(2, torch.int16, "unsigned short", "f16"),
    torch.bfloat16: DeviceType(14, torch.int16, "unsigned short", "bf16"),
}

_ONE = np.ones(1, dtype=np.float32)
_ZERO = np.zeros(1, dtype=np.float32)

_STREAMS: dict[tuple[int, int], object] = {}


def _external_stream(ptr: int, device_index: int):
    """CuPy wrapper of a CUDA stream owned by PyTorch (cached: creating one costs host time)."""
    key = (device_index, ptr)
    stream = _STREAMS.get(key)
    if stream is None:
        if len(_STREAMS) > 64:
            _STREAMS.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = cupy.cuda.ExternalStream(ptr, device_index)
        _STREAMS[key] = stream
    return stream


@contextlib.contextmanager
def on_torch_stream(device: torch.device):
    """Make CuPy use the tensor's GPU and PyTorch's current stream on it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _external_stream(torch.cuda.current_stream(device).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        yield


def as_cupy(t: torch.Tensor):
    """Zero-copy CuPy view of ``t`` (16-bit floats as int16; integer tensors as they are)."""
    return cupy.from_dlpack(t.view(TYPES[t.dtype].carrier) if t.dtype in TYPES else t)


_GATHER_SRC = r"""
extern "C" __global__ void gather_rows(const UNIT* __restrict__ src, const long long* __restrict__ index,
                                       UNIT* __restrict__ dst, int units, long long src_stride) {
    // One block per output row; UNIT is a 2-, 4- or 16-byte chunk of a row.
    const long long r = blockIdx.x;
    const UNIT* s = src + index[r] * src_stride;
    UNIT* d = dst + r * (long long)units;
    for (int c = threadIdx.x; c < units; c += blockDim.x) d[c] = s[c];
}
"""


@functools.cache
def _gather_kernel(unit_bytes: int, device_index: int):
    unit = {2: "unsigned short", 4: "unsigned int", 16: "uint4"}[unit_bytes]
    with cupy.cuda.Device(device_index):
        return cupy.RawKernel("#define UNIT " + unit + "\n" + _GATHER_SRC, "gather_rows")



def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` as a new contiguous (n, K) tensor, by a raw CUDA kernel (call on the torch stream)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    n, K = index.shape[0], x.shape[1]
    rows = torch.empty((n, K), dtype=x.dtype, device=x.device)  # (n, K)
    if n == 0 or K == 0:
        return rows
    item = x.element_size()
    row_bytes, stride_bytes = K * item, x.stride(0) * item
    if row_bytes % 16 == 0 and stride_bytes % 16 == 0 and x.data_ptr() % 16 == 0:
        unit = 16
    elif row_bytes % 4 == 0 and stride_bytes % 4 == 0 and x.data_ptr() % 4 == 0:
        unit = 4
    else:
        unit = 2 if item == 2 else item
    units = row_bytes // unit
    kernel = _gather_kernel(unit, x.device.index)
    # The kernel only moves bits; a strided source is passed by its data pointer and row stride.
    index64 = index.to(torch.int64).contiguous()
    threads = min(256, max(32, units))
    kernel(
        (n,), (threads,),
        (as_cupy(x), as_cupy(index64), as_cupy(rows), np.int32(units), np.int64(stride_bytes // unit)),
    )
    return rows


def cublas_gemm(transa, transb, m, n, k, a, lda, b, ldb, c, ldc, beta, in_dtype, out_dtype):
    """Column-major cuBLAS ``C (m, n) = op(A) op(B) + beta C`` with fp32 compute on the current stream."""
    compute = _CUBLAS_COMPUTE_32F
    if in_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        compute = _CUBLAS_COMPUTE_32F_FAST_TF32
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.gemmEx(
        handle, transa, transb, m, n, k,
        _ONE.ctypes.data, a, TYPES[in_dtype].cuda, lda,
        b, TYPES[in_dtype].cuda, ldb,
        (_ONE if beta else _ZERO).ctypes.data, c, TYPES[out_dtype].cuda, ldc,
        compute, _CUBLAS_GEMM_DEFAULT,
    )


def _row_major(t: torch.Tensor, min_ld: int) -> torch.Tensor:
    """``t`` if its rows are unit-stride with a usable leading dimension, else a contiguous copy."""
    if t.stride(1) == 1 and t.stride(0) >= max(1, min_ld):
        return t
    return t.contiguous()


def row_major(t: torch.Tensor, min_ld: int) -> torch.Tensor:
    """``t`` if its rows are unit-stride with a usable leading dimension, else a contiguous copy."""
    if t.stride(1) == 1 and t.stride(0) >= max(1, min_ld):
        return t
    return t.contiguous()
