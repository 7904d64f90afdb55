//! Tensor construction, views, copies and conversions.

use moeba_tensor::{CpuStorage, DType, Device, Error, Shape, Tensor};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

fn arange(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::arange(0, n as i64, DType::F64, &CPU).unwrap().reshape(shape).unwrap()
}

/// Logical element at multi-index `idx` of a row-major vector of `dims`.
fn at(v: &[f64], dims: &[usize], idx: &[usize]) -> f64 {
    let mut flat = 0;
    for (i, d) in idx.iter().zip(dims) {
        flat = flat * d + i;
    }
    v[flat]
}

fn multi_index(mut flat: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for d in (0..dims.len()).rev() {
        idx[d] = flat % dims[d];
        flat /= dims[d];
    }
    idx
}

fn shape_strategy() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..6, 1..5)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn permute_matches_index_math(dims in shape_strategy(), seed in any::<u64>()) {
        let t = arange(&dims);
        let src = t.to_vec::<f64>().unwrap();
        let mut perm: Vec<usize> = (0..dims.len()).collect();
        // A seeded Fisher-Yates shuffle.
        let mut rng = moeba_tensor::Rng::new(seed);
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let p = t.permute(&perm).unwrap();
        prop_assert!(p.same_storage(&t));
        let out = p.to_vec::<f64>().unwrap();
        let pdims = p.dims().to_vec();
        for (flat, &val) in out.iter().enumerate() {
            let idx = multi_index(flat, &pdims);
            let mut src_idx = vec![0; dims.len()];
            for (i, &pi) in perm.iter().enumerate() {
                src_idx[pi] = idx[i];
            }
            prop_assert_eq!(val, at(&src, &dims, &src_idx));
        }
        // contiguous() then reshape round-trips.
        let c = p.contiguous().unwrap();
        prop_assert!(c.is_contiguous());
        prop_assert_eq!(c.to_vec::<f64>().unwrap(), out);
    }

    #[test]
    fn narrow_matches_index_math(dims in shape_strategy(), a in 0usize..6, b in 0usize..6, d in 0usize..4) {
        let t = arange(&dims);
        let d = d % dims.len();
        let start = a % dims[d];
        let len = b % (dims[d] - start + 1);
        let n = t.narrow(d, start, len).unwrap();
        let src = t.to_vec::<f64>().unwrap();
        let out = n.to_vec::<f64>().unwrap();
        prop_assert_eq!(out.len(), n.elem_count());
        for (flat, &val) in out.iter().enumerate() {
            let mut idx = multi_index(flat, n.dims());
            idx[d] += start;
            prop_assert_eq!(val, at(&src, &dims, &idx));
        }
    }

    #[test]
    fn broadcast_and_reshape(dims in shape_strategy(), lead in 1usize..4) {
        let t = arange(&dims);
        let mut target = vec![lead];
        target.extend(&dims);
        let b = t.broadcast_as(target.clone()).unwrap();
        let v = b.to_vec::<f64>().unwrap();
        let n = t.elem_count();
        let orig = t.to_vec::<f64>().unwrap();
        for r in 0..lead {
            prop_assert_eq!(&v[r * n..(r + 1) * n], orig.as_slice());
        }
        // Reshaping a non-contiguous view copies and keeps logical order.
        let tt = b.transpose(0, target.len() - 1).unwrap();
        let flat = tt.reshape(tt.elem_count()).unwrap();
        prop_assert_eq!(flat.to_vec::<f64>().unwrap(), tt.contiguous().unwrap().to_vec::<f64>().unwrap());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// The fast strided gather (`contiguous`) equals the element-by-element walk of the layout,
    /// for permuted, narrowed and broadcast views together.
    #[test]
    fn gather_equals_strided_walk(dims in shape_strategy(), seed in any::<u64>(), lead in 1usize..3) {
        let t = arange(&dims);
        let mut rng = moeba_tensor::Rng::new(seed);
        let mut full = vec![lead];
        full.extend(&dims);
        let mut v = t.broadcast_as(full).unwrap();
        let d = rng.below(v.rank() as u64) as usize;
        let size = v.dims()[d];
        let start = rng.below(size as u64) as usize;
        let len = 1 + rng.below((size - start) as u64) as usize;
        v = v.narrow(d, start, len).unwrap();
        let mut perm: Vec<usize> = (0..v.rank()).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.below(i as u64 + 1) as usize);
        }
        v = v.permute(&perm).unwrap();
        let src = t.to_vec::<f64>().unwrap();
        let walked: Vec<f64> = v.layout().strided_index().map(|i| src[i]).collect();
        prop_assert_eq!(v.contiguous().unwrap().to_vec::<f64>().unwrap(), walked);
    }
}

#[test]
fn constructors() {
    let z = Tensor::zeros((2, 3), DType::F32, &CPU).unwrap();
    assert_eq!(z.to_vec::<f32>().unwrap(), vec![0.0; 6]);
    let o = Tensor::ones(4, DType::BF16, &CPU).unwrap();
    assert_eq!(o.to_vec_f64().unwrap(), vec![1.0; 4]);
    let f = Tensor::full(2.5, [2, 2], DType::F16, &CPU).unwrap();
    assert_eq!(f.to_vec_f64().unwrap(), vec![2.5; 4]);
    let a = Tensor::arange(3, 7, DType::I64, &CPU).unwrap();
    assert_eq!(a.to_vec::<i64>().unwrap(), vec![3, 4, 5, 6]);
    let s = Tensor::scalar(3.0f32, &CPU).unwrap();
    assert_eq!(s.rank(), 0);
    assert_eq!(s.to_scalar::<f32>().unwrap(), 3.0);
    let r1 = Tensor::randn(42, (3, 5), 0.0, 1.0, DType::F32, &CPU).unwrap();
    let r2 = Tensor::randn(42, (3, 5), 0.0, 1.0, DType::F32, &CPU).unwrap();
    assert_eq!(r1.to_vec::<f32>().unwrap(), r2.to_vec::<f32>().unwrap());
    let u = Tensor::rand(1, 1000, -2.0, 3.0, DType::F64, &CPU).unwrap().to_vec::<f64>().unwrap();
    assert!(u.iter().all(|&x| (-2.0..3.0).contains(&x)));
}

#[test]
fn dtype_conversions_and_bytes() {
    let t = Tensor::from_vec(vec![1.5f32, -2.25, 3.0, 1e-3], (2, 2), &CPU).unwrap();
    for dt in [DType::F64, DType::BF16, DType::F16, DType::F32] {
        let back = t.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap();
        let tol = if matches!(dt, DType::BF16) { 1e-2 } else { 1e-3 };
        for (a, b) in back.iter().zip(t.to_vec::<f32>().unwrap()) {
            assert!((a - b).abs() <= tol * b.abs().max(1e-3), "{dt}: {a} vs {b}");
        }
    }
    let ints = t.to_dtype(DType::I64).unwrap().to_vec::<i64>().unwrap();
    assert_eq!(ints, vec![1, -2, 3, 0]);
    let bytes = t.t().unwrap().to_bytes().unwrap();
    let back = Tensor::from_bytes(&bytes, DType::F32, (2, 2), &CPU).unwrap();
    assert_eq!(back.to_vec::<f32>().unwrap(), vec![1.5, 3.0, -2.25, 1e-3]);
}

#[test]
fn errors_name_what_was_wrong() {
    let t = Tensor::zeros((2, 3), DType::F32, &CPU).unwrap();
    let e = t.reshape((4, 2)).unwrap_err().to_string();
    assert!(e.contains("reshape") && e.contains("[2, 3]") && e.contains("[4, 2]"), "{e}");
    let e = t.narrow(1, 2, 2).unwrap_err().to_string();
    assert!(e.contains("narrow") && e.contains("dim 1"), "{e}");
    let e = t.transpose(0, 5).unwrap_err().to_string();
    assert!(e.contains("transpose") && e.contains('5'), "{e}");
    let e = t.permute(&[0, 0]).unwrap_err().to_string();
    assert!(e.contains("permute"), "{e}");
    let e = t.broadcast_as((3, 3)).unwrap_err().to_string();
    assert!(e.contains("broadcast_as"), "{e}");
    let e = t.to_vec::<f64>().unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
    let e = Tensor::from_vec(vec![1.0f32; 5], (2, 3), &CPU).unwrap_err().to_string();
    assert!(e.contains('5') && e.contains('6'), "{e}");
    let e = Tensor::from_bytes(&[0u8; 7], DType::F32, 2, &CPU).unwrap_err().to_string();
    assert!(e.contains("7 bytes"), "{e}");
    let e = t.squeeze(0).unwrap_err().to_string();
    assert!(e.contains("squeeze") && e.contains("size 2"), "{e}");
    let storage = CpuStorage::F32(vec![0.0; 4]);
    let e = Tensor::from_cpu_storage(storage, Shape::from([5])).unwrap_err().to_string();
    assert!(e.contains('4') && e.contains('5'), "{e}");
    assert!("bf17".parse::<DType>().unwrap_err().to_string().contains("bf17"));
}

#[test]
fn display_is_readable() {
    let t = Tensor::arange(0, 20, DType::F32, &CPU).unwrap().reshape((2, 10)).unwrap();
    let s = t.to_string();
    assert!(s.contains("0.0000") && s.contains("...") && s.contains("Tensor[[2, 10]; f32; cpu]"), "{s}");
    let i = Tensor::arange(0, 3, DType::U32, &CPU).unwrap();
    assert!(i.to_string().starts_with("[0, 1, 2]"), "{i}");
    let cuda = Device::cuda(0);
    #[cfg(not(feature = "cuda"))]
    assert!(cuda.unwrap_err().to_string().contains("--features cuda"));
    #[cfg(feature = "cuda")]
    let _ = cuda;
}
