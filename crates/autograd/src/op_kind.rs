//! [`OpKind`]: the built-in differentiable ops, and [`DIFFERENTIABLE_OPS`], the list that the test
//! suite walks to gradient-check each one.

use moeba_kernels::ops::{BinaryOp, UnaryOp};

/// A built-in op that records a node on the tape. Every node a built-in op records is tagged
/// with one of these (its [`OpKind::name`] is what [`Var::op_name`](crate::Var::op_name) returns).
///
/// Adding an op: add a variant, put it in [`OpKind::ALL`], give it a name, and add its case to the
/// gradient-check suite (tests/gradcheck_ops.rs matches on this enum exhaustively, so the suite
/// does not compile until it has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Elementwise binary op with broadcasting ([`Var::binary`](crate::Var::binary)).
    Binary(BinaryOp),
    /// Elementwise unary op ([`Var::unary`](crate::Var::unary)).
    Unary(UnaryOp),
    /// `x * mul + add`.
    Affine,
    /// `x^e`.
    Powf,
    /// `min(max(x, lo), hi)`.
    Clamp,
    /// Dtype conversion between float types.
    ToDType,
    /// Sum over dims.
    Sum,
    /// Mean over dims.
    Mean,
    /// Max over dims.
    Max,
    /// Min over dims.
    Min,
    /// Sum of every element.
    SumAll,
    /// Softmax along a dim.
    Softmax,
    /// Log-softmax along a dim.
    LogSoftmax,
    /// Batched matrix product.
    Matmul,
    /// New shape, same elements.
    Reshape,
    /// Swap two dims.
    Transpose,
    /// Reorder dims.
    Permute,
    /// A slice along one dim.
    Narrow,
    /// Broadcast to a larger shape.
    BroadcastAs,
    /// Insert a size-1 dim.
    Unsqueeze,
    /// Remove a size-1 dim.
    Squeeze,
    /// Contiguous copy.
    Contiguous,
    /// Join along a dim.
    Concat,
    /// Join along a new dim.
    Stack,
    /// Rows picked along a dim by an index vector.
    IndexSelect,
    /// Embedding lookup.
    Embedding,
    /// torch.gather.
    Gather,
    /// torch.scatter_add (out of place), differentiable in `x` and `src`.
    ScatterAdd,
    /// `cond ? a : b`.
    WhereCond,
    /// Fill where a mask is set.
    MaskedFill,
    /// Mean cross-entropy of logits against targets.
    CrossEntropy,
}

impl OpKind {
    /// Every built-in differentiable op, unary and binary ops expanded.
    pub const ALL: [OpKind; 48] = [
        OpKind::Binary(BinaryOp::Add),
        OpKind::Binary(BinaryOp::Sub),
        OpKind::Binary(BinaryOp::Mul),
        OpKind::Binary(BinaryOp::Div),
        OpKind::Binary(BinaryOp::Maximum),
        OpKind::Binary(BinaryOp::Minimum),
        OpKind::Unary(UnaryOp::Neg),
        OpKind::Unary(UnaryOp::Exp),
        OpKind::Unary(UnaryOp::Log),
        OpKind::Unary(UnaryOp::Sqrt),
        OpKind::Unary(UnaryOp::Silu),
        OpKind::Unary(UnaryOp::Gelu),
        OpKind::Unary(UnaryOp::Softplus),
        OpKind::Unary(UnaryOp::Sigmoid),
        OpKind::Unary(UnaryOp::Tanh),
        OpKind::Unary(UnaryOp::Relu),
        OpKind::Unary(UnaryOp::Abs),
        OpKind::Unary(UnaryOp::Recip),
        OpKind::Unary(UnaryOp::Sqr),
        OpKind::Affine,
        OpKind::Powf,
        OpKind::Clamp,
        OpKind::ToDType,
        OpKind::Sum,
        OpKind::Mean,
        OpKind::Max,
        OpKind::Min,
        OpKind::SumAll,
        OpKind::Softmax,
        OpKind::LogSoftmax,
        OpKind::Matmul,
        OpKind::Reshape,
        OpKind::Transpose,
        OpKind::Permute,
        OpKind::Narrow,
        OpKind::BroadcastAs,
        OpKind::Unsqueeze,
        OpKind::Squeeze,
        OpKind::Contiguous,
        OpKind::Concat,
        OpKind::Stack,
        OpKind::IndexSelect,
        OpKind::Embedding,
        OpKind::Gather,
        OpKind::ScatterAdd,
        OpKind::WhereCond,
        OpKind::MaskedFill,
        OpKind::CrossEntropy,
    ];

    /// The op's name on the tape and in errors (unique across [`OpKind::ALL`]).
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Binary(op) => op.name(),
            OpKind::Unary(op) => op.name(),
            OpKind::Affine => "affine",
            OpKind::Powf => "powf",
            OpKind::Clamp => "clamp",
            OpKind::ToDType => "to_dtype",
            OpKind::Sum => "sum",
            OpKind::Mean => "mean",
            OpKind::Max => "max",
            OpKind::Min => "min",
            OpKind::SumAll => "sum_all",
            OpKind::Softmax => "softmax",
            OpKind::LogSoftmax => "log_softmax",
            OpKind::Matmul => "matmul",
            OpKind::Reshape => "reshape",
            OpKind::Transpose => "transpose",
            OpKind::Permute => "permute",
            OpKind::Narrow => "narrow",
            OpKind::BroadcastAs => "broadcast_as",
            OpKind::Unsqueeze => "unsqueeze",
            OpKind::Squeeze => "squeeze",
            OpKind::Contiguous => "contiguous",
            OpKind::Concat => "concat",
            OpKind::Stack => "stack",
            OpKind::IndexSelect => "index_select",
            OpKind::Embedding => "embedding",
            OpKind::Gather => "gather",
            OpKind::ScatterAdd => "scatter_add",
            OpKind::WhereCond => "where_cond",
            OpKind::MaskedFill => "masked_fill",
            OpKind::CrossEntropy => "cross_entropy",
        }
    }
}

/// The single list of built-in differentiable ops: each has a backward rule, and the test suite
/// gradient-checks every entry (a missing case fails the suite).
pub const DIFFERENTIABLE_OPS: &[OpKind] = &OpKind::ALL;
