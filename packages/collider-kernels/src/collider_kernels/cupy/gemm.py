"""CuPy gather/scatter kernels and cuBLAS GEMMs over kept rows.

The gather and the segmented scatter-add are CUDA raw kernels; the dense products run through
cuBLAS ``gemmEx`` with fp32 compute. Tensors cross from PyTorch through DLPack (no copies) and
everything runs on PyTorch's current CUDA stream. CuPy has no bfloat16 dtype, so 16-bit tensors
are handed over as int16 views and typed explicitly (``CUDA_R_16BF`` / ``CUDA_R_16F``) for cuBLAS
and by hand in the raw kernels.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import cupy
import numpy as np
import torch

from collider_kernels.backends import register
from collider_kernels.gather_matmul import _gather_matmul_torch
from collider_kernels.gathered_weight_grad import _gathered_weight_grad_torch
from collider_kernels.scatter_add_rows import _scatter_add_rows_torch, segment_plan

try:
    from cupy_backends.cuda.libs import cublas
except ImportError:  # older layouts
    from cupy.cuda import cublas  # type: ignore[no-redef]

DEVICES = ("cuda",)

# cudaDataType_t values and cuBLAS enums (stable across CUDA releases).
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_CUBLAS_COMPUTE_32F, _CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
_CUBLAS_GEMM_DEFAULT = -1

_CUDA_TYPE = {torch.float32: _CUDA_R_32F, torch.float16: _CUDA_R_16F, torch.bfloat16: _CUDA_R_16BF}
_KERNEL_DTYPES = tuple(_CUDA_TYPE)
# Dtype a tensor is viewed as before DLPack, so CuPy can import it.
_CARRIER = {torch.float32: torch.float32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.int64: torch.int64}

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
def _on_torch_stream(device: torch.device):
    """Make CuPy use the tensor's GPU and PyTorch's current stream on it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _external_stream(torch.cuda.current_stream(device).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        yield


def _cp(t: torch.Tensor):
    """Zero-copy CuPy view of ``t`` (16-bit floats as int16)."""
    return cupy.from_dlpack(t.view(_CARRIER[t.dtype]))


_CONVERT_SRC = r"""
__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_bf16(const unsigned short* p) {
    return __uint_as_float(((unsigned int)*p) << 16);
}
__device__ __forceinline__ float load_f16(const unsigned short* p) {
    float f; unsigned short h = *p;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_bf16(unsigned short* p, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { *p = (unsigned short)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    *p = (unsigned short)(u >> 16);
}
__device__ __forceinline__ void store_f16(unsigned short* p, float v) {
    unsigned short h;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(v));
    *p = h;
}
"""

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

_SEGMENT_SRC = r"""
extern "C" __global__ void segment_sum(const SRC_T* __restrict__ src, const long long* __restrict__ order,
                                       const long long* __restrict__ seg_start,
                                       const long long* __restrict__ seg_row, OUT_T* __restrict__ out,
                                       int F, long long src_stride, long long out_stride) {
    // Block (segment, column chunk): sum the segment's rows in sorted order, then add into out.
    const long long seg = blockIdx.x;
    const int f = blockIdx.y * blockDim.x + threadIdx.x;
    if (f >= F) return;
    const long long start = seg_start[seg], stop = seg_start[seg + 1];
    float acc = 0.0f;
    for (long long i = start; i < stop; ++i) acc += LOAD_SRC(src + order[i] * src_stride + f);
    OUT_T* o = out + seg_row[seg] * out_stride + f;
    STORE_OUT(o, acc + LOAD_OUT(o));
}
"""

_CTYPE = {torch.float32: ("float", "f32"), torch.float16: ("unsigned short", "f16"),
          torch.bfloat16: ("unsigned short", "bf16")}


@functools.cache
def _gather_kernel(unit_bytes: int, device_index: int):
    unit = {2: "unsigned short", 4: "unsigned int", 16: "uint4"}[unit_bytes]
    with cupy.cuda.Device(device_index):
        return cupy.RawKernel("#define UNIT " + unit + "\n" + _GATHER_SRC, "gather_rows")


@functools.cache
def _segment_kernel(src_dtype: torch.dtype, out_dtype: torch.dtype, device_index: int):
    (src_t, src_s), (out_t, out_s) = _CTYPE[src_dtype], _CTYPE[out_dtype]
    defs = (
        f"#define SRC_T {src_t}\n#define OUT_T {out_t}\n"
        f"#define LOAD_SRC load_{src_s}\n#define LOAD_OUT load_{out_s}\n#define STORE_OUT store_{out_s}\n"
    )
    with cupy.cuda.Device(device_index):
        return cupy.RawKernel(_CONVERT_SRC + defs + _SEGMENT_SRC, "segment_sum")


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
        (_cp(x), _cp(index64), _cp(rows), np.int32(units), np.int64(stride_bytes // unit)),
    )
    return rows


def _gemm(transa, transb, m, n, k, a, lda, b, ldb, c, ldc, beta, in_dtype, out_dtype):
    """Column-major cuBLAS ``C (m, n) = op(A) op(B) + beta C`` with fp32 compute on the current stream."""
    compute = _CUBLAS_COMPUTE_32F
    if in_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        compute = _CUBLAS_COMPUTE_32F_FAST_TF32
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.gemmEx(
        handle, transa, transb, m, n, k,
        _ONE.ctypes.data, a, _CUDA_TYPE[in_dtype], lda,
        b, _CUDA_TYPE[in_dtype], ldb,
        (_ONE if beta else _ZERO).ctypes.data, c, _CUDA_TYPE[out_dtype], ldc,
        compute, _CUBLAS_GEMM_DEFAULT,
    )


def _row_major(t: torch.Tensor, min_ld: int) -> torch.Tensor:
    """``t`` if its rows are unit-stride with a usable leading dimension, else a contiguous copy."""
    if t.stride(1) == 1 and t.stride(0) >= max(1, min_ld):
        return t
    return t.contiguous()


@register("gather_matmul", "cupy", DEVICES)
def gather_matmul_cupy(x, index, weight, bias):
    """``x[index] @ weightᵀ (+ bias)``: raw-kernel row gather, then one cuBLAS GEMM."""
    if x.dtype not in _KERNEL_DTYPES:
        return _gather_matmul_torch(x, index, weight, bias)
    N, K = weight.shape
    with _on_torch_stream(x.device):
        rows = x if index is None else gather_rows(x, index)  # (n, K)
        n = rows.shape[0]
        y = torch.empty((n, N), dtype=x.dtype, device=x.device)  # (n, N)
        if n == 0 or N == 0:
            return y
        if K == 0:
            return y.zero_() if bias is None else y.copy_(bias.expand(n, N))
        rows = _row_major(rows, K)
        weight = _row_major(weight, K)
        if bias is not None:
            _cp(y)[...] = _cp(bias.contiguous())  # broadcast into every row; the GEMM adds onto it
        # Row-major Y (n, N) is column-major Yᵀ (N, n) = W (N, K) · rowsᵀ (K, n).
        _gemm(
            _CUBLAS_OP_T, _CUBLAS_OP_N, N, n, K,
            weight.data_ptr(), weight.stride(0), rows.data_ptr(), rows.stride(0),
            y.data_ptr(), N, bias is not None, x.dtype, y.dtype,
        )
    return y


@register("gathered_weight_grad", "cupy", DEVICES)
def gathered_weight_grad_cupy(grad_out, x, index, out):
    """``grad_outᵀ @ x[index]`` (N, K) by a raw-kernel gather and one cuBLAS GEMM; adds into ``out``."""
    if grad_out.dtype not in _KERNEL_DTYPES or (out is not None and out.dtype not in _KERNEL_DTYPES):
        return _gathered_weight_grad_torch(grad_out, x, index, out)
    n, N = grad_out.shape
    K = x.shape[1]
    with _on_torch_stream(x.device):
        if out is None:
            result = torch.empty((N, K), dtype=x.dtype, device=x.device)  # (N, K)
        else:
            result = out
        if N == 0 or K == 0:
            return result
        if n == 0:
            return result if out is not None else result.zero_()
        rows = x if index is None else gather_rows(x, index)  # (n, K)
        rows = _row_major(rows, K)
        grad_out = _row_major(grad_out, N)
        direct = out is None or (
            out.dtype in (torch.float32, grad_out.dtype) and out.is_contiguous()
        )
        target = result if direct else torch.zeros((N, K), dtype=torch.float32, device=x.device)
        # Row-major dW (N, K) is column-major dWᵀ (K, N) = rowsᵀ (K, n) · grad_out (n, N).
        _gemm(
            _CUBLAS_OP_N, _CUBLAS_OP_T, K, N, n,
            rows.data_ptr(), rows.stride(0), grad_out.data_ptr(), grad_out.stride(0),
            target.data_ptr(), K, out is not None and direct, grad_out.dtype, target.dtype,
        )
        if target is not result:
            result.add_(target)
    return result


@register("scatter_add_rows", "cupy", DEVICES)
def scatter_add_rows_cupy(src, index, out, deterministic):
    """``out[index[i]] += src[i]`` by sorted segments: always in a fixed order (deterministic)."""
    if src.dtype not in _KERNEL_DTYPES or out.dtype not in _KERNEL_DTYPES:
        return _scatter_add_rows_torch(src, index, out, deterministic)
    n, F = src.shape
    if n == 0 or F == 0:
        return out
    with _on_torch_stream(src.device):
        if src.stride(1) != 1:
            src = src.contiguous()
        target = out if out.stride(1) == 1 else out.contiguous()
        order, seg_start, seg_row = segment_plan(index)
        threads = 256 if F >= 256 else max(32, F)
        grid = (seg_row.shape[0], (F + threads - 1) // threads)
        kernel = _segment_kernel(src.dtype, target.dtype, src.device.index)
        kernel(
            grid, (threads,),
            (_cp(src), _cp(order), _cp(seg_start), _cp(seg_row), _cp(target),
             np.int32(F), np.int64(src.stride(0)), np.int64(target.stride(0))),
        )
        if target is not out:
            out.copy_(target)
    return out
