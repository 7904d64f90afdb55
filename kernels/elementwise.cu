// elementwise.cu: one- and two-input elementwise kernels.
//
//   unary_{f32,f64,bf16,f16}(UnaryParams p, const T* x, T* y)
//       y = op(x) for every MOEBA_UNARY_* op, including affine (x*s0+s1), powf (x^s0) and clamp.
//   unary_backward_{...}(UnaryParams p, const T* x, const T* dy, T* dx)
//       dx = dy * op'(x) for the ops of moeba_kernels::ops::UnaryOp.
//   binary_{...}(BinaryParams p, const T* a, const T* b, T* y)
//       y = a op b with broadcasting (stride-0 dims).
//
// The output is contiguous. The op is chosen once per launch by a switch outside the loop, so each
// op gets its own specialised loop. Contiguous inputs with 16-byte-aligned pointers take a
// vectorised path (16-byte loads and stores); strided inputs compute offsets with 32-bit index
// math (the launcher makes strided inputs of 2^31 elements or more contiguous first, so that the
// 64-bit path is not compiled into every op). bf16/f16 compute in f32 and round once.
#include "moeba_common.cuh"

namespace moeba {

// ---------------------------------------------------------------- loops

// y[i] = f(x[...]) over the iteration space of p; y contiguous.
template <typename T, typename F>
__device__ __forceinline__ void map1(const UnaryParams &p, const T *__restrict__ x, T *__restrict__ y, F f) {
    const int64_t n = p.numel, tid = global_tid(), nt = global_threads();
    if (p.x_contiguous) {
        int64_t start = 0;
        if (aligned16(x) && aligned16(y)) {
            constexpr int V = Pack<T>::N;
            const int64_t nv = n / V;
            const Pack<T> *xv = reinterpret_cast<const Pack<T> *>(x);
            Pack<T> *yv = reinterpret_cast<Pack<T> *>(y);
            for (int64_t v = tid; v < nv; v += nt) {
                const Pack<T> a = xv[v];
                Pack<T> o;
#pragma unroll
                for (int k = 0; k < V; ++k) o.v[k] = from_acc<T>(f(to_acc(a.v[k])));
                yv[v] = o;
            }
            start = nv * V;
        }
        for (int64_t i = start + tid; i < n; i += nt) y[i] = from_acc<T>(f(to_acc(x[i])));
    } else {
        // Strided input: the launcher guarantees n < 2^31 here (it copies larger strided inputs
        // to contiguous first), so the offsets use 32-bit index math.
        for (int64_t i = tid; i < n; i += nt)
            y[i] = from_acc<T>(f(to_acc(x[strided_offset<uint32_t>((uint32_t)i, p.rank, p.dims, p.x_strides)])));
    }
}

// y[i] = f(a[...], b[...]) over `dims`; y contiguous.
template <typename T, typename F>
__device__ __forceinline__ void map2(int64_t n, int rank, const int64_t (&dims)[MOEBA_MAX_DIMS],
                                     const int64_t (&as)[MOEBA_MAX_DIMS], const int64_t (&bs)[MOEBA_MAX_DIMS],
                                     bool a_contig, bool b_contig, const T *__restrict__ a,
                                     const T *__restrict__ b, T *__restrict__ y, F f) {
    const int64_t tid = global_tid(), nt = global_threads();
    if (a_contig && b_contig) {
        int64_t start = 0;
        if (aligned16(a) && aligned16(b) && aligned16(y)) {
            constexpr int V = Pack<T>::N;
            const int64_t nv = n / V;
            const Pack<T> *av = reinterpret_cast<const Pack<T> *>(a);
            const Pack<T> *bv = reinterpret_cast<const Pack<T> *>(b);
            Pack<T> *yv = reinterpret_cast<Pack<T> *>(y);
            for (int64_t v = tid; v < nv; v += nt) {
                const Pack<T> pa = av[v], pb = bv[v];
                Pack<T> o;
#pragma unroll
                for (int k = 0; k < V; ++k) o.v[k] = from_acc<T>(f(to_acc(pa.v[k]), to_acc(pb.v[k])));
                yv[v] = o;
            }
            start = nv * V;
        }
        for (int64_t i = start + tid; i < n; i += nt) y[i] = from_acc<T>(f(to_acc(a[i]), to_acc(b[i])));
    } else {
        // At least one strided operand: n < 2^31 here (see map1).
        for (int64_t i = tid; i < n; i += nt) {
            const uint32_t j = (uint32_t)i;
            const int64_t oa = a_contig ? i : strided_offset<uint32_t>(j, rank, dims, as);
            const int64_t ob = b_contig ? i : strided_offset<uint32_t>(j, rank, dims, bs);
            y[i] = from_acc<T>(f(to_acc(a[oa]), to_acc(b[ob])));
        }
    }
}

// ---------------------------------------------------------------- math in float / double

__device__ __forceinline__ float m_exp(float x) { return expf(x); }
__device__ __forceinline__ double m_exp(double x) { return exp(x); }
__device__ __forceinline__ float m_log(float x) { return logf(x); }
__device__ __forceinline__ double m_log(double x) { return log(x); }
__device__ __forceinline__ float m_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double m_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float m_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double m_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float m_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double m_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float m_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double m_abs(double x) { return fabs(x); }
__device__ __forceinline__ float m_pow(float x, float e) { return powf(x, e); }
__device__ __forceinline__ double m_pow(double x, double e) { return pow(x, e); }

template <typename C> __device__ __forceinline__ C sigmoid(C x) { return C(1) / (C(1) + m_exp(-x)); }

// sqrt(2/pi) and the cubic coefficient of the tanh GELU.
template <typename C> __device__ __forceinline__ C gelu_k() { return C(0.7978845608028654); }
template <typename C> __device__ __forceinline__ C gelu_c() { return C(0.044715); }

template <typename C> __device__ __forceinline__ C gelu(C x) {
    return C(0.5) * x * (C(1) + m_tanh(gelu_k<C>() * (x + gelu_c<C>() * x * x * x)));
}
template <typename C> __device__ __forceinline__ C gelu_grad(C x) {
    const C t = m_tanh(gelu_k<C>() * (x + gelu_c<C>() * x * x * x));
    return C(0.5) * (C(1) + t) + C(0.5) * x * (C(1) - t * t) * gelu_k<C>() * (C(1) + C(3) * gelu_c<C>() * x * x);
}
template <typename C> __device__ __forceinline__ C softplus(C x) { return x > C(20) ? x : m_log1p(m_exp(x)); }

// ---------------------------------------------------------------- dispatch

template <typename T> __device__ __forceinline__ void unary_impl(const UnaryParams &p, const T *x, T *y) {
    using C = acc_t<T>;
    const C s0 = (C)p.s0, s1 = (C)p.s1;
    switch (p.op) {
    case MOEBA_UNARY_NEG: map1(p, x, y, [](C v) { return -v; }); break;
    case MOEBA_UNARY_EXP: map1(p, x, y, [](C v) { return m_exp(v); }); break;
    case MOEBA_UNARY_LOG: map1(p, x, y, [](C v) { return m_log(v); }); break;
    case MOEBA_UNARY_SQRT: map1(p, x, y, [](C v) { return m_sqrt(v); }); break;
    case MOEBA_UNARY_SILU: map1(p, x, y, [](C v) { return v * sigmoid(v); }); break;
    case MOEBA_UNARY_GELU: map1(p, x, y, [](C v) { return gelu(v); }); break;
    case MOEBA_UNARY_SOFTPLUS: map1(p, x, y, [](C v) { return softplus(v); }); break;
    case MOEBA_UNARY_SIGMOID: map1(p, x, y, [](C v) { return sigmoid(v); }); break;
    case MOEBA_UNARY_TANH: map1(p, x, y, [](C v) { return m_tanh(v); }); break;
    case MOEBA_UNARY_RELU: map1(p, x, y, [](C v) { return (v > C(0) || is_nan(v)) ? v : C(0); }); break;
    case MOEBA_UNARY_ABS: map1(p, x, y, [](C v) { return m_abs(v); }); break;
    case MOEBA_UNARY_RECIP: map1(p, x, y, [](C v) { return C(1) / v; }); break;
    case MOEBA_UNARY_SQR: map1(p, x, y, [](C v) { return v * v; }); break;
    case MOEBA_UNARY_AFFINE: map1(p, x, y, [s0, s1](C v) { return v * s0 + s1; }); break;
    case MOEBA_UNARY_POWF: map1(p, x, y, [s0](C v) { return m_pow(v, s0); }); break;
    case MOEBA_UNARY_CLAMP:
        map1(p, x, y, [s0, s1](C v) { return is_nan(v) ? v : (v < s0 ? s0 : (v > s1 ? s1 : v)); });
        break;
    default: break;
    }
}

template <typename T>
__device__ __forceinline__ void unary_backward_impl(const UnaryParams &p, const T *x, const T *dy, T *dx) {
    using C = acc_t<T>;
#define MOEBA_BWD(body)                                                                                   \
    map2(p.numel, p.rank, p.dims, p.x_strides, p.dy_strides, p.x_contiguous != 0, p.dy_contiguous != 0, x, \
         dy, dx, [](C v, C g) { return body; })
    switch (p.op) {
    case MOEBA_UNARY_NEG: MOEBA_BWD(-g); break;
    case MOEBA_UNARY_EXP: MOEBA_BWD(g * m_exp(v)); break;
    case MOEBA_UNARY_LOG: MOEBA_BWD(g / v); break;
    case MOEBA_UNARY_SQRT: MOEBA_BWD(g * C(0.5) / m_sqrt(v)); break;
    case MOEBA_UNARY_SILU: MOEBA_BWD(g * (sigmoid(v) * (C(1) + v * (C(1) - sigmoid(v))))); break;
    case MOEBA_UNARY_GELU: MOEBA_BWD(g * gelu_grad(v)); break;
    case MOEBA_UNARY_SOFTPLUS: MOEBA_BWD(v > C(20) ? g : g * sigmoid(v)); break;
    case MOEBA_UNARY_SIGMOID: MOEBA_BWD(g * sigmoid(v) * (C(1) - sigmoid(v))); break;
    case MOEBA_UNARY_TANH: MOEBA_BWD(g * (C(1) - m_tanh(v) * m_tanh(v))); break;
    case MOEBA_UNARY_RELU: MOEBA_BWD(v > C(0) ? g : C(0)); break;
    case MOEBA_UNARY_ABS: MOEBA_BWD(v > C(0) ? g : (v < C(0) ? -g : C(0))); break;
    case MOEBA_UNARY_RECIP: MOEBA_BWD(-g / (v * v)); break;
    case MOEBA_UNARY_SQR: MOEBA_BWD(C(2) * v * g); break;
    default: break;
    }
#undef MOEBA_BWD
}

template <typename T>
__device__ __forceinline__ void binary_impl(const BinaryParams &p, const T *a, const T *b, T *y) {
    using C = acc_t<T>;
#define MOEBA_BIN(body)                                                                                  \
    map2(p.numel, p.rank, p.dims, p.a_strides, p.b_strides, p.a_contiguous != 0, p.b_contiguous != 0, a, \
         b, y, [](C u, C v) { return body; })
    switch (p.op) {
    case MOEBA_BINARY_ADD: MOEBA_BIN(u + v); break;
    case MOEBA_BINARY_SUB: MOEBA_BIN(u - v); break;
    case MOEBA_BINARY_MUL: MOEBA_BIN(u * v); break;
    case MOEBA_BINARY_DIV: MOEBA_BIN(u / v); break;
    case MOEBA_BINARY_MAXIMUM: MOEBA_BIN(nan_max(u, v)); break;
    case MOEBA_BINARY_MINIMUM: MOEBA_BIN(nan_min(u, v)); break;
    default: break;
    }
#undef MOEBA_BIN
}

}  // namespace moeba

#define MOEBA_ELEMENTWISE(SUFFIX, T)                                                                        \
    extern "C" __global__ void unary_##SUFFIX(UnaryParams p, const T *x, T *y) { moeba::unary_impl(p, x, y); } \
    extern "C" __global__ void unary_backward_##SUFFIX(UnaryParams p, const T *x, const T *dy, T *dx) {      \
        moeba::unary_backward_impl(p, x, dy, dx);                                                           \
    }                                                                                                       \
    extern "C" __global__ void binary_##SUFFIX(BinaryParams p, const T *a, const T *b, T *y) {              \
        moeba::binary_impl(p, a, b, y);                                                                     \
    }

MOEBA_ELEMENTWISE(f32, float)
MOEBA_ELEMENTWISE(f64, double)
MOEBA_ELEMENTWISE(bf16, __nv_bfloat16)
MOEBA_ELEMENTWISE(f16, __half)

#undef MOEBA_ELEMENTWISE
