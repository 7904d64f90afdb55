// moeba_common.cuh: device helpers shared by every kernels/*.cu file.
//
// - acc_t<T>: the type a kernel computes in (float for f32/bf16/f16, double for f64), with
//   to_acc / from_acc<T> (bf16 and f16 round to nearest even, once, on the way out);
// - strided_offset: flat logical index -> storage offset through dims/strides (fully unrolled over
//   MOEBA_MAX_DIMS, so the kernel-parameter arrays are read with constant indices and never copied
//   to local memory);
// - Pack<T>: 16 bytes of T for vectorised loads and stores;
// - warp reductions with shuffles and NaN-propagating max/min.
//
// Everything here is inline and header-only: the .cu files are compiled as one translation unit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "moeba_params.h"

namespace moeba {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }

// Storage offset of flat (row-major) index `i` of the iteration space `dims` (outermost first,
// `rank` of them) read through `strides`. Unrolled so that every array index is a constant.
template <typename I>
__device__ __forceinline__ int64_t strided_offset(I i, int rank, const int64_t (&dims)[MOEBA_MAX_DIMS],
                                                  const int64_t (&strides)[MOEBA_MAX_DIMS]) {
    int64_t off = 0;
#pragma unroll
    for (int d = MOEBA_MAX_DIMS - 1; d >= 0; --d) {
        if (d < rank) {
            const I size = (I)dims[d];
            const I q = i / size;
            off += (int64_t)(i - q * size) * strides[d];
            i = q;
        }
    }
    return off;
}

// 16 bytes of T, for one vectorised load or store.
template <typename T> struct alignas(16) Pack {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

__device__ __forceinline__ bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Global thread id and thread count of a 1-d grid-stride loop, in 64 bits.
__device__ __forceinline__ int64_t global_tid() { return (int64_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t global_threads() { return (int64_t)gridDim.x * blockDim.x; }

template <typename C> __device__ __forceinline__ bool is_nan(C x) { return x != x; }

// max/min that return NaN when either side is NaN (torch semantics).
template <typename C> __device__ __forceinline__ C nan_max(C a, C b) {
    return (is_nan(a) || a > b) ? a : b;
}
template <typename C> __device__ __forceinline__ C nan_min(C a, C b) {
    return (is_nan(a) || a < b) ? a : b;
}

__device__ __forceinline__ float exp_c(float x) { return expf(x); }
__device__ __forceinline__ double exp_c(double x) { return exp(x); }
__device__ __forceinline__ float log_c(float x) { return logf(x); }
__device__ __forceinline__ double log_c(double x) { return log(x); }

template <typename C> __device__ __forceinline__ C neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -__int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return -__longlong_as_double(0x7ff0000000000000LL); }
template <typename C> __device__ __forceinline__ C pos_inf() { return -neg_inf<C>(); }

// Warp-wide reductions: every lane ends with the result.
template <typename C> __device__ __forceinline__ C warp_sum(C v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <typename C> __device__ __forceinline__ C warp_max(C v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
template <typename C> __device__ __forceinline__ C warp_min(C v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = nan_min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

}  // namespace moeba
