//! Shared helpers of the CPU kernel tests: random strided views, tolerances, SIMD path loops.
#![allow(dead_code)]

use std::sync::Mutex;

use moeba_kernels::cpu::simd;
use moeba_tensor::{DType, Device, Result, Rng, Tensor};
use proptest::prelude::*;

/// How a test input is laid out in memory (its logical shape is always the requested one).
#[derive(Debug, Clone, Copy)]
pub enum View {
    /// Fresh contiguous tensor.
    Contiguous,
    /// A permutation of a contiguous tensor of permuted shape.
    Permuted,
    /// A narrow (per dim) of a larger contiguous tensor.
    Narrowed,
    /// Some dims broadcast from size 1 (stride 0).
    Broadcast,
    /// Narrowed, then permuted.
    NarrowedPermuted,
}

/// Any view kind.
pub fn view() -> impl Strategy<Value = View> {
    prop_oneof![
        Just(View::Contiguous),
        Just(View::Permuted),
        Just(View::Narrowed),
        Just(View::Broadcast),
        Just(View::NarrowedPermuted),
    ]
}

/// Dims of rank 0..=4, sizes 1..=9 with an occasional empty dim.
pub fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![12 => 1usize..=9, 1 => Just(0usize)], 0..=4)
}

/// The float dtypes under test.
pub fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F64), Just(DType::BF16)]
}

/// Values in `[lo, hi)` with logical shape `dims`, dtype `dtype`, laid out as `view`.
pub fn make(seed: u64, dims: &[usize], dtype: DType, view: View, lo: f64, hi: f64) -> Result<Tensor> {
    let mut rng = Rng::new(seed ^ 0x5eed);
    let rank = dims.len();
    let dev = Device::Cpu;
    let rand = |d: &[usize], s: u64| Tensor::rand(s, d.to_vec(), lo, hi, dtype, &dev);
    let perm_of = |rng: &mut Rng| {
        let mut p: Vec<usize> = (0..rank).collect();
        for i in (1..rank).rev() {
            p.swap(i, rng.below(i as u64 + 1) as usize);
        }
        p
    };
    let permuted = |base_dims: &[usize], rng: &mut Rng, narrow: bool| -> Result<Tensor> {
        // base dim i has size dims[p[i]]; permuting by the inverse gives back `dims`.
        let p = perm_of(rng);
        let mut inv = vec![0; rank];
        for (i, &pi) in p.iter().enumerate() {
            inv[pi] = i;
        }
        let bd: Vec<usize> = p.iter().map(|&pi| base_dims[pi]).collect();
        let mut t = if narrow {
            let extra: Vec<usize> = bd.iter().map(|_| rng.below(3) as usize).collect();
            let big: Vec<usize> = bd.iter().zip(&extra).map(|(d, e)| d + e).collect();
            let mut t = rand(&big, seed)?;
            for (i, (&d, &e)) in bd.iter().zip(&extra).enumerate() {
                let start = if e == 0 { 0 } else { rng.below(e as u64 + 1) as usize };
                t = t.narrow(i, start, d)?;
            }
            t
        } else {
            rand(&bd, seed)?
        };
        t = t.permute(&inv)?;
        Ok(t)
    };
    let t = match view {
        View::Contiguous => rand(dims, seed)?,
        View::Permuted => permuted(dims, &mut rng, false)?,
        View::NarrowedPermuted => permuted(dims, &mut rng, true)?,
        View::Narrowed => {
            let extra: Vec<usize> = dims.iter().map(|_| rng.below(3) as usize).collect();
            let big: Vec<usize> = dims.iter().zip(&extra).map(|(d, e)| d + e).collect();
            let mut t = rand(&big, seed)?;
            for (i, (&d, &e)) in dims.iter().zip(&extra).enumerate() {
                let start = rng.below(e as u64 + 1) as usize;
                t = t.narrow(i, start, d)?;
            }
            t
        }
        View::Broadcast => {
            let small: Vec<usize> = dims.iter().map(|&d| if rng.below(2) == 0 { 1 } else { d }).collect();
            rand(&small, seed)?.broadcast_as(dims.to_vec())?
        }
    };
    assert_eq!(t.dims(), dims);
    Ok(t)
}

/// `(atol, rtol)` for results stored in `dtype`, computed from inputs of that dtype.
pub fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-10, 1e-10),
        DType::F32 => (2e-5, 2e-5),
        DType::BF16 => (2e-2, 1.6e-2),
        DType::F16 => (2e-3, 2e-3),
        _ => (0.0, 0.0),
    }
}

/// Asserts `got` (any dtype) matches the f64 `want` elementwise within `tol(dtype)`;
/// NaN must meet NaN, infinities must be equal.
pub fn assert_close(got: &Tensor, want: &Tensor, dtype: DType, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert!(got.is_contiguous(), "{what}: output not contiguous");
    let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    let (atol, rtol) = tol(dtype);
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        let ok = if b.is_nan() {
            a.is_nan()
        } else if b.is_infinite() {
            a == b
        } else {
            (a - b).abs() <= atol + rtol * b.abs()
        };
        assert!(ok, "{what}: element {i}: got {a}, want {b} (dtype {dtype}, path {})", simd::active_path());
    }
}

static PATH_LOCK: Mutex<()> = Mutex::new(());

/// Runs `f` once on every SIMD path this CPU supports (serialised with the other tests of the
/// binary, since the path is process-wide), then restores the previous path.
pub fn for_each_path(mut f: impl FnMut(simd::Path)) {
    let _guard = PATH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let prev = simd::path();
    for p in simd::available_paths() {
        simd::set_path(p).unwrap();
        f(p);
    }
    simd::set_path(prev).unwrap();
}
