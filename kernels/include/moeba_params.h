/*
 * moeba_params.h: the parameter structs of moeba's CUDA kernels, defined once.
 *
 * The .cu kernels include this header and take these structs by value; moeba-build runs bindgen
 * on it, so the Rust launchers (crates/kernels/src/cuda) fill in the very same layout. Plain C:
 * fixed-width integers and doubles only, no pointers (pointers are separate kernel arguments).
 *
 * Conventions:
 *  - sizes, strides and offsets are in elements, as int64_t;
 *  - `dims` are the logical sizes of the (already coalesced) iteration space, outermost first;
 *    strides of 0 broadcast;
 *  - a `*_contiguous` flag of 1 means that operand is read as x[i] for the flat index i, which
 *    enables the vectorised (16-byte) path when the pointers are aligned.
 */
#ifndef MOEBA_PARAMS_H
#define MOEBA_PARAMS_H

#include <stdint.h>

/* The most dims an iteration space may have after merging contiguous dims. */
#define MOEBA_MAX_DIMS 8

/* Op codes of UnaryParams.op, in the order of moeba_kernels::ops::UnaryOp, then the scalar ops. */
#define MOEBA_UNARY_NEG 0
#define MOEBA_UNARY_EXP 1
#define MOEBA_UNARY_LOG 2
#define MOEBA_UNARY_SQRT 3
#define MOEBA_UNARY_SILU 4
#define MOEBA_UNARY_GELU 5
#define MOEBA_UNARY_SOFTPLUS 6
#define MOEBA_UNARY_SIGMOID 7
#define MOEBA_UNARY_TANH 8
#define MOEBA_UNARY_RELU 9
#define MOEBA_UNARY_ABS 10
#define MOEBA_UNARY_RECIP 11
#define MOEBA_UNARY_SQR 12
/* y = x * s0 + s1 */
#define MOEBA_UNARY_AFFINE 13
/* y = x ^ s0 */
#define MOEBA_UNARY_POWF 14
/* y = min(max(x, s0), s1) */
#define MOEBA_UNARY_CLAMP 15

/* Op codes of BinaryParams.op, in the order of moeba_kernels::ops::BinaryOp. */
#define MOEBA_BINARY_ADD 0
#define MOEBA_BINARY_SUB 1
#define MOEBA_BINARY_MUL 2
#define MOEBA_BINARY_DIV 3
#define MOEBA_BINARY_MAXIMUM 4
#define MOEBA_BINARY_MINIMUM 5

/* Op codes of ReduceParams.op, in the order of moeba_kernels::ops::ReduceOp. */
#define MOEBA_REDUCE_SUM 0
#define MOEBA_REDUCE_MEAN 1
#define MOEBA_REDUCE_MAX 2
#define MOEBA_REDUCE_MIN 3

/*
 * One-input elementwise ops (unary, unary_backward, affine, powf, clamp), strided copies and
 * dtype casts. The output is contiguous over `dims` unless `y_contiguous` is 0 (copies into a
 * strided destination, e.g. a slice of a concat output), in which case `y_strides` apply.
 * unary_backward reads a second input `dy` through `dy_strides`.
 */
typedef struct UnaryParams {
    int64_t numel;
    int32_t rank;
    int32_t op;
    int32_t x_contiguous;
    int32_t dy_contiguous;
    int32_t y_contiguous;
    int32_t _pad;
    double s0;
    double s1;
    int64_t dims[MOEBA_MAX_DIMS];
    int64_t x_strides[MOEBA_MAX_DIMS];
    int64_t dy_strides[MOEBA_MAX_DIMS];
    int64_t y_strides[MOEBA_MAX_DIMS];
} UnaryParams;

/* Two-input elementwise ops with broadcasting; the output is contiguous over `dims`. */
typedef struct BinaryParams {
    int64_t numel;
    int32_t rank;
    int32_t op;
    int32_t a_contiguous;
    int32_t b_contiguous;
    int64_t dims[MOEBA_MAX_DIMS];
    int64_t a_strides[MOEBA_MAX_DIMS];
    int64_t b_strides[MOEBA_MAX_DIMS];
} BinaryParams;

/*
 * Reductions (sum/mean/max/min) and argmax. The input is seen as n_out "rows" of n_red elements:
 * the kept dims (`out_dims`, strides `out_strides`, outermost first, in the output's order) pick
 * the row, the reduced dims (`red_dims`, `red_strides`) walk inside it. The output is contiguous
 * with n_out elements. `red_contiguous` = 1 when the reduced elements of a row are adjacent
 * (one reduced dim of stride 1).
 */
typedef struct ReduceParams {
    int64_t n_out;
    int64_t n_red;
    int32_t op;
    int32_t out_rank;
    int32_t red_rank;
    int32_t red_contiguous;
    int64_t out_dims[MOEBA_MAX_DIMS];
    int64_t out_strides[MOEBA_MAX_DIMS];
    int64_t red_dims[MOEBA_MAX_DIMS];
    int64_t red_strides[MOEBA_MAX_DIMS];
} ReduceParams;

/*
 * Softmax / log-softmax along one dim. The input is n_rows rows of row_len elements: the other
 * dims (`outer_dims`) pick a row, at `x_outer_strides` in the input and `y_outer_strides` in the
 * (contiguous) output; along the row, elements are `x_stride` / `y_stride` apart.
 */
typedef struct SoftmaxParams {
    int64_t n_rows;
    int64_t row_len;
    int32_t outer_rank;
    int32_t log;
    int64_t x_stride;
    int64_t y_stride;
    int64_t outer_dims[MOEBA_MAX_DIMS];
    int64_t x_outer_strides[MOEBA_MAX_DIMS];
    int64_t y_outer_strides[MOEBA_MAX_DIMS];
} SoftmaxParams;

/*
 * where_cond: y = cond ? a : b with broadcasting over all three; the output is contiguous over
 * `dims`. Each operand has its strides and a contiguity flag.
 */
typedef struct WhereParams {
    int64_t numel;
    int32_t rank;
    int32_t c_contiguous;
    int32_t a_contiguous;
    int32_t b_contiguous;
    int64_t dims[MOEBA_MAX_DIMS];
    int64_t c_strides[MOEBA_MAX_DIMS];
    int64_t a_strides[MOEBA_MAX_DIMS];
    int64_t b_strides[MOEBA_MAX_DIMS];
} WhereParams;

#endif /* MOEBA_PARAMS_H */
