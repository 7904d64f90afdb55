// where.cu: elementwise selection, y = cond ? a : b, with broadcasting over all three inputs.
//
//   where_{cond}_b{2,4,8}(WhereParams p, const C* cond, const V* a, const V* b, V* y)
//       cond of any dtype (f32, f64, bf16, f16, i64, u32; nonzero = true, so NaN is true and
//       -0.0 false), values moved as 2-, 4- or 8-byte words (any dtype). y is contiguous.
// Strided operands use 32-bit index math: the launcher makes inputs of 2^31 elements or more
// contiguous first.
#include "moeba_common.cuh"

namespace moeba {

__device__ __forceinline__ bool truthy(float c) { return c != 0.0f; }
__device__ __forceinline__ bool truthy(double c) { return c != 0.0; }
__device__ __forceinline__ bool truthy(__nv_bfloat16 c) { return __bfloat162float(c) != 0.0f; }
__device__ __forceinline__ bool truthy(__half c) { return __half2float(c) != 0.0f; }
__device__ __forceinline__ bool truthy(long long c) { return c != 0; }
__device__ __forceinline__ bool truthy(unsigned int c) { return c != 0; }

template <typename C, typename V>
__device__ __forceinline__ void where_impl(const WhereParams &p, const C *__restrict__ c, const V *__restrict__ a,
                                           const V *__restrict__ b, V *__restrict__ y) {
    const int64_t n = p.numel, tid = global_tid(), nt = global_threads();
    for (int64_t i = tid; i < n; i += nt) {
        const uint32_t j = (uint32_t)i;
        const int64_t oc = p.c_contiguous ? i : strided_offset<uint32_t>(j, p.rank, p.dims, p.c_strides);
        const int64_t oa = p.a_contiguous ? i : strided_offset<uint32_t>(j, p.rank, p.dims, p.a_strides);
        const int64_t ob = p.b_contiguous ? i : strided_offset<uint32_t>(j, p.rank, p.dims, p.b_strides);
        y[i] = truthy(c[oc]) ? a[oa] : b[ob];
    }
}

}  // namespace moeba

#define MOEBA_WHERE(CN, C, VN, V)                                                                    \
    extern "C" __global__ void where_##CN##_##VN(WhereParams p, const C *c, const V *a, const V *b, V *y) { \
        moeba::where_impl<C, V>(p, c, a, b, y);                                                      \
    }
#define MOEBA_WHERE_COND(CN, C)           \
    MOEBA_WHERE(CN, C, b2, uint16_t)      \
    MOEBA_WHERE(CN, C, b4, uint32_t)      \
    MOEBA_WHERE(CN, C, b8, uint64_t)

MOEBA_WHERE_COND(f32, float)
MOEBA_WHERE_COND(f64, double)
MOEBA_WHERE_COND(bf16, __nv_bfloat16)
MOEBA_WHERE_COND(f16, __half)
MOEBA_WHERE_COND(i64, long long)
MOEBA_WHERE_COND(u32, unsigned int)

#undef MOEBA_WHERE_COND
#undef MOEBA_WHERE
