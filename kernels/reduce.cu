// reduce.cu: sum / mean / max / min over any set of dims, and argmax along one dim.
//
// The launcher (crates/kernels/src/cuda/reduce.rs) describes the input as n_out rows of n_red
// elements (ReduceParams). Three shapes of kernel:
//
//   reduce_warp_{f32,f64,bf16,f16}(ReduceParams p, const T* x, T* y)
//       one warp per row (8 rows per 256-thread block): rows of up to a few thousand elements;
//   reduce_block_{...}(ReduceParams p, const T* x, T* y)
//       one block per row, warp shuffles then shared memory across warps: long rows;
//   reduce_cols_{...}(ReduceParams p, const T* x, T* y)
//       one thread per output element looping over its row: when the reduced elements are not
//       adjacent but neighbouring outputs are (e.g. a sum over dim 0), so that loads coalesce.
//   argmax_warp_{...} / argmax_block_{...}(ReduceParams p, const T* x, uint32_t* y)
//       like reduce_warp / reduce_block, keeping (value, index): the first index of the maximum,
//       NaN counting as the maximum.
//
// Accumulation is in f32 (f64 for f64 input); max/min propagate NaN. Over an empty set the sum is
// 0 and the mean, max and min are NaN (as on the CPU).
#include "moeba_common.cuh"

namespace moeba {

template <typename C> struct SumR {
    static __device__ __forceinline__ C init() { return C(0); }
    static __device__ __forceinline__ C comb(C a, C b) { return a + b; }
    static __device__ __forceinline__ C warp(C v) { return warp_sum(v); }
};
template <typename C> struct MaxR {
    static __device__ __forceinline__ C init() { return neg_inf<C>(); }
    static __device__ __forceinline__ C comb(C a, C b) { return nan_max(a, b); }
    static __device__ __forceinline__ C warp(C v) { return warp_max(v); }
};
template <typename C> struct MinR {
    static __device__ __forceinline__ C init() { return pos_inf<C>(); }
    static __device__ __forceinline__ C comb(C a, C b) { return nan_min(a, b); }
    static __device__ __forceinline__ C warp(C v) { return warp_min(v); }
};

// Offset of element r of a row (through red_dims/red_strides).
__device__ __forceinline__ int64_t red_offset(const ReduceParams &p, int64_t r) {
    if (p.red_contiguous) return r;
    if (p.red_rank == 1) return r * p.red_strides[0];
    // The launcher makes inputs with a strided multi-dim reduction of 2^31 elements or more
    // contiguous first, so 32-bit index math is enough here.
    return strided_offset<uint32_t>((uint32_t)r, p.red_rank, p.red_dims, p.red_strides);
}

__device__ __forceinline__ int64_t row_offset(const ReduceParams &p, int64_t o) {
    return strided_offset<uint64_t>((uint64_t)o, p.out_rank, p.out_dims, p.out_strides);
}

template <typename T, typename C> __device__ __forceinline__ T finish(const ReduceParams &p, C acc) {
    if (p.op == MOEBA_REDUCE_MEAN) acc = acc / (C)p.n_red;
    if (p.n_red == 0 && p.op != MOEBA_REDUCE_SUM) acc = neg_inf<C>() - neg_inf<C>();  // NaN
    return from_acc<T>(acc);
}

// One row per warp (WARP) or per block (!WARP).
template <typename T, typename R, bool WARP>
__device__ __forceinline__ void reduce_rows(const ReduceParams &p, const T *__restrict__ x, T *__restrict__ y) {
    using C = acc_t<T>;
    __shared__ C partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int64_t first = WARP ? (int64_t)blockIdx.x * nwarps + warp : blockIdx.x;
    const int64_t step = WARP ? (int64_t)gridDim.x * nwarps : gridDim.x;
    const int tid = WARP ? lane : threadIdx.x, nt = WARP ? 32 : blockDim.x;
    for (int64_t row = first; row < p.n_out; row += step) {
        const T *xr = x + row_offset(p, row);
        C acc = R::init();
        if (p.red_contiguous) {
            for (int64_t r = tid; r < p.n_red; r += nt) acc = R::comb(acc, to_acc(xr[r]));
        } else {
            for (int64_t r = tid; r < p.n_red; r += nt) acc = R::comb(acc, to_acc(xr[red_offset(p, r)]));
        }
        acc = R::warp(acc);
        if (!WARP) {
            if (lane == 0) partial[warp] = acc;
            __syncthreads();
            if (warp == 0) {
                acc = lane < nwarps ? partial[lane] : R::init();
                acc = R::warp(acc);
            }
            __syncthreads();
            if (threadIdx.x == 0) y[row] = finish<T>(p, acc);
        } else if (lane == 0) {
            y[row] = finish<T>(p, acc);
        }
    }
}

// One output per thread, looping over its row.
template <typename T, typename R>
__device__ __forceinline__ void reduce_cols(const ReduceParams &p, const T *__restrict__ x, T *__restrict__ y) {
    using C = acc_t<T>;
    const int64_t tid = global_tid(), nt = global_threads();
    for (int64_t o = tid; o < p.n_out; o += nt) {
        const T *xr = x + row_offset(p, o);
        C acc = R::init();
        if (p.red_rank == 1) {
            const int64_t s = p.red_strides[0];
            for (int64_t r = 0; r < p.n_red; ++r) acc = R::comb(acc, to_acc(xr[r * s]));
        } else {
            for (int64_t r = 0; r < p.n_red; ++r) acc = R::comb(acc, to_acc(xr[red_offset(p, r)]));
        }
        y[o] = finish<T>(p, acc);
    }
}

template <typename T, int KIND>
__device__ __forceinline__ void reduce_dispatch(const ReduceParams &p, const T *x, T *y) {
    using C = acc_t<T>;
    switch (p.op) {
    case MOEBA_REDUCE_SUM:
    case MOEBA_REDUCE_MEAN:
        if (KIND == 0) reduce_rows<T, SumR<C>, true>(p, x, y);
        else if (KIND == 1) reduce_rows<T, SumR<C>, false>(p, x, y);
        else reduce_cols<T, SumR<C>>(p, x, y);
        break;
    case MOEBA_REDUCE_MAX:
        if (KIND == 0) reduce_rows<T, MaxR<C>, true>(p, x, y);
        else if (KIND == 1) reduce_rows<T, MaxR<C>, false>(p, x, y);
        else reduce_cols<T, MaxR<C>>(p, x, y);
        break;
    case MOEBA_REDUCE_MIN:
        if (KIND == 0) reduce_rows<T, MinR<C>, true>(p, x, y);
        else if (KIND == 1) reduce_rows<T, MinR<C>, false>(p, x, y);
        else reduce_cols<T, MinR<C>>(p, x, y);
        break;
    default: break;
    }
}

// ---------------------------------------------------------------- argmax

// Whether (va, ia) beats (vb, ib): NaN is the largest value, ties go to the smaller index.
template <typename C> __device__ __forceinline__ bool arg_better(C va, int64_t ia, C vb, int64_t ib) {
    const bool na = is_nan(va), nb = is_nan(vb);
    if (na || nb) return na && (!nb || ia < ib);
    return va > vb || (va == vb && ia < ib);
}

template <typename C> __device__ __forceinline__ void warp_argmax(C &v, int64_t &i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const C ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int64_t oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (arg_better(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
}

template <typename T, bool WARP>
__device__ __forceinline__ void argmax_rows(const ReduceParams &p, const T *__restrict__ x,
                                            uint32_t *__restrict__ y) {
    using C = acc_t<T>;
    __shared__ C pv[32];
    __shared__ int64_t pi[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int64_t first = WARP ? (int64_t)blockIdx.x * nwarps + warp : blockIdx.x;
    const int64_t step = WARP ? (int64_t)gridDim.x * nwarps : gridDim.x;
    const int tid = WARP ? lane : threadIdx.x, nt = WARP ? 32 : blockDim.x;
    for (int64_t row = first; row < p.n_out; row += step) {
        const T *xr = x + row_offset(p, row);
        C best = neg_inf<C>();
        int64_t bi = INT64_MAX;
        for (int64_t r = tid; r < p.n_red; r += nt) {
            const C v = to_acc(xr[red_offset(p, r)]);
            if (arg_better(v, r, best, bi)) {
                best = v;
                bi = r;
            }
        }
        warp_argmax(best, bi);
        if (!WARP) {
            if (lane == 0) {
                pv[warp] = best;
                pi[warp] = bi;
            }
            __syncthreads();
            if (warp == 0) {
                best = lane < nwarps ? pv[lane] : neg_inf<C>();
                bi = lane < nwarps ? pi[lane] : INT64_MAX;
                warp_argmax(best, bi);
            }
            __syncthreads();
            if (threadIdx.x == 0) y[row] = (uint32_t)bi;
        } else if (lane == 0) {
            y[row] = (uint32_t)bi;
        }
    }
}

}  // namespace moeba

#define MOEBA_REDUCE(SUFFIX, T)                                                                              \
    extern "C" __global__ void reduce_warp_##SUFFIX(ReduceParams p, const T *x, T *y) {                      \
        moeba::reduce_dispatch<T, 0>(p, x, y);                                                               \
    }                                                                                                        \
    extern "C" __global__ void reduce_block_##SUFFIX(ReduceParams p, const T *x, T *y) {                     \
        moeba::reduce_dispatch<T, 1>(p, x, y);                                                               \
    }                                                                                                        \
    extern "C" __global__ void reduce_cols_##SUFFIX(ReduceParams p, const T *x, T *y) {                      \
        moeba::reduce_dispatch<T, 2>(p, x, y);                                                               \
    }                                                                                                        \
    extern "C" __global__ void argmax_warp_##SUFFIX(ReduceParams p, const T *x, uint32_t *y) {               \
        moeba::argmax_rows<T, true>(p, x, y);                                                                \
    }                                                                                                        \
    extern "C" __global__ void argmax_block_##SUFFIX(ReduceParams p, const T *x, uint32_t *y) {              \
        moeba::argmax_rows<T, false>(p, x, y);                                                               \
    }

MOEBA_REDUCE(f32, float)
MOEBA_REDUCE(f64, double)
MOEBA_REDUCE(bf16, __nv_bfloat16)
MOEBA_REDUCE(f16, __half)

#undef MOEBA_REDUCE
