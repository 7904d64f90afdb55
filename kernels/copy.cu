// copy.cu: strided copies and dtype casts.
//
//   copy_b{2,4,8}(UnaryParams p, const uintN_t* x, uintN_t* y)
//       y[...] = x[...] for elements of 2, 4 or 8 bytes (any dtype: the bits are moved as is).
//       x is read through x_strides; y is contiguous, or strided through y_strides when
//       p.y_contiguous == 0 (used to write each input of a concat into its slice of the output).
//   cast_{src}_{dst}(UnaryParams p, const S* x, D* y)
//       y = x converted, y contiguous, for every pair of f32, f64, bf16, f16, i64, u32.
//       Conversions match moeba's CPU ones (Rust `as` through f64): floats round to nearest even,
//       float -> int truncates toward zero and saturates, NaN -> 0.
#include "moeba_common.cuh"

namespace moeba {

template <typename T>
__device__ __forceinline__ void copy_impl(const UnaryParams &p, const T *__restrict__ x, T *__restrict__ y) {
    const int64_t n = p.numel, tid = global_tid(), nt = global_threads();
    if (p.x_contiguous && p.y_contiguous) {
        int64_t start = 0;
        if (aligned16(x) && aligned16(y)) {
            constexpr int V = Pack<T>::N;
            const int64_t nv = n / V;
            const Pack<T> *xv = reinterpret_cast<const Pack<T> *>(x);
            Pack<T> *yv = reinterpret_cast<Pack<T> *>(y);
            for (int64_t v = tid; v < nv; v += nt) yv[v] = xv[v];
            start = nv * V;
        }
        for (int64_t i = start + tid; i < n; i += nt) y[i] = x[i];
    } else if (n < (int64_t(1) << 31)) {
        for (int64_t i = tid; i < n; i += nt) {
            const uint32_t j = (uint32_t)i;
            const int64_t ox = p.x_contiguous ? i : strided_offset<uint32_t>(j, p.rank, p.dims, p.x_strides);
            const int64_t oy = p.y_contiguous ? i : strided_offset<uint32_t>(j, p.rank, p.dims, p.y_strides);
            y[oy] = x[ox];
        }
    } else {
        for (int64_t i = tid; i < n; i += nt) {
            const uint64_t j = (uint64_t)i;
            const int64_t ox = p.x_contiguous ? i : strided_offset<uint64_t>(j, p.rank, p.dims, p.x_strides);
            const int64_t oy = p.y_contiguous ? i : strided_offset<uint64_t>(j, p.rank, p.dims, p.y_strides);
            y[oy] = x[ox];
        }
    }
}

// Every source converts to double exactly (i64 rounds to nearest, as Rust's `as f64` does).
__device__ __forceinline__ double cast_in(float x) { return (double)x; }
__device__ __forceinline__ double cast_in(double x) { return x; }
__device__ __forceinline__ double cast_in(__nv_bfloat16 x) { return (double)__bfloat162float(x); }
__device__ __forceinline__ double cast_in(__half x) { return (double)__half2float(x); }
__device__ __forceinline__ double cast_in(long long x) { return __ll2double_rn(x); }
__device__ __forceinline__ double cast_in(unsigned int x) { return (double)x; }

template <typename D> __device__ __forceinline__ D cast_out(double x);
template <> __device__ __forceinline__ float cast_out<float>(double x) { return __double2float_rn(x); }
template <> __device__ __forceinline__ double cast_out<double>(double x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 cast_out<__nv_bfloat16>(double x) {
    return __double2bfloat16(x);
}
template <> __device__ __forceinline__ __half cast_out<__half>(double x) { return __double2half(x); }
// cvt.rzi saturates and maps NaN to 0, like Rust's `as`.
template <> __device__ __forceinline__ long long cast_out<long long>(double x) { return __double2ll_rz(x); }
template <> __device__ __forceinline__ unsigned int cast_out<unsigned int>(double x) {
    return __double2uint_rz(x);
}

template <typename S, typename D> __device__ __forceinline__ D convert(S x) { return cast_out<D>(cast_in(x)); }
// Exact or single-rounding shortcuts that give the same result as going through double.
template <> __device__ __forceinline__ float convert<__nv_bfloat16, float>(__nv_bfloat16 x) {
    return __bfloat162float(x);
}
template <> __device__ __forceinline__ float convert<__half, float>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ __nv_bfloat16 convert<float, __nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half convert<float, __half>(float x) { return __float2half_rn(x); }

template <typename S, typename D>
__device__ __forceinline__ void cast_impl(const UnaryParams &p, const S *__restrict__ x, D *__restrict__ y) {
    const int64_t n = p.numel, tid = global_tid(), nt = global_threads();
    if (p.x_contiguous) {
        for (int64_t i = tid; i < n; i += nt) y[i] = convert<S, D>(x[i]);
    } else {
        // Strided input: n < 2^31 here (larger strided inputs are made contiguous first).
        for (int64_t i = tid; i < n; i += nt)
            y[i] = convert<S, D>(x[strided_offset<uint32_t>((uint32_t)i, p.rank, p.dims, p.x_strides)]);
    }
}

}  // namespace moeba

extern "C" __global__ void copy_b2(UnaryParams p, const uint16_t *x, uint16_t *y) { moeba::copy_impl(p, x, y); }
extern "C" __global__ void copy_b4(UnaryParams p, const uint32_t *x, uint32_t *y) { moeba::copy_impl(p, x, y); }
extern "C" __global__ void copy_b8(UnaryParams p, const uint64_t *x, uint64_t *y) { moeba::copy_impl(p, x, y); }

#define MOEBA_CAST(SN, S, DN, D)                                                 \
    extern "C" __global__ void cast_##SN##_##DN(UnaryParams p, const S *x, D *y) { \
        moeba::cast_impl<S, D>(p, x, y);                                         \
    }
#define MOEBA_CAST_FROM(SN, S)                  \
    MOEBA_CAST(SN, S, f32, float)               \
    MOEBA_CAST(SN, S, f64, double)              \
    MOEBA_CAST(SN, S, bf16, __nv_bfloat16)      \
    MOEBA_CAST(SN, S, f16, __half)              \
    MOEBA_CAST(SN, S, i64, long long)           \
    MOEBA_CAST(SN, S, u32, unsigned int)

// Same-dtype pairs are compiled too (a cast to the same dtype is a plain copy on the host side,
// but keeping the table square keeps the launcher's name lookup trivial).
MOEBA_CAST_FROM(f32, float)
MOEBA_CAST_FROM(f64, double)
MOEBA_CAST_FROM(bf16, __nv_bfloat16)
MOEBA_CAST_FROM(f16, __half)
MOEBA_CAST_FROM(i64, long long)
MOEBA_CAST_FROM(u32, unsigned int)

#undef MOEBA_CAST_FROM
#undef MOEBA_CAST
