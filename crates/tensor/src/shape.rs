//! [`Shape`]: the sizes of a tensor's dimensions, and broadcasting rules.

use crate::{Error, Result};

/// The sizes of a tensor's dimensions, outermost first. A rank-0 shape is a scalar.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// A shape from its dims.
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }

    /// The scalar shape `[]`.
    pub fn scalar() -> Self {
        Shape(vec![])
    }

    /// The dims, outermost first.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// The number of dims.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// The number of elements (1 for a scalar).
    pub fn elem_count(&self) -> usize {
        self.0.iter().product()
    }

    /// The size of dim `d`, or an error naming `op`.
    pub fn dim(&self, op: &'static str, d: usize) -> Result<usize> {
        self.0.get(d).copied().ok_or(Error::DimOutOfRange { op, dim: d, rank: self.rank() })
    }

    /// Row-major (C-contiguous) strides for this shape, in elements.
    pub fn contiguous_strides(&self) -> Vec<usize> {
        let mut strides = vec![0; self.rank()];
        let mut acc = 1;
        for (s, &d) in strides.iter_mut().zip(self.0.iter()).rev() {
            *s = acc;
            acc *= d;
        }
        strides
    }

    /// The shape that `self` and `other` broadcast to (numpy rules: align on the right,
    /// sizes must match or be 1).
    pub fn broadcast_with(&self, op: &'static str, other: &Shape) -> Result<Shape> {
        let rank = self.rank().max(other.rank());
        let mut out = vec![0; rank];
        for i in 0..rank {
            let a = if i < rank - self.rank() { 1 } else { self.0[i - (rank - self.rank())] };
            let b = if i < rank - other.rank() { 1 } else { other.0[i - (rank - other.rank())] };
            out[i] = if a == b || b == 1 {
                a
            } else if a == 1 {
                b
            } else {
                return Err(Error::ShapeMismatch { op, lhs: self.clone(), rhs: other.clone() });
            };
        }
        Ok(Shape(out))
    }

    /// Shape as a vector of dims.
    pub fn to_vec(&self) -> Vec<usize> {
        self.0.clone()
    }

    /// Splits into (leading dims product, last dim). A scalar gives (1, 1).
    pub fn split_last(&self) -> (usize, usize) {
        match self.0.last() {
            None => (1, 1),
            Some(&l) => (self.elem_count() / l.max(1), l),
        }
    }
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}
impl From<&Vec<usize>> for Shape {
    fn from(v: &Vec<usize>) -> Self {
        Shape(v.clone())
    }
}
impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}
impl From<&Shape> for Shape {
    fn from(s: &Shape) -> Self {
        s.clone()
    }
}
impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape(vec![])
    }
}
impl From<usize> for Shape {
    fn from(d: usize) -> Self {
        Shape(vec![d])
    }
}
impl From<(usize, usize)> for Shape {
    fn from((a, b): (usize, usize)) -> Self {
        Shape(vec![a, b])
    }
}
impl From<(usize, usize, usize)> for Shape {
    fn from((a, b, c): (usize, usize, usize)) -> Self {
        Shape(vec![a, b, c])
    }
}
impl From<(usize, usize, usize, usize)> for Shape {
    fn from((a, b, c, d): (usize, usize, usize, usize)) -> Self {
        Shape(vec![a, b, c, d])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_rules() {
        let a = Shape::from([3, 1, 5]);
        let b = Shape::from([4, 1]);
        assert_eq!(a.broadcast_with("t", &b).unwrap(), Shape::from([3, 4, 5]));
        let c = Shape::from([2, 5]);
        let err = a.broadcast_with("add", &Shape::from([2, 4])).unwrap_err().to_string();
        assert!(err.contains("add") && err.contains("[3, 1, 5]") && err.contains("[2, 4]"), "{err}");
        assert_eq!(Shape::scalar().broadcast_with("t", &c).unwrap(), c);
    }

    #[test]
    fn strides() {
        assert_eq!(Shape::from([2, 3, 4]).contiguous_strides(), vec![12, 4, 1]);
        assert_eq!(Shape::scalar().contiguous_strides(), Vec::<usize>::new());
    }
}
