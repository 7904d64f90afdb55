//! [`Layout`]: how a tensor's logical elements map onto its storage (shape, strides, offset).
//!
//! Every view op (reshape of a contiguous tensor, transpose, permute, narrow, broadcast,
//! unsqueeze, squeeze) only builds a new `Layout`; storage is never copied.

use crate::{Error, Result, Shape};

/// Shape + per-dim strides (in elements) + start offset into the storage.
/// A stride of 0 repeats an element (broadcasting).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Shape,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    /// A row-major contiguous layout starting at offset 0.
    pub fn contiguous(shape: impl Into<Shape>) -> Self {
        let shape = shape.into();
        let strides = shape.contiguous_strides();
        Layout { shape, strides, offset: 0 }
    }

    /// A layout from explicit parts. `strides.len()` must equal the rank.
    pub fn new(shape: Shape, strides: Vec<usize>, offset: usize) -> Result<Self> {
        if strides.len() != shape.rank() {
            return Err(Error::bad_shape(
                "Layout::new",
                &shape,
                format!("{} strides given for rank {}", strides.len(), shape.rank()),
            ));
        }
        Ok(Layout { shape, strides, offset })
    }

    /// The logical shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The logical dims.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// Strides in elements, one per dim.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Offset of the first element in the storage, in elements.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Number of logical elements.
    pub fn elem_count(&self) -> usize {
        self.shape.elem_count()
    }

    /// Whether the elements are laid out row-major without gaps (size-1 dims may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for (&d, &s) in self.shape.dims().iter().zip(self.strides.iter()).rev() {
            if d != 1 && s != acc {
                return false;
            }
            acc *= d;
        }
        true
    }

    /// If contiguous, the storage range `[offset, offset + elem_count)` that holds the elements.
    pub fn contiguous_range(&self) -> Option<std::ops::Range<usize>> {
        self.is_contiguous().then(|| self.offset..self.offset + self.elem_count())
    }

    /// One past the largest storage index this layout can touch (0 for an empty tensor).
    pub fn storage_span(&self) -> usize {
        if self.elem_count() == 0 {
            return 0;
        }
        self.offset
            + self.shape.dims().iter().zip(&self.strides).map(|(&d, &s)| (d - 1) * s).sum::<usize>()
            + 1
    }

    /// A view with a new shape of the same element count. Only valid on contiguous layouts;
    /// returns `None` otherwise (the caller copies first).
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Option<Layout>> {
        let shape = shape.into();
        if shape.elem_count() != self.elem_count() {
            return Err(Error::ShapeMismatch { op: "reshape", lhs: self.shape.clone(), rhs: shape });
        }
        if !self.is_contiguous() {
            return Ok(None);
        }
        let strides = shape.contiguous_strides();
        Ok(Some(Layout { shape, strides, offset: self.offset }))
    }

    /// Swaps dims `d0` and `d1`.
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Layout> {
        let rank = self.shape.rank();
        for d in [d0, d1] {
            if d >= rank {
                return Err(Error::DimOutOfRange { op: "transpose", dim: d, rank });
            }
        }
        let mut dims = self.shape.to_vec();
        let mut strides = self.strides.clone();
        dims.swap(d0, d1);
        strides.swap(d0, d1);
        Ok(Layout { shape: Shape::new(dims), strides, offset: self.offset })
    }

    /// Reorders dims: output dim `i` is input dim `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Layout> {
        let rank = self.shape.rank();
        let mut seen = vec![false; rank];
        if perm.len() != rank {
            return Err(Error::invalid(
                "permute",
                "perm",
                format!("{perm:?} has {} entries for a tensor of shape {}", perm.len(), self.shape),
            ));
        }
        for &p in perm {
            if p >= rank || seen[p] {
                return Err(Error::invalid(
                    "permute",
                    "perm",
                    format!("{perm:?} is not a permutation of 0..{rank}"),
                ));
            }
            seen[p] = true;
        }
        let dims = perm.iter().map(|&p| self.shape.dims()[p]).collect::<Vec<_>>();
        let strides = perm.iter().map(|&p| self.strides[p]).collect();
        Ok(Layout { shape: Shape::new(dims), strides, offset: self.offset })
    }

    /// Keeps `len` elements of dim `dim` starting at `start`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout> {
        let size = self.shape.dim("narrow", dim)?;
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::invalid(
                "narrow",
                "start/len",
                format!("range {start}..{} out of bounds for dim {dim} of shape {}", start + len, self.shape),
            ));
        }
        let mut dims = self.shape.to_vec();
        dims[dim] = len;
        let offset = if len == 0 { self.offset } else { self.offset + start * self.strides[dim] };
        Ok(Layout { shape: Shape::new(dims), strides: self.strides.clone(), offset })
    }

    /// Broadcasts to `shape` (numpy rules) by giving repeated dims a stride of 0.
    pub fn broadcast_as(&self, shape: impl Into<Shape>) -> Result<Layout> {
        let shape = shape.into();
        let rank = shape.rank();
        let own = self.shape.rank();
        let mismatch =
            || Error::ShapeMismatch { op: "broadcast_as", lhs: self.shape.clone(), rhs: shape.clone() };
        if own > rank {
            return Err(mismatch());
        }
        let mut strides = vec![0; rank];
        for i in 0..rank {
            if i < rank - own {
                continue;
            }
            let j = i - (rank - own);
            let (d, s) = (self.shape.dims()[j], self.strides[j]);
            if d == shape.dims()[i] {
                strides[i] = s;
            } else if d == 1 {
                strides[i] = 0;
            } else {
                return Err(mismatch());
            }
        }
        Ok(Layout { shape, strides, offset: self.offset })
    }

    /// Inserts a dim of size 1 at position `dim` (0..=rank).
    pub fn unsqueeze(&self, dim: usize) -> Result<Layout> {
        let rank = self.shape.rank();
        if dim > rank {
            return Err(Error::DimOutOfRange { op: "unsqueeze", dim, rank });
        }
        let mut dims = self.shape.to_vec();
        let mut strides = self.strides.clone();
        let stride = if dim < rank { strides[dim] * dims[dim] } else { 1 };
        dims.insert(dim, 1);
        strides.insert(dim, stride);
        Ok(Layout { shape: Shape::new(dims), strides, offset: self.offset })
    }

    /// Removes dim `dim`, which must have size 1.
    pub fn squeeze(&self, dim: usize) -> Result<Layout> {
        let size = self.shape.dim("squeeze", dim)?;
        if size != 1 {
            return Err(Error::bad_shape(
                "squeeze",
                &self.shape,
                format!("dim {dim} has size {size}, not 1"),
            ));
        }
        let mut dims = self.shape.to_vec();
        let mut strides = self.strides.clone();
        dims.remove(dim);
        strides.remove(dim);
        Ok(Layout { shape: Shape::new(dims), strides, offset: self.offset })
    }

    /// Storage index of every logical element, in row-major logical order.
    pub fn strided_index(&self) -> StridedIndex<'_> {
        StridedIndex::new(self)
    }

    /// The layout as runs of contiguous storage: either one block, or many blocks of the same
    /// length whose start offsets are listed. Kernels use it to copy with `copy_from_slice`.
    pub fn strided_blocks(&self) -> StridedBlocks {
        // Merge as many trailing dims as are contiguous into one block.
        let dims = self.shape.dims();
        let mut block_len = 1;
        let mut split = dims.len();
        for (&d, &s) in dims.iter().zip(self.strides.iter()).rev() {
            if d != 1 && s != block_len {
                break;
            }
            block_len *= d;
            split -= 1;
        }
        if split == 0 {
            StridedBlocks::Single { start: self.offset, len: block_len }
        } else {
            let outer = Layout {
                shape: Shape::new(dims[..split].to_vec()),
                strides: self.strides[..split].to_vec(),
                offset: self.offset,
            };
            StridedBlocks::Multiple { starts: outer.strided_index().collect(), block_len }
        }
    }
}

/// A layout seen as contiguous runs of storage; see [`Layout::strided_blocks`].
pub enum StridedBlocks {
    /// The whole tensor is one run.
    Single {
        /// Storage offset of the run.
        start: usize,
        /// Its length in elements.
        len: usize,
    },
    /// Several runs of equal length.
    Multiple {
        /// Storage offset of each run, in logical order.
        starts: Vec<usize>,
        /// The length of every run.
        block_len: usize,
    },
}

/// Iterator over the storage index of each logical element; see [`Layout::strided_index`].
pub struct StridedIndex<'a> {
    next: Option<usize>,
    multi: Vec<usize>,
    dims: &'a [usize],
    strides: &'a [usize],
}

impl<'a> StridedIndex<'a> {
    fn new(l: &'a Layout) -> Self {
        let next = if l.elem_count() == 0 { None } else { Some(l.offset) };
        StridedIndex { next, multi: vec![0; l.dims().len()], dims: l.dims(), strides: &l.strides }
    }
}

impl Iterator for StridedIndex<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        let current = self.next?;
        let mut next = current;
        let mut done = true;
        for d in (0..self.dims.len()).rev() {
            if self.multi[d] + 1 < self.dims[d] {
                self.multi[d] += 1;
                next += self.strides[d];
                done = false;
                break;
            }
            next -= self.multi[d] * self.strides[d];
            self.multi[d] = 0;
        }
        self.next = if done { None } else { Some(next) };
        Some(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views() {
        let l = Layout::contiguous([2, 3, 4]);
        assert!(l.is_contiguous());
        let t = l.transpose(0, 2).unwrap();
        assert_eq!(t.dims(), &[4, 3, 2]);
        assert_eq!(t.strides(), &[1, 4, 12]);
        assert!(!t.is_contiguous());
        let n = l.narrow(1, 1, 2).unwrap();
        assert_eq!(n.offset(), 4);
        assert_eq!(n.strided_index().collect::<Vec<_>>()[..3], [4, 5, 6]);
        let b = Layout::contiguous([3, 1]).broadcast_as([2, 3, 4]).unwrap();
        assert_eq!(b.strides(), &[0, 1, 0]);
        let u = l.unsqueeze(1).unwrap();
        assert_eq!(u.dims(), &[2, 1, 3, 4]);
        assert!(u.is_contiguous());
        assert_eq!(u.squeeze(1).unwrap(), l);
    }

    #[test]
    fn blocks() {
        let l = Layout::contiguous([2, 3, 4]).narrow(2, 1, 2).unwrap();
        match l.strided_blocks() {
            StridedBlocks::Multiple { starts, block_len } => {
                assert_eq!(block_len, 2);
                assert_eq!(starts, vec![1, 5, 9, 13, 17, 21]);
            }
            _ => panic!("expected multiple blocks"),
        }
        assert!(matches!(
            Layout::contiguous([5]).strided_blocks(),
            StridedBlocks::Single { start: 0, len: 5 }
        ));
    }
}
