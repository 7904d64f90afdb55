//! CPU elementwise ops (unary, backward, affine, powf, clamp, binary with broadcasting) against
//! the f64 references, on random shapes and strided views, in f32/f64/bf16, on every SIMD path.

mod cpu_common;

use cpu_common::{assert_close, dtype, for_each_path, make, shape, view, View};
use moeba_kernels::cpu::simd;
use moeba_kernels::{ops, reference::elementwise as refe, BinaryOp, UnaryOp};
use moeba_tensor::{DType, Device, Tensor};
use proptest::prelude::*;

/// Input range for `op` (positive and away from 0 where the op needs it).
fn domain(op: UnaryOp) -> (f64, f64) {
    match op {
        UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Recip => (0.2, 4.0),
        UnaryOp::Softplus => (-25.0, 25.0),
        _ => (-6.0, 6.0),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn unary_and_backward_match_reference(
        dims in shape(), v in view(), dt in dtype(), seed in any::<u64>()
    ) {
        for_each_path(|_| {
            for op in UnaryOp::ALL {
                let (lo, hi) = domain(op);
                let x = make(seed, &dims, dt, v, lo, hi).unwrap();
                let got = ops::unary(&x, op).unwrap();
                assert_eq!(got.dtype(), dt);
                assert_close(&got, &refe::unary(&x, op).unwrap(), dt, op.name());

                let dy = make(seed.wrapping_add(1), &dims, dt, View::Permuted, -2.0, 2.0).unwrap();
                let got = ops::unary_backward(&x, &dy, op).unwrap();
                assert_close(&got, &refe::unary_backward(&x, &dy, op).unwrap(), dt, op.name());
            }
        });
    }

    #[test]
    fn affine_powf_clamp_match_reference(
        dims in shape(), v in view(), dt in dtype(), seed in any::<u64>(),
        mul in -3.0f64..3.0, add in -3.0f64..3.0, e in -2.5f64..2.5, lo in -2.0f64..0.0, w in 0.0f64..3.0
    ) {
        for_each_path(|_| {
            let x = make(seed, &dims, dt, v, -4.0, 4.0).unwrap();
            // Parameters representable in the dtype, so that the reference sees the same ones.
            let q = |p: f64| Tensor::full(p, (), dt, &Device::Cpu).unwrap().to_vec_f64().unwrap()[0];
            let (mul, add, lo, hi) = (q(mul), q(add), q(lo), q(lo + w));
            let got = ops::affine(&x, mul, add).unwrap();
            assert_close(&got, &refe::affine(&x, mul, add).unwrap(), dt, "affine");
            let got = ops::clamp(&x, lo, hi).unwrap();
            assert_close(&got, &refe::clamp(&x, lo, hi).unwrap(), dt, "clamp");
            let xp = make(seed, &dims, dt, v, 0.3, 3.0).unwrap();
            let e = q(e);
            let got = ops::powf(&xp, e).unwrap();
            assert_close(&got, &refe::powf(&xp, e).unwrap(), dt, "powf");
        });
    }

    #[test]
    fn binary_broadcast_matches_reference(
        dims in shape(), va in view(), vb in view(), dt in dtype(), seed in any::<u64>(),
        mask in 0u32..16, drop in 0usize..3, swap in any::<bool>()
    ) {
        // b: dims with some set to 1 (mask) and some leading dims dropped: broadcast against a.
        let keep = drop.min(dims.len());
        let bdims: Vec<usize> = dims[keep..]
            .iter()
            .enumerate()
            .map(|(i, &d)| if mask >> (i % 4) & 1 == 1 { 1 } else { d })
            .collect();
        for_each_path(|_| {
            let a = make(seed, &dims, dt, va, -3.0, 3.0).unwrap();
            let b = make(seed.wrapping_mul(3), &bdims, dt, vb, 0.5, 3.0).unwrap();
            let (a, b) = if swap { (b, a) } else { (a, b) };
            for op in BinaryOp::ALL {
                let got = ops::binary(&a, &b, op).unwrap();
                assert_eq!(got.dtype(), dt);
                assert_close(&got, &refe::binary(&a, &b, op).unwrap(), dt, op.name());
            }
        });
    }
}

/// The hand-picked fast paths: same shape, scalar either side, row broadcasts both ways.
#[test]
fn binary_fast_path_shapes() {
    let cases: &[(&[usize], &[usize])] = &[
        (&[37, 29], &[37, 29]),
        (&[37, 29], &[]),
        (&[], &[37, 29]),
        (&[37, 29], &[29]),
        (&[37, 29], &[37, 1]),
        (&[37, 1], &[37, 29]),
        (&[1, 29], &[37, 1]),
        (&[5, 1, 7], &[3, 1]),
        (&[1000], &[1]),
    ];
    for_each_path(|p| {
        for dt in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            for (i, (da, db)) in cases.iter().enumerate() {
                let a = make(i as u64, da, dt, View::Contiguous, -2.0, 2.0).unwrap();
                let b = make(100 + i as u64, db, dt, View::Contiguous, 0.5, 2.0).unwrap();
                for op in BinaryOp::ALL {
                    let got = ops::binary(&a, &b, op).unwrap();
                    let what = format!("{} {da:?} {db:?} {}", op.name(), p.name());
                    assert_close(&got, &refe::binary(&a, &b, op).unwrap(), dt, &what);
                }
            }
        }
    });
}

/// Outputs big enough to be written in parallel chunks (and the tails of every chunk).
#[test]
fn large_tensors_run_in_parallel_chunks() {
    for_each_path(|_| {
        let dt = DType::F32;
        let a = make(1, &[301, 517], dt, View::Contiguous, -3.0, 3.0).unwrap();
        let b = make(2, &[301, 517], dt, View::Contiguous, 0.5, 3.0).unwrap();
        let row = make(3, &[517], dt, View::Contiguous, 0.5, 3.0).unwrap();
        for op in BinaryOp::ALL {
            assert_close(&ops::binary(&a, &b, op).unwrap(), &refe::binary(&a, &b, op).unwrap(), dt, "big");
            assert_close(
                &ops::binary(&a, &row, op).unwrap(),
                &refe::binary(&a, &row, op).unwrap(),
                dt,
                "row",
            );
        }
        let at = a.t().unwrap();
        let bt = b.t().unwrap();
        assert_close(
            &ops::add(&at, &bt).unwrap(),
            &refe::binary(&at, &bt, BinaryOp::Add).unwrap(),
            dt,
            "transposed",
        );
        for op in [UnaryOp::Exp, UnaryOp::Silu, UnaryOp::Gelu, UnaryOp::Tanh] {
            assert_close(&ops::unary(&a, op).unwrap(), &refe::unary(&a, op).unwrap(), dt, op.name());
            assert_close(&ops::unary(&at, op).unwrap(), &refe::unary(&at, op).unwrap(), dt, op.name());
        }
        let ab = a.to_dtype(DType::BF16).unwrap();
        assert_close(
            &ops::silu(&ab).unwrap(),
            &refe::unary(&ab, UnaryOp::Silu).unwrap(),
            DType::BF16,
            "bf16",
        );
    });
}

/// Values where the formulas are delicate: huge, tiny, infinities and NaN.
#[test]
fn special_values() {
    let xs =
        [0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 100.0, -100.0, 1e30, -1e30, f64::INFINITY, f64::NEG_INFINITY];
    for_each_path(|p| {
        for dt in [DType::F32, DType::F64] {
            let x = Tensor::from_vec(xs.to_vec(), xs.len(), &Device::Cpu).unwrap().to_dtype(dt).unwrap();
            for op in [
                UnaryOp::Exp,
                UnaryOp::Sigmoid,
                UnaryOp::Silu,
                UnaryOp::Gelu,
                UnaryOp::Softplus,
                UnaryOp::Tanh,
                UnaryOp::Relu,
                UnaryOp::Abs,
                UnaryOp::Neg,
            ] {
                let got = ops::unary(&x, op).unwrap().to_vec_f64().unwrap();
                // The reference rounded to the dtype (overflow to inf, subnormals).
                // Subnormal results may flush to 0 (e.g. sigmoid(-100) = 1 / (1 + inf)).
                let tiny = if dt == DType::F32 { f32::MIN_POSITIVE as f64 } else { f64::MIN_POSITIVE };
                let want = refe::unary(&x, op).unwrap().to_dtype(dt).unwrap().to_vec_f64().unwrap();
                for ((&g, &w), &xv) in got.iter().zip(&want).zip(&xs) {
                    let ok = if w.is_nan() {
                        g.is_nan()
                    } else {
                        g == w || (g - w).abs() <= 1e-5 * w.abs() + tiny
                    };
                    assert!(ok, "{} {} {dt} at x={xv}: {g} vs {w}", op.name(), p.name());
                }
            }
            let nan = Tensor::from_vec(vec![f64::NAN, 1.0], 2, &Device::Cpu).unwrap().to_dtype(dt).unwrap();
            for op in UnaryOp::ALL {
                assert!(ops::unary(&nan, op).unwrap().to_vec_f64().unwrap()[0].is_nan(), "{} NaN", op.name());
            }
            let one = Tensor::from_vec(vec![1.0, 1.0], 2, &Device::Cpu).unwrap().to_dtype(dt).unwrap();
            for op in [BinaryOp::Maximum, BinaryOp::Minimum] {
                let ab = ops::binary(&nan, &one, op).unwrap().to_vec_f64().unwrap();
                let ba = ops::binary(&one, &nan, op).unwrap().to_vec_f64().unwrap();
                assert!(ab[0].is_nan() && ba[0].is_nan(), "{} propagates NaN", op.name());
            }
            let c = ops::clamp(&nan, -1.0, 0.5).unwrap().to_vec_f64().unwrap();
            assert!(c[0].is_nan() && c[1] == 0.5);
        }
    });
}

/// The references' derivatives agree with central finite differences (checks the references).
#[test]
fn reference_derivatives_match_finite_differences() {
    let xs: Vec<f64> = (0..40).map(|i| 0.23 + i as f64 * 0.137).flat_map(|v| [v, -v]).collect();
    for op in UnaryOp::ALL {
        for &x in &xs {
            if matches!(op, UnaryOp::Log | UnaryOp::Sqrt) && x <= 0.0 {
                continue;
            }
            let h = 1e-6 * x.abs().max(1.0);
            let fd = (refe::unary_f64(op, x + h) - refe::unary_f64(op, x - h)) / (2.0 * h);
            let an = refe::unary_derivative_f64(op, x);
            assert!((fd - an).abs() <= 1e-5 * (1.0 + an.abs()), "{} at {x}: fd {fd} vs {an}", op.name());
        }
    }
}

#[test]
fn errors_name_op_dtype_and_shapes() {
    let dev = Device::Cpu;
    let ints = Tensor::zeros((2, 3), DType::U32, &dev).unwrap();
    let e = ops::unary(&ints, UnaryOp::Exp).unwrap_err().to_string();
    assert!(e.contains("exp") && e.contains("U32"), "{e}");
    let e = ops::add(&ints, &ints).unwrap_err().to_string();
    assert!(e.contains("add") && e.contains("U32"), "{e}");
    let i64s = Tensor::zeros(4, DType::I64, &dev).unwrap();
    let e = ops::affine(&i64s, 1.0, 0.0).unwrap_err().to_string();
    assert!(e.contains("affine") && e.contains("I64"), "{e}");

    let a = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((4, 3), DType::F32, &dev).unwrap();
    let e = ops::mul(&a, &b).unwrap_err().to_string();
    assert!(e.contains("mul") && e.contains("[2, 3]") && e.contains("[4, 3]"), "{e}");
    let c = Tensor::zeros(2, DType::F32, &dev).unwrap();
    let e = ops::sub(&a, &c).unwrap_err().to_string();
    assert!(e.contains("sub") && e.contains("[2, 3]") && e.contains("[2]"), "{e}");

    let f64s = Tensor::zeros((2, 3), DType::F64, &dev).unwrap();
    let e = ops::add(&a, &f64s).unwrap_err().to_string();
    assert!(e.contains("add") && e.contains("F32") && e.contains("F64"), "{e}");

    let e = ops::unary_backward(&a, &b, UnaryOp::Silu).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[4, 3]"), "{e}");
    let e = ops::clamp(&a, 1.0, -1.0).unwrap_err().to_string();
    assert!(e.contains("clamp") && e.contains("lo"), "{e}");
}

#[test]
fn simd_path_selection() {
    let avail = simd::available_paths();
    assert_eq!(avail[0], simd::Path::Scalar);
    assert!(avail.contains(&simd::detected_path()));
    assert!(["scalar", "neon", "avx2+fma", "avx512"].contains(&simd::active_path()));
    for p in [simd::Path::Neon, simd::Path::Avx2, simd::Path::Avx512] {
        if !simd::is_supported(p) {
            assert!(simd::set_path(p).is_err(), "{} should be refused", p.name());
        }
    }
    assert_eq!(simd::Path::parse("AVX2"), Some(simd::Path::Avx2));
    assert_eq!(simd::Path::parse("scalar"), Some(simd::Path::Scalar));
    assert_eq!(simd::Path::parse("sse"), None);
}
