//! [`Tensor`]: shared storage plus a layout. Cloning is cheap; views share storage.

use std::borrow::Cow;
use std::sync::Arc;

use crate::{CpuStorage, DType, Device, Error, Layout, Result, Rng, Shape, Storage, WithDType};

/// An n-dimensional array: a reference-counted [`Storage`] and a [`Layout`] into it.
///
/// Tensors are immutable values: ops return new tensors, views (reshape of contiguous data,
/// transpose, permute, narrow, broadcast, unsqueeze, squeeze) share the storage.
/// Compute ops live in `moeba-kernels`; this type only holds and moves data.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    layout: Layout,
    device: Device,
}

impl Tensor {
    // ---------------------------------------------------------------- construction

    /// Wraps a storage and a layout. Errors if the layout reaches past the storage.
    pub fn from_storage(storage: Storage, layout: Layout, device: Device) -> Result<Tensor> {
        Self::from_arc_storage(Arc::new(storage), layout, device)
    }

    /// Like [`Tensor::from_storage`] with an already shared storage (for views built by kernels).
    pub fn from_arc_storage(storage: Arc<Storage>, layout: Layout, device: Device) -> Result<Tensor> {
        if layout.storage_span() > storage.len() {
            return Err(Error::bad_shape(
                "Tensor::from_storage",
                layout.shape(),
                format!(
                    "layout reaches element {} but the storage holds {}",
                    layout.storage_span(),
                    storage.len()
                ),
            ));
        }
        Ok(Tensor { storage, layout, device })
    }

    /// A contiguous CPU tensor from host storage of exactly `shape.elem_count()` elements.
    pub fn from_cpu_storage(storage: CpuStorage, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if storage.len() != shape.elem_count() {
            return Err(Error::bad_shape(
                "Tensor::from_cpu_storage",
                &shape,
                format!("{} elements given for {} expected", storage.len(), shape.elem_count()),
            ));
        }
        Ok(Tensor {
            storage: Arc::new(Storage::Cpu(storage)),
            layout: Layout::contiguous(shape),
            device: Device::Cpu,
        })
    }

    /// A tensor of `shape` holding `data` (row-major), placed on `device`.
    pub fn from_vec<T: WithDType>(data: Vec<T>, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        Tensor::from_cpu_storage(T::into_cpu_storage(data), shape)?.to_device(device)
    }

    /// Like [`Tensor::from_vec`], copying from a slice.
    pub fn from_slice<T: WithDType>(data: &[T], shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    /// A rank-0 tensor holding `value`.
    pub fn scalar<T: WithDType>(value: T, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(vec![value], Shape::scalar(), device)
    }

    /// A tensor of `shape` from little-endian raw bytes of `dtype` (safetensors payloads).
    pub fn from_bytes(
        bytes: &[u8],
        dtype: DType,
        shape: impl Into<Shape>,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let expected = shape.elem_count() * dtype.size_in_bytes();
        if bytes.len() != expected {
            return Err(Error::bad_shape(
                "Tensor::from_bytes",
                &shape,
                format!("{} bytes given, {dtype} of this shape needs {expected}", bytes.len()),
            ));
        }
        fn cast<T: WithDType>(b: &[u8]) -> Vec<T> {
            // pod_collect_to_vec copies, so unaligned input is fine.
            bytemuck::pod_collect_to_vec(b)
        }
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(cast(bytes)),
            DType::F64 => CpuStorage::F64(cast(bytes)),
            DType::BF16 => CpuStorage::BF16(cast(bytes)),
            DType::F16 => CpuStorage::F16(cast(bytes)),
            DType::I64 => CpuStorage::I64(cast(bytes)),
            DType::U32 => CpuStorage::U32(cast(bytes)),
        };
        Tensor::from_cpu_storage(storage, shape)?.to_device(device)
    }

    /// A tensor of `shape` with every element equal to `value`.
    pub fn full(value: f64, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            let storage = d.full(value, shape.elem_count(), dtype)?;
            return Tensor::from_storage(Storage::Cuda(storage), Layout::contiguous(shape), device.clone());
        }
        Tensor::from_cpu_storage(CpuStorage::full(value, shape.elem_count(), dtype), shape)?.to_device(device)
    }

    /// All zeros.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(0.0, shape, dtype, device)
    }

    /// All ones.
    pub fn ones(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(1.0, shape, dtype, device)
    }

    /// Zeros with the shape, dtype and device of `self`.
    pub fn zeros_like(&self) -> Result<Tensor> {
        Tensor::zeros(self.shape(), self.dtype(), self.device())
    }

    /// Ones with the shape, dtype and device of `self`.
    pub fn ones_like(&self) -> Result<Tensor> {
        Tensor::ones(self.shape(), self.dtype(), self.device())
    }

    /// The 1-d tensor `[start, start+1, ..., end-1]`.
    pub fn arange(start: i64, end: i64, dtype: DType, device: &Device) -> Result<Tensor> {
        if end < start {
            return Err(Error::invalid("arange", "end", format!("end {end} < start {start}")));
        }
        let v: Vec<f64> = (start..end).map(|x| x as f64).collect();
        let n = v.len();
        Tensor::from_cpu_storage(CpuStorage::F64(v).to_dtype(dtype), n)?.to_device(device)
    }

    /// Normal samples N(mean, std²) from [`Rng`] seeded with `seed` (drawn on the host, in f64,
    /// then converted, so every device and dtype sees the same numbers up to rounding).
    pub fn randn(
        seed: u64,
        shape: impl Into<Shape>,
        mean: f64,
        std: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let v = Rng::new(seed).normals(shape.elem_count(), mean, std);
        Tensor::from_cpu_storage(CpuStorage::F64(v).to_dtype(dtype), shape)?.to_device(device)
    }

    /// Uniform samples in [lo, hi) from [`Rng`] seeded with `seed`.
    pub fn rand(
        seed: u64,
        shape: impl Into<Shape>,
        lo: f64,
        hi: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let mut rng = Rng::new(seed);
        let v: Vec<f64> = (0..shape.elem_count()).map(|_| lo + (hi - lo) * rng.uniform()).collect();
        Tensor::from_cpu_storage(CpuStorage::F64(v).to_dtype(dtype), shape)?.to_device(device)
    }

    // ---------------------------------------------------------------- accessors

    /// The shape.
    pub fn shape(&self) -> &Shape {
        self.layout.shape()
    }

    /// The dims, outermost first.
    pub fn dims(&self) -> &[usize] {
        self.layout.dims()
    }

    /// The size of dim `d`, or an error.
    pub fn dim(&self, d: usize) -> Result<usize> {
        self.shape().dim("dim", d)
    }

    /// The number of dims.
    pub fn rank(&self) -> usize {
        self.dims().len()
    }

    /// The number of elements.
    pub fn elem_count(&self) -> usize {
        self.layout.elem_count()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    /// The device holding the storage.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The layout (shape, strides, offset).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The shared storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The shared storage's `Arc`, for building views.
    pub fn storage_arc(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Whether the elements are row-major without gaps.
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }

    /// Whether `self` and `other` share one storage buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// A new tensor with the same storage and another layout.
    pub fn with_layout(&self, layout: Layout) -> Result<Tensor> {
        Tensor::from_arc_storage(self.storage.clone(), layout, self.device.clone())
    }

    // ---------------------------------------------------------------- views

    /// Same elements, new shape. A view when contiguous; otherwise copies first.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        match self.layout.reshape(shape.clone())? {
            Some(l) => self.with_layout(l),
            None => {
                let c = self.contiguous()?;
                match c.layout.reshape(shape)? {
                    Some(l) => c.with_layout(l),
                    None => unreachable!("contiguous() returned a non-contiguous tensor"),
                }
            }
        }
    }

    /// Swaps two dims (a view).
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Tensor> {
        self.with_layout(self.layout.transpose(d0, d1)?)
    }

    /// Swaps the last two dims (a view). Errors below rank 2.
    pub fn t(&self) -> Result<Tensor> {
        let r = self.rank();
        if r < 2 {
            return Err(Error::bad_shape("t", self.shape(), "needs rank >= 2"));
        }
        self.transpose(r - 2, r - 1)
    }

    /// Reorders dims: output dim `i` is input dim `perm[i]` (a view).
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        self.with_layout(self.layout.permute(perm)?)
    }

    /// Elements `start..start+len` of dim `dim` (a view).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        self.with_layout(self.layout.narrow(dim, start, len)?)
    }

    /// Broadcasts to `shape` with stride-0 dims (a view).
    pub fn broadcast_as(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        self.with_layout(self.layout.broadcast_as(shape)?)
    }

    /// Inserts a size-1 dim at `dim` (a view).
    pub fn unsqueeze(&self, dim: usize) -> Result<Tensor> {
        self.with_layout(self.layout.unsqueeze(dim)?)
    }

    /// Removes size-1 dim `dim` (a view).
    pub fn squeeze(&self, dim: usize) -> Result<Tensor> {
        self.with_layout(self.layout.squeeze(dim)?)
    }

    /// Merges all dims into one (a view when contiguous).
    pub fn flatten_all(&self) -> Result<Tensor> {
        self.reshape(self.elem_count())
    }

    // ---------------------------------------------------------------- copies

    /// A contiguous tensor with the same values: `self` (shared) when already contiguous
    /// or a compact copy otherwise. On CUDA, non-contiguous input needs the
    /// strided-copy kernel of `moeba-kernels` (`moeba_kernels::ops::contiguous`).
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        match self.storage.as_ref() {
            Storage::Cpu(s) => {
                let out = map_strided(s, &self.layout);
                Tensor::from_cpu_storage(out, self.shape().clone())
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Err(Error::Unsupported {
                op: "Tensor::contiguous",
                msg: "a strided copy on CUDA is a kernel; HINT: use moeba_kernels::ops::contiguous".into(),
            }),
        }
    }

    /// The values converted to `dtype` (CPU; on CUDA use `moeba_kernels::ops::to_dtype`).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        match self.storage.as_ref() {
            Storage::Cpu(_) => {
                let c = self.contiguous()?;
                let s = c.cpu_storage_compact()?;
                Tensor::from_cpu_storage(s.to_dtype(dtype), self.shape().clone())
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Err(Error::Unsupported {
                op: "Tensor::to_dtype",
                msg: "casting on CUDA is a kernel; HINT: use moeba_kernels::ops::to_dtype".into(),
            }),
        }
    }

    /// A copy on `device` (the same tensor, shared, when already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device.same_device(device) {
            return Ok(self.clone());
        }
        match (self.storage.as_ref(), device) {
            #[cfg(feature = "cuda")]
            (Storage::Cpu(_), Device::Cuda(d)) => {
                let c = self.contiguous()?;
                let host = c.cpu_storage_compact()?;
                let storage = d.htod(&host)?;
                Tensor::from_storage(
                    Storage::Cuda(storage),
                    Layout::contiguous(self.shape().clone()),
                    device.clone(),
                )
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(s), _) => {
                // Copy the whole buffer to the host, then gather the logical elements there.
                let host = s.dtoh()?;
                let cpu =
                    Tensor::from_arc_storage(Arc::new(Storage::Cpu(host)), self.layout.clone(), Device::Cpu)?;
                cpu.contiguous()?.to_device(device)
            }
            _ => Err(Error::Unsupported { op: "to_device", msg: format!("{} -> {device}", self.device) }),
        }
    }

    /// The compact host storage of a contiguous CPU tensor (sliced to its own elements).
    fn cpu_storage_compact(&self) -> Result<CpuStorage> {
        let s = self.storage.as_cpu().ok_or_else(|| Error::Unsupported {
            op: "cpu_storage",
            msg: format!("tensor is on {}", self.device),
        })?;
        let range = self.layout.contiguous_range().expect("contiguous");
        if range.start == 0 && range.end == s.len() {
            return Ok(s.clone());
        }
        Ok(crate::map_cpu_storage!(s, v => into_storage(v[range].to_vec())))
    }

    /// The elements as a contiguous host slice of `T`, borrowed when the tensor is already a
    /// contiguous CPU tensor of dtype `T`, copied otherwise (strided gather; device → host).
    /// Errors if `T` is not the tensor's dtype.
    pub fn cpu_data<T: WithDType>(&self) -> Result<Cow<'_, [T]>> {
        if T::DTYPE != self.dtype() {
            return Err(Error::DTypeMismatch { op: "cpu_data", lhs: self.dtype(), rhs: T::DTYPE });
        }
        match self.storage.as_ref() {
            Storage::Cpu(s) => {
                let v = s.as_slice::<T>().expect("dtype checked");
                match self.layout.contiguous_range() {
                    Some(r) => Ok(Cow::Borrowed(&v[r])),
                    None => Ok(Cow::Owned(gather(v, &self.layout))),
                }
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {
                let t = self.to_device(&Device::Cpu)?;
                let v = t.cpu_data::<T>()?.into_owned();
                Ok(Cow::Owned(v))
            }
        }
    }

    /// All elements, row-major, as a `Vec<T>` (`T` must be the dtype).
    pub fn to_vec<T: WithDType>(&self) -> Result<Vec<T>> {
        Ok(self.cpu_data::<T>()?.into_owned())
    }

    /// All elements converted to f64, whatever the dtype (for tests and printing).
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        self.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.to_vec::<f64>()
    }

    /// The single element of a one-element tensor (any rank).
    pub fn to_scalar<T: WithDType>(&self) -> Result<T> {
        if self.elem_count() != 1 {
            return Err(Error::bad_shape("to_scalar", self.shape(), "expected exactly one element"));
        }
        Ok(self.to_vec::<T>()?[0])
    }

    /// The elements as little-endian bytes, row-major (safetensors payloads).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let t = self.to_device(&Device::Cpu)?.contiguous()?;
        Ok(t.cpu_storage_compact()?.as_bytes().to_vec())
    }
}

/// Wraps a typed vector into the matching `CpuStorage` variant.
fn into_storage<T: WithDType>(v: Vec<T>) -> CpuStorage {
    T::into_cpu_storage(v)
}

/// Gathers the logical elements of `layout` from `src` into a new row-major vector
/// (see [`gather_into`]).
pub fn gather<T: Copy>(src: &[T], layout: &Layout) -> Vec<T> {
    let n = layout.elem_count();
    if let Some(r) = layout.contiguous_range() {
        return src[r].to_vec();
    }
    let mut out: Vec<T> = Vec::with_capacity(n);
    gather_into(src, layout, &mut out.spare_capacity_mut()[..n]);
    // SAFETY: gather_into initialises every one of the n elements.
    unsafe { out.set_len(n) };
    out
}

/// Writes the logical elements of `layout` from `src`, row-major, into `out`, which must hold
/// exactly `layout.elem_count()` elements (all of them are initialised). Kernels call it on
/// pieces of a layout (e.g. `layout.narrow(0, ..)`) to copy in parallel.
///
/// Size-1 dims are dropped and dims that are contiguous with each other merged first. Then, if
/// the innermost dim has stride 1, runs are copied whole; otherwise the last two dims are copied
/// in 32×32 tiles (a blocked transpose, so both sides stay in cache). The outer dims are walked
/// with an odometer, so no index list is ever materialised.
///
/// # Panics
/// If `out.len()` is not `layout.elem_count()`, or the layout reaches past `src`.
pub fn gather_into<T: Copy>(src: &[T], layout: &Layout, out: &mut [std::mem::MaybeUninit<T>]) {
    let n = layout.elem_count();
    assert_eq!(out.len(), n, "gather_into: output holds {} elements, the layout {n}", out.len());
    if n == 0 {
        return;
    }
    // Simplify: drop size-1 dims, merge (outer, inner) pairs with stride_o == stride_i * dim_i.
    let mut dims: Vec<usize> = Vec::new();
    let mut strides: Vec<usize> = Vec::new();
    for (&d, &st) in layout.dims().iter().zip(layout.strides()) {
        if d == 1 {
            continue;
        }
        match (dims.last_mut(), strides.last_mut()) {
            (Some(pd), Some(ps)) if *ps == st * d => {
                *pd *= d;
                *ps = st;
            }
            _ => {
                dims.push(d);
                strides.push(st);
            }
        }
    }
    let base = layout.offset();
    if dims.is_empty() {
        out[0].write(src[base]);
        return;
    }
    let rank = dims.len();
    if rank == 1 {
        for (i, o) in out.iter_mut().enumerate() {
            o.write(src[base + i * strides[0]]);
        }
        return;
    }
    // The dims handled per outer index: one (a unit-stride run) or two (a tiled transpose).
    let inner = if strides[rank - 1] == 1 { 1 } else { 2 };
    let outer_rank = rank - inner;
    let mut counter = vec![0usize; outer_rank];
    let mut off = base;
    let mut pos = 0;
    loop {
        if inner == 1 {
            let len = dims[rank - 1];
            for (o, &v) in out[pos..pos + len].iter_mut().zip(&src[off..off + len]) {
                o.write(v);
            }
            pos += len;
        } else {
            let (rows, cols) = (dims[rank - 2], dims[rank - 1]);
            let (rs, cs) = (strides[rank - 2], strides[rank - 1]);
            let block = &mut out[pos..pos + rows * cols];
            const TILE: usize = 32;
            for r0 in (0..rows).step_by(TILE) {
                for c0 in (0..cols).step_by(TILE) {
                    for r in r0..(r0 + TILE).min(rows) {
                        let row = off + r * rs;
                        for c in c0..(c0 + TILE).min(cols) {
                            block[r * cols + c].write(src[row + c * cs]);
                        }
                    }
                }
            }
            pos += rows * cols;
        }
        // Advance the odometer over the outer dims.
        let mut d = outer_rank;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            counter[d] += 1;
            off += strides[d];
            if counter[d] < dims[d] {
                break;
            }
            off -= counter[d] * strides[d];
            counter[d] = 0;
        }
    }
}

fn map_strided(s: &CpuStorage, layout: &Layout) -> CpuStorage {
    crate::map_cpu_storage!(s, v => into_storage(gather(v, layout)))
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor[{}; {}; {}]", self.shape(), self.dtype(), self.device)
    }
}

impl std::fmt::Display for Tensor {
    /// Prints the values (at most 8 per row edge, the middle elided), then shape, dtype, device.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vals = match self.to_vec_f64() {
            Ok(v) => v,
            Err(e) => {
                return write!(
                    f,
                    "Tensor[{}; {}; {}] <unreadable: {e}>",
                    self.shape(),
                    self.dtype(),
                    self.device
                )
            }
        };
        let dims = self.dims().to_vec();
        let int = self.dtype().is_int();
        fn fmt_rec(
            f: &mut std::fmt::Formatter<'_>,
            vals: &[f64],
            dims: &[usize],
            depth: usize,
            int: bool,
        ) -> std::fmt::Result {
            const EDGE: usize = 4;
            let Some((&n, rest)) = dims.split_first() else {
                return if int { write!(f, "{}", vals[0]) } else { write!(f, "{:.4}", vals[0]) };
            };
            let inner: usize = rest.iter().product();
            f.write_str("[")?;
            let mut i = 0;
            while i < n {
                if n > 2 * EDGE && i == EDGE {
                    f.write_str("...")?;
                    i = n - EDGE;
                    if rest.is_empty() {
                        f.write_str(", ")?;
                    } else {
                        write!(f, ",\n{}", " ".repeat(depth + 1))?;
                    }
                    continue;
                }
                fmt_rec(f, &vals[i * inner..(i + 1) * inner], rest, depth + 1, int)?;
                if i + 1 < n {
                    if rest.is_empty() {
                        f.write_str(", ")?;
                    } else {
                        write!(f, ",\n{}", " ".repeat(depth + 1))?;
                    }
                }
                i += 1;
            }
            f.write_str("]")
        }
        if vals.is_empty() {
            f.write_str("[]")?;
        } else {
            fmt_rec(f, &vals, &dims, 0, int)?;
        }
        write!(f, "\nTensor[{}; {}; {}]", self.shape(), self.dtype(), self.device)
    }
}
