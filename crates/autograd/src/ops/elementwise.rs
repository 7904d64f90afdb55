//! Elementwise ops: binary (broadcasting), unary, affine, powf, clamp, dtype conversion.

use moeba_kernels::ops::{self, BinaryOp, UnaryOp};
use moeba_tensor::{DType, Result, Tensor};

use crate::op_kind::OpKind;
use crate::util::{grad_if, reduce_to_shape, where_positive};
use crate::Var;

impl Var {
    /// `a op b` elementwise with numpy broadcasting. Gradients are summed back over the broadcast
    /// dims to each operand's shape. For `maximum`/`minimum` the gradient goes to the operand that
    /// was picked, split in half between the two on ties.
    pub fn binary(&self, rhs: &Var, op: BinaryOp) -> Result<Var> {
        let (a, b) = (self.tensor().clone(), rhs.tensor().clone());
        let out = ops::binary(&a, &b, op)?;
        let y = out.clone();
        Ok(Var::record(OpKind::Binary(op), out, &[self, rhs], move |g, need| {
            let (ga, gb) = match op {
                BinaryOp::Add => (grad_if(need[0], || Ok(g.clone()))?, grad_if(need[1], || Ok(g.clone()))?),
                BinaryOp::Sub => (grad_if(need[0], || Ok(g.clone()))?, grad_if(need[1], || ops::neg(g))?),
                BinaryOp::Mul => {
                    (grad_if(need[0], || ops::mul(g, &b))?, grad_if(need[1], || ops::mul(g, &a))?)
                }
                BinaryOp::Div => (
                    grad_if(need[0], || ops::div(g, &b))?,
                    // d(a/b)/db = -a/b² = -y/b
                    grad_if(need[1], || ops::neg(&ops::mul(g, &ops::div(&y, &b)?)?))?,
                ),
                BinaryOp::Maximum => {
                    let (ga, gb) = split_picked(&a, &b, g)?;
                    (Some(ga), Some(gb))
                }
                BinaryOp::Minimum => {
                    // a is picked where b > a: the second half of the split.
                    let (gb, ga) = split_picked(&a, &b, g)?;
                    (Some(ga), Some(gb))
                }
            };
            let ga = ga.map(|t| reduce_to_shape(&t, a.shape())).transpose()?;
            let gb = gb.map(|t| reduce_to_shape(&t, b.shape())).transpose()?;
            Ok(vec![ga, gb])
        }))
    }

    /// `self + rhs` (broadcasting).
    pub fn add(&self, rhs: &Var) -> Result<Var> {
        self.binary(rhs, BinaryOp::Add)
    }

    /// `self - rhs` (broadcasting).
    pub fn sub(&self, rhs: &Var) -> Result<Var> {
        self.binary(rhs, BinaryOp::Sub)
    }

    /// `self * rhs` (broadcasting).
    pub fn mul(&self, rhs: &Var) -> Result<Var> {
        self.binary(rhs, BinaryOp::Mul)
    }

    /// `self / rhs` (broadcasting).
    pub fn div(&self, rhs: &Var) -> Result<Var> {
        self.binary(rhs, BinaryOp::Div)
    }

    /// `max(self, rhs)` elementwise (broadcasting).
    pub fn maximum(&self, rhs: &Var) -> Result<Var> {
        self.binary(rhs, BinaryOp::Maximum)
    }

    /// `min(self, rhs)` elementwise (broadcasting).
    pub fn minimum(&self, rhs: &Var) -> Result<Var> {
        self.binary(rhs, BinaryOp::Minimum)
    }

    /// `op(self)` elementwise. The backward is the kernels' fused `dy * op'(x)`
    /// ([`ops::unary_backward`]), with their conventions at kinks: relu'(0) = 0, abs'(0) = 0.
    pub fn unary(&self, op: UnaryOp) -> Result<Var> {
        let x = self.tensor().clone();
        let out = ops::unary(&x, op)?;
        Ok(Var::record(OpKind::Unary(op), out, &[self], move |g, _| {
            Ok(vec![Some(ops::unary_backward(&x, g, op)?)])
        }))
    }

    /// `-x`.
    pub fn neg(&self) -> Result<Var> {
        self.unary(UnaryOp::Neg)
    }
    /// `e^x`.
    pub fn exp(&self) -> Result<Var> {
        self.unary(UnaryOp::Exp)
    }
    /// `ln x`.
    pub fn log(&self) -> Result<Var> {
        self.unary(UnaryOp::Log)
    }
    /// `√x`.
    pub fn sqrt(&self) -> Result<Var> {
        self.unary(UnaryOp::Sqrt)
    }
    /// `x·σ(x)`.
    pub fn silu(&self) -> Result<Var> {
        self.unary(UnaryOp::Silu)
    }
    /// GELU (tanh approximation).
    pub fn gelu(&self) -> Result<Var> {
        self.unary(UnaryOp::Gelu)
    }
    /// `ln(1 + e^x)`.
    pub fn softplus(&self) -> Result<Var> {
        self.unary(UnaryOp::Softplus)
    }
    /// `σ(x)`.
    pub fn sigmoid(&self) -> Result<Var> {
        self.unary(UnaryOp::Sigmoid)
    }
    /// `tanh x`.
    pub fn tanh(&self) -> Result<Var> {
        self.unary(UnaryOp::Tanh)
    }
    /// `max(x, 0)`.
    pub fn relu(&self) -> Result<Var> {
        self.unary(UnaryOp::Relu)
    }
    /// `|x|`.
    pub fn abs(&self) -> Result<Var> {
        self.unary(UnaryOp::Abs)
    }
    /// `1 / x`.
    pub fn recip(&self) -> Result<Var> {
        self.unary(UnaryOp::Recip)
    }
    /// `x²`.
    pub fn sqr(&self) -> Result<Var> {
        self.unary(UnaryOp::Sqr)
    }

    /// `x * mul + add` elementwise.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Var> {
        let out = ops::affine(self.tensor(), mul, add)?;
        Ok(Var::record(OpKind::Affine, out, &[self], move |g, _| Ok(vec![Some(ops::affine(g, mul, 0.0)?)])))
    }

    /// `x * s`.
    pub fn scale(&self, s: f64) -> Result<Var> {
        self.affine(s, 0.0)
    }

    /// `x^e` elementwise; the gradient is `e·x^(e-1)`.
    pub fn powf(&self, e: f64) -> Result<Var> {
        let x = self.tensor().clone();
        let out = ops::powf(&x, e)?;
        Ok(Var::record(OpKind::Powf, out, &[self], move |g, _| {
            let d = ops::affine(&ops::powf(&x, e - 1.0)?, e, 0.0)?;
            Ok(vec![Some(ops::mul(g, &d)?)])
        }))
    }

    /// `min(max(x, lo), hi)` elementwise. The gradient passes where `lo <= x <= hi` (torch's
    /// convention) and is zero outside.
    pub fn clamp(&self, lo: f64, hi: f64) -> Result<Var> {
        let x = self.tensor().clone();
        let out = ops::clamp(&x, lo, hi)?;
        Ok(Var::record(OpKind::Clamp, out, &[self], move |g, _| {
            // g where x >= lo, i.e. g minus the part where lo - x > 0.
            let g = ops::sub(g, &where_positive(&ops::affine(&x, -1.0, lo)?, g)?)?;
            // ... and where x <= hi.
            let g = ops::sub(&g, &where_positive(&ops::affine(&x, 1.0, -hi)?, &g)?)?;
            Ok(vec![Some(g)])
        }))
    }

    /// The values converted to `dtype`. Between float types the gradient is converted back; a
    /// conversion to an integer type is not differentiable and gives a constant.
    pub fn to_dtype(&self, dtype: DType) -> Result<Var> {
        let from = self.dtype();
        let out = ops::to_dtype(self.tensor(), dtype)?;
        Ok(Var::record(OpKind::ToDType, out, &[self], move |g, _| Ok(vec![Some(ops::to_dtype(g, from)?)])))
    }
}

/// Splits `g` between `a` and `b`: the first result is `g` where `a > b`, the second `g` where
/// `b > a`, and each gets half of `g` on ties. For `maximum(a, b)` that is `(ga, gb)`; for
/// `minimum(a, b)` it is `(gb, ga)`. The results have the broadcast shape.
fn split_picked(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let d = ops::sub(a, b)?;
    let ga = where_positive(&d, g)?;
    let gb = where_positive(&ops::neg(&d)?, g)?;
    let tie = ops::affine(&ops::sub(&ops::sub(g, &ga)?, &gb)?, 0.5, 0.0)?;
    Ok((ops::add(&ga, &tie)?, ops::add(&gb, &tie)?))
}
