// softmax.cu: softmax and log-softmax along one dim.
//
//   softmax_warp_{f32,f64,bf16,f16}(SoftmaxParams p, const T* x, T* y)
//       one warp per row (8 rows per 256-thread block), for rows of up to 1024 elements;
//   softmax_block_{...}(SoftmaxParams p, const T* x, T* y)
//       one block per row, for longer rows.
//
// One pass computes the row's max and the sum of exp(x - max) together ("online softmax": each
// thread keeps (m, s) and rescales s when m grows; threads merge their pairs with warp shuffles,
// then across warps through shared memory). A second pass writes exp(x - m) / s, or
// x - m - log(s) when p.log is set. f32 compute for bf16/f16, f64 for f64. A row of all -inf
// gives NaN (0/0), as in torch; NaN propagates.
#include "moeba_common.cuh"

namespace moeba {

// Merges (m, s) with (om, os): the max and the sum rescaled to it. -inf maxima contribute 0.
template <typename C> __device__ __forceinline__ void online_merge(C &m, C &s, C om, C os) {
    const C nm = nan_max(m, om);
    const C a = (m == neg_inf<C>()) ? C(0) : s * exp_c(m - nm);
    const C b = (om == neg_inf<C>()) ? C(0) : os * exp_c(om - nm);
    m = nm;
    s = a + b;
}

template <typename T, bool WARP>
__device__ __forceinline__ void softmax_rows(const SoftmaxParams &p, const T *__restrict__ x, T *__restrict__ y) {
    using C = acc_t<T>;
    __shared__ C sm[32];
    __shared__ C ss[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int64_t first = WARP ? (int64_t)blockIdx.x * nwarps + warp : blockIdx.x;
    const int64_t step = WARP ? (int64_t)gridDim.x * nwarps : gridDim.x;
    const int tid = WARP ? lane : threadIdx.x, nt = WARP ? 32 : blockDim.x;
    const int64_t L = p.row_len, xs = p.x_stride, ys = p.y_stride;
    for (int64_t row = first; row < p.n_rows; row += step) {
        const T *xr = x + strided_offset<uint64_t>((uint64_t)row, p.outer_rank, p.outer_dims, p.x_outer_strides);
        T *yr = y + strided_offset<uint64_t>((uint64_t)row, p.outer_rank, p.outer_dims, p.y_outer_strides);
        C m = neg_inf<C>(), s = C(0);
        for (int64_t j = tid; j < L; j += nt) {
            const C v = to_acc(xr[j * xs]);
            if (v > m) {
                s = s * exp_c(m - v) + C(1);
                m = v;
            } else if (v != neg_inf<C>()) {
                s += exp_c(v - m);  // NaN v (or m) makes s NaN
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const C om = __shfl_xor_sync(0xffffffffu, m, o);
            const C os = __shfl_xor_sync(0xffffffffu, s, o);
            online_merge(m, s, om, os);
        }
        if (!WARP) {
            if (lane == 0) {
                sm[warp] = m;
                ss[warp] = s;
            }
            __syncthreads();
            m = neg_inf<C>();
            s = C(0);
            for (int w = 0; w < nwarps; ++w) online_merge(m, s, sm[w], ss[w]);
            __syncthreads();
        }
        if (p.log) {
            const C lse = m + log_c(s);
            for (int64_t j = tid; j < L; j += nt) yr[j * ys] = from_acc<T>(to_acc(xr[j * xs]) - lse);
        } else {
            const C inv = C(1) / s;
            for (int64_t j = tid; j < L; j += nt) yr[j * ys] = from_acc<T>(exp_c(to_acc(xr[j * xs]) - m) * inv);
        }
    }
}

}  // namespace moeba

#define MOEBA_SOFTMAX(SUFFIX, T)                                                       \
    extern "C" __global__ void softmax_warp_##SUFFIX(SoftmaxParams p, const T *x, T *y) {  \
        moeba::softmax_rows<T, true>(p, x, y);                                         \
    }                                                                                  \
    extern "C" __global__ void softmax_block_##SUFFIX(SoftmaxParams p, const T *x, T *y) { \
        moeba::softmax_rows<T, false>(p, x, y);                                        \
    }

MOEBA_SOFTMAX(f32, float)
MOEBA_SOFTMAX(f64, double)
MOEBA_SOFTMAX(bf16, __nv_bfloat16)
MOEBA_SOFTMAX(f16, __half)

#undef MOEBA_SOFTMAX
