"""CuPy row scatter-add ``out[index[i]] += src[i]`` by sorted segments: always in a fixed order.

A raw CUDA kernel sums each segment of equal destination rows (see
:func:`collider_kernels._segments.segment_plan`) in sorted order, in fp32, and adds the sum into
``out`` converting from and to its dtype by hand (CuPy has no bfloat16).
"""

from __future__ import annotations

import functools

import cupy
import numpy as np
import torch

from collider_kernels._segments import scatter_rows_with, segment_plan
from collider_kernels.backends import register
from collider_kernels.cupy._interop import DEVICES, TYPES, as_cupy, on_torch_stream
from collider_kernels.dtypes import KERNEL_DTYPES

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


@functools.cache
def _segment_kernel(src_dtype: torch.dtype, out_dtype: torch.dtype, device_index: int):
    (src_t, src_s), (out_t, out_s) = ((TYPES[d].ctype, TYPES[d].suffix) for d in (src_dtype, out_dtype))
    defs = (
        f"#define SRC_T {src_t}\n#define OUT_T {out_t}\n"
        f"#define LOAD_SRC load_{src_s}\n#define LOAD_OUT load_{out_s}\n#define STORE_OUT store_{out_s}\n"
    )
    with cupy.cuda.Device(device_index):
        return cupy.RawKernel(_CONVERT_SRC + defs + _SEGMENT_SRC, "segment_sum")


@register("scatter_add_rows", "cupy", devices=DEVICES, dtypes=KERNEL_DTYPES)
def scatter_add_rows_cupy(src, index, out, deterministic):
    """``out[index[i]] += src[i]`` by sorted segments: always in a fixed order (deterministic)."""

    def launch(src, index, target):
        F = src.shape[1]
        with on_torch_stream(src.device):
            order, seg_start, seg_row = segment_plan(index)
            threads = 256 if F >= 256 else max(32, F)
            grid = (seg_row.shape[0], (F + threads - 1) // threads)
            kernel = _segment_kernel(src.dtype, target.dtype, src.device.index)
            kernel(
                grid, (threads,),
                (as_cupy(src), as_cupy(order), as_cupy(seg_start), as_cupy(seg_row), as_cupy(target),
                 np.int32(F), np.int64(src.stride(0)), np.int64(target.stride(0))),
            )

    return scatter_rows_with(src, index, out, launch)
