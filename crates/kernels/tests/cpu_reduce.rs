//! CPU reductions, argmax, softmax and log-softmax against the f64 references, on random shapes,
//! strided views and dim subsets, in f32/f64/bf16, on every SIMD path.

mod cpu_common;

use cpu_common::{assert_close, dtype, for_each_path, make, shape, view, View};
use moeba_kernels::{ops, reference::reduce as refr, ReduceOp};
use moeba_tensor::{DType, Device, Rng, Tensor};
use proptest::prelude::*;

const OPS: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min];

/// Every reduce op over `dims` against the reference (both must fail, or agree).
fn check_reduce(x: &Tensor, dims: &[usize], keepdim: bool, dt: DType) {
    for op in OPS {
        let want = refr::reduce(x, dims, keepdim, op);
        let got = ops::reduce(x, dims, keepdim, op);
        match (got, want) {
            (Ok(g), Ok(w)) => {
                assert_eq!(g.dtype(), dt);
                let what = format!("{} over {dims:?} of {:?} keepdim {keepdim}", op.name(), x.dims());
                if dt == DType::BF16 && matches!(op, ReduceOp::Sum | ReduceOp::Mean) {
                    // bf16 output rounding is relative to the result, which may cancel: compare
                    // against the f64 result rounded to bf16 instead.
                    let w = w.to_dtype(DType::BF16).unwrap().to_dtype(DType::F64).unwrap();
                    let gv = g.to_vec_f64().unwrap();
                    let wv = w.to_vec_f64().unwrap();
                    let scale = x.to_vec_f64().unwrap().iter().fold(0f64, |m, v| m.max(v.abs()));
                    for (a, b) in gv.iter().zip(&wv) {
                        let ok = if b.is_nan() {
                            a.is_nan()
                        } else {
                            (a - b).abs() <= 1e-2 * b.abs() + 1e-3 * scale
                        };
                        assert!(ok, "{what}: {a} vs {b}");
                    }
                } else {
                    assert_close(&g, &w, dt, &what);
                }
            }
            (Err(_), Err(_)) => {}
            (g, w) => panic!("{} over {dims:?} of {:?}: fast {g:?} vs reference {w:?}", op.name(), x.dims()),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn reduce_matches_reference(
        dims in shape(), v in view(), dt in dtype(), seed in any::<u64>(), mask in 0u32..16, keepdim in any::<bool>()
    ) {
        let red: Vec<usize> = (0..dims.len()).filter(|d| mask >> d & 1 == 1).collect();
        for_each_path(|_| {
            let x = make(seed, &dims, dt, v, -3.0, 3.0).unwrap();
            check_reduce(&x, &red, keepdim, dt);
            // Dims given out of order and repeated mean the same set.
            let mut rev = red.clone();
            rev.reverse();
            rev.extend(red.first());
            check_reduce(&x, &rev, keepdim, dt);
        });
    }

    #[test]
    fn argmax_matches_reference_with_ties(
        dims in shape(), seed in any::<u64>(), dt in dtype(), keepdim in any::<bool>(), transpose in any::<bool>()
    ) {
        // Small integers: ties everywhere.
        let mut rng = Rng::new(seed);
        let n: usize = dims.iter().product();
        let vals: Vec<f64> = (0..n).map(|_| rng.below(4) as f64 - 2.0).collect();
        let mut x = Tensor::from_vec(vals, dims.clone(), &Device::Cpu).unwrap().to_dtype(dt).unwrap();
        if transpose && dims.len() >= 2 {
            x = x.t().unwrap();
        }
        for_each_path(|_| {
            for dim in 0..x.rank() {
                let want = refr::argmax(&x, dim, keepdim);
                match (ops::argmax(&x, dim, keepdim), want) {
                    (Ok(g), Ok(w)) => {
                        assert_eq!(g.dtype(), DType::U32);
                        assert_eq!(g.dims(), w.dims());
                        assert_eq!(g.to_vec::<u32>().unwrap(), w.to_vec::<u32>().unwrap(), "dim {dim} of {:?}", x.dims());
                    }
                    (Err(_), Err(_)) => {}
                    (g, w) => panic!("argmax dim {dim}: {g:?} vs {w:?}"),
                }
            }
        });
    }

    #[test]
    fn softmax_matches_reference_every_dim(
        dims in shape(), v in view(), dt in dtype(), seed in any::<u64>(), big in any::<bool>()
    ) {
        // `big`: logits up to ±60, where an unshifted exp would overflow in f32 sums.
        let r = if big { 60.0 } else { 4.0 };
        for_each_path(|p| {
            let x = make(seed, &dims, dt, v, -r, r).unwrap();
            for dim in 0..dims.len() {
                let what = format!("softmax dim {dim} of {dims:?} ({})", p.name());
                assert_close(&ops::softmax(&x, dim).unwrap(), &refr::softmax(&x, dim).unwrap(), dt, &what);
                // log-softmax values reach -2r: scale the absolute tolerance with them.
                let got = ops::log_softmax(&x, dim).unwrap();
                let want = refr::log_softmax(&x, dim).unwrap();
                assert_eq!(got.dims(), want.dims());
                let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
                let (atol, rtol) = cpu_common::tol(dt);
                for (a, b) in g.iter().zip(&w) {
                    assert!((a - b).abs() <= atol * (1.0 + r) + rtol * b.abs(), "log_{what}: {a} vs {b}");
                }
            }
        });
    }
}

#[test]
fn argmax_tie_and_nan_rules() {
    let dev = Device::Cpu;
    for dt in [DType::F32, DType::F64, DType::BF16] {
        let x = Tensor::from_vec(vec![1.0, 3.0, 3.0, 2.0], 4, &dev).unwrap().to_dtype(dt).unwrap();
        assert_eq!(ops::argmax(&x, 0, false).unwrap().to_vec::<u32>().unwrap(), vec![1]);
        let x = Tensor::from_vec(vec![1.0, f64::NAN, 5.0, f64::NAN], 4, &dev).unwrap().to_dtype(dt).unwrap();
        assert_eq!(ops::argmax(&x, 0, true).unwrap().to_vec::<u32>().unwrap(), vec![1]);
        let x = Tensor::from_vec(vec![f64::NEG_INFINITY; 3], (1, 3), &dev).unwrap().to_dtype(dt).unwrap();
        assert_eq!(ops::argmax(&x, 1, false).unwrap().to_vec::<u32>().unwrap(), vec![0]);
        let m = ops::max(
            &Tensor::from_vec(vec![1.0, f64::NAN, 5.0], 3, &dev).unwrap().to_dtype(dt).unwrap(),
            &[0],
            false,
        )
        .unwrap()
        .to_vec_f64()
        .unwrap();
        assert!(m[0].is_nan(), "max propagates NaN");
    }
}

/// Shapes big enough for the parallel paths: many rows, few long rows, columns, softmax both ways.
#[test]
fn large_reductions_and_softmax() {
    for_each_path(|p| {
        let dt = DType::F32;
        let x = make(7, &[301, 517], dt, View::Contiguous, -3.0, 3.0).unwrap();
        let x3 = make(8, &[3, 4001, 17], dt, View::Contiguous, -3.0, 3.0).unwrap();
        for (t, dims) in [
            (&x, vec![1]),
            (&x, vec![0]),
            (&x, vec![0, 1]),
            (&x3, vec![1]),
            (&x3, vec![0, 2]),
            (&x3, vec![0, 1]),
        ] {
            check_reduce(t, &dims, false, dt);
        }
        let xt = x.t().unwrap();
        check_reduce(&xt, &[1], true, dt);
        for dim in 0..2 {
            let what = format!("softmax dim {dim} ({})", p.name());
            assert_close(&ops::softmax(&x, dim).unwrap(), &refr::softmax(&x, dim).unwrap(), dt, &what);
            assert_close(
                &ops::log_softmax(&x, dim).unwrap(),
                &refr::log_softmax(&x, dim).unwrap(),
                dt,
                &what,
            );
        }
        let a = ops::argmax(&x, 1, false).unwrap().to_vec::<u32>().unwrap();
        assert_eq!(a, refr::argmax(&x, 1, false).unwrap().to_vec::<u32>().unwrap());
    });
}

/// Blocked f32 summation stays accurate on a long row (naive f32 accumulation drifts by ~1e-3).
#[test]
fn f32_sum_is_accurate() {
    let n = 1_000_003;
    let x = Tensor::full(0.1, n, DType::F32, &Device::Cpu).unwrap();
    let exact = n as f64 * (0.1f32 as f64);
    for_each_path(|p| {
        let s = ops::sum_all(&x).unwrap().to_vec_f64().unwrap()[0];
        assert!((s - exact).abs() <= 1e-6 * exact, "{}: {s} vs {exact}", p.name());
        let m = ops::mean(&x, &[0], false).unwrap().to_vec_f64().unwrap()[0];
        assert!((m - 0.1f32 as f64).abs() <= 1e-7, "{}: mean {m}", p.name());
    });
    let y = Tensor::full(0.1, (4001, 250), DType::F32, &Device::Cpu).unwrap();
    let col = ops::sum(&y, &[0], false).unwrap().to_vec_f64().unwrap();
    for c in col {
        assert!((c - 4001.0 * (0.1f32 as f64)).abs() <= 1e-6 * 400.0, "column sum {c}");
    }
}

#[test]
fn errors_name_op_dtype_and_dims() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let e = ops::sum(&x, &[2], false).unwrap_err().to_string();
    assert!(e.contains("sum") && e.contains("dim 2") && e.contains("rank 2"), "{e}");
    let e = ops::argmax(&x, 5, false).unwrap_err().to_string();
    assert!(e.contains("argmax") && e.contains("dim 5"), "{e}");
    let e = ops::softmax(&x, 2).unwrap_err().to_string();
    assert!(e.contains("softmax") && e.contains("dim 2"), "{e}");
    let e = ops::log_softmax(&x, 3).unwrap_err().to_string();
    assert!(e.contains("log_softmax") && e.contains("dim 3"), "{e}");
    let ints = Tensor::zeros((2, 3), DType::I64, &dev).unwrap();
    let e = ops::mean(&ints, &[0], false).unwrap_err().to_string();
    assert!(e.contains("mean") && e.contains("I64"), "{e}");
    let e = ops::softmax(&ints, 0).unwrap_err().to_string();
    assert!(e.contains("softmax") && e.contains("I64"), "{e}");
    let e = ops::argmax(&ints, 0, false).unwrap_err().to_string();
    assert!(e.contains("argmax") && e.contains("I64"), "{e}");
    let empty = Tensor::zeros((3, 0), DType::F32, &dev).unwrap();
    let e = ops::max(&empty, &[1], false).unwrap_err().to_string();
    assert!(e.contains("max") && e.contains("[3, 0]"), "{e}");
    let e = ops::argmax(&empty, 1, false).unwrap_err().to_string();
    assert!(e.contains("argmax") && e.contains("[3, 0]"), "{e}");
    // Sum over nothing is 0, a no-dims reduce is a copy.
    assert_eq!(ops::sum(&empty, &[1], false).unwrap().to_vec::<f32>().unwrap(), vec![0.0; 3]);
    assert_eq!(ops::sum(&x, &[], false).unwrap().dims(), &[2, 3]);
}
