//! CPU matmul against the f64 reference: random shapes (sizes that are not multiples of the
//! 6×16 micro-tile, size 1, empty dims), transposed / narrowed / broadcast operands, batch
//! broadcasting, every float dtype, the blocked GEMM's edge tiles and block loops (with tiny
//! cache blocks so small shapes cross every block boundary), and the error messages.

use moeba_kernels::{ops, reference};
use moeba_tensor::{DType, Device, Tensor};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

/// A tensor of logical shape `dims`, built as one of several layouts:
/// 0 contiguous, 1 the last two dims transposed (a `.t()` view), 2 narrowed in the last two
/// dims (offset and gaps), 3 every dim reversed through `permute`.
fn make(seed: u64, dims: &[usize], dtype: DType, layout: u8) -> Tensor {
    let r = dims.len();
    let t = match layout % 4 {
        1 if r >= 2 => {
            let mut d = dims.to_vec();
            d.swap(r - 2, r - 1);
            Tensor::randn(seed, d, 0.0, 1.0, dtype, &CPU).unwrap().t().unwrap()
        }
        2 if r >= 2 => {
            let mut d = dims.to_vec();
            d[r - 2] += 3;
            d[r - 1] += 2;
            Tensor::randn(seed, d, 0.0, 1.0, dtype, &CPU)
                .unwrap()
                .narrow(r - 2, 2, dims[r - 2])
                .unwrap()
                .narrow(r - 1, 1, dims[r - 1])
                .unwrap()
        }
        3 => {
            let d: Vec<usize> = dims.iter().rev().copied().collect();
            let perm: Vec<usize> = (0..r).rev().collect();
            Tensor::randn(seed, d, 0.0, 1.0, dtype, &CPU).unwrap().permute(&perm).unwrap()
        }
        _ => Tensor::randn(seed, dims.to_vec(), 0.0, 1.0, dtype, &CPU).unwrap(),
    };
    assert_eq!(t.dims(), dims);
    t
}

fn abs(x: &Tensor) -> Tensor {
    let v: Vec<f64> = x.to_vec_f64().unwrap().iter().map(|v| v.abs()).collect();
    Tensor::from_vec(v, x.dims(), &CPU).unwrap()
}

/// Checks `out` against the reference elementwise, with a tolerance proportional to
/// `Σ_p |a_ip| |b_pj|` (the scale of the rounding error of any summation order).
fn check(a: &Tensor, b: &Tensor, out: &Tensor) {
    let want = reference::matmul::matmul(a, b).unwrap();
    assert_eq!(out.dims(), want.dims(), "shape of {a:?} @ {b:?}");
    assert_eq!(out.dtype(), a.dtype());
    let scale = reference::matmul::matmul(&abs(a), &abs(b)).unwrap().to_vec_f64().unwrap();
    let k = a.dims()[a.rank() - 1] as f64;
    let eps = match a.dtype() {
        DType::F64 => 1e-14,
        DType::F32 => 1e-6,
        DType::BF16 => 2e-2,
        _ => 4e-3,
    };
    let got = out.to_vec_f64().unwrap();
    for (i, ((g, w), s)) in got.iter().zip(want.to_vec_f64().unwrap()).zip(scale).enumerate() {
        let tol = eps * (k.sqrt() + 2.0) * (s + 1e-3);
        assert!((g - w).abs() <= tol, "{a:?} @ {b:?}: element {i}: got {g}, want {w} (tol {tol})");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Plain GEMMs, every layout pair, f32 and f64.
    #[test]
    fn gemm_random(m in 1usize..70, n in 1usize..70, k in 1usize..70,
                   la in 0u8..4, lb in 0u8..4, f64_ in any::<bool>(), seed in 0u64..1000) {
        let dt = if f64_ { DType::F64 } else { DType::F32 };
        let a = make(seed, &[m, k], dt, la);
        let b = make(seed + 1, &[k, n], dt, lb);
        check(&a, &b, &ops::matmul(&a, &b).unwrap());
        // The portable path (the gemm crate), what machines without AVX2 run.
        check(&a, &b, &moeba_kernels::cpu::matmul::matmul_portable(&a, &b).unwrap());
    }

    /// Batch dims that broadcast (size 1 against n, missing against present), with strided
    /// operands; includes the path that folds a shared `b` into one GEMM.
    #[test]
    fn batched_broadcast(m in 1usize..20, n in 1usize..20, k in 1usize..20,
                         b0 in 1usize..4, b1 in 1usize..4, mode in 0u8..4,
                         la in 0u8..4, lb in 0u8..4, f64_ in any::<bool>(), seed in 0u64..1000) {
        let dt = if f64_ { DType::F64 } else { DType::F32 };
        let (ad, bd): (Vec<usize>, Vec<usize>) = match mode {
            0 => (vec![b0, b1, m, k], vec![b1, k, n]),
            1 => (vec![b0, 1, m, k], vec![b1, k, n]),
            2 => (vec![b0, b1, m, k], vec![k, n]),
            _ => (vec![m, k], vec![b0, 1, k, n]),
        };
        let a = make(seed, &ad, dt, la);
        let b = make(seed + 7, &bd, dt, lb);
        check(&a, &b, &ops::matmul(&a, &b).unwrap());
    }

    /// The blocked f32 GEMM with tiny cache blocks: small shapes cross the MC, KC and NC loops,
    /// the accumulate-into-C path (k > KC), the column-split parallel path and the edge tiles.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn blocked_gemm_every_loop(m in 1usize..60, n in 1usize..60, k in 1usize..40,
                               mc in 1usize..20, kc in 1usize..12, nc in 1usize..40,
                               la in 0u8..4, lb in 0u8..4, seed in 0u64..1000) {
        use moeba_kernels::cpu::matmul::{avx2::Blocking, matmul_with_blocking};
        let a = make(seed, &[m, k], DType::F32, la);
        let b = make(seed + 3, &[k, n], DType::F32, lb);
        check(&a, &b, &matmul_with_blocking(&a, &b, Blocking { mc, kc, nc }).unwrap());
    }
}

/// Medium sizes: several MC row blocks, k > KC (accumulation into C across k blocks), the
/// parallel paths (work above the threshold), partial tiles at both edges.
#[test]
fn medium_sizes() {
    for (i, &(m, n, k)) in
        [(129, 67, 200), (150, 33, 300), (7, 300, 260), (300, 5, 17), (64, 64, 64), (97, 161, 513)]
            .iter()
            .enumerate()
    {
        for layout in [0u8, 1, 2] {
            let a = make(i as u64, &[m, k], DType::F32, layout);
            let b = make(i as u64 + 100, &[k, n], DType::F32, 1 - layout.min(1));
            check(&a, &b, &ops::matmul(&a, &b).unwrap());
            check(&a, &b, &moeba_kernels::cpu::matmul::matmul_portable(&a, &b).unwrap());
        }
    }
    // f64 through the gemm crate.
    let a = make(5, &[129, 200], DType::F64, 0);
    let b = make(6, &[200, 67], DType::F64, 1);
    check(&a, &b, &ops::matmul(&a, &b).unwrap());
}

/// Batched: many small matrices (one per rayon task) and a few large ones (parallel inside),
/// and an `a` whose batch dims do not merge with its rows (no folding possible).
#[test]
fn batched_paths() {
    let a = make(1, &[40, 9, 13], DType::F32, 0);
    let b = make(2, &[40, 13, 11], DType::F32, 1);
    check(&a, &b, &ops::matmul(&a, &b).unwrap());
    let a = make(3, &[2, 130, 70], DType::F32, 2);
    let b = make(4, &[2, 70, 150], DType::F32, 0);
    check(&a, &b, &ops::matmul(&a, &b).unwrap());
    // (3, m, k) from a permuted (m, 3, k) buffer, b shared: rows and batch do not merge.
    let a = Tensor::randn(5, (17, 3, 21), 0.0, 1.0, DType::F32, &CPU).unwrap().permute(&[1, 0, 2]).unwrap();
    let b = make(6, &[21, 19], DType::F32, 1);
    check(&a, &b, &ops::matmul(&a, &b).unwrap());
    // Contiguous (3, m, k) with b shared: folded into one (3m, k) GEMM.
    let a = make(7, &[3, 50, 40], DType::F32, 0);
    let b = make(8, &[40, 30], DType::F32, 0);
    check(&a, &b, &ops::matmul(&a, &b).unwrap());
    // a broadcast over the batch (stride 0) against a batched b.
    let a = make(9, &[1, 5, 8], DType::F32, 0).broadcast_as([4, 5, 8]).unwrap();
    let b = make(10, &[4, 8, 6], DType::F32, 0);
    check(&a, &b, &ops::matmul(&a, &b).unwrap());
    // A broadcast row inside the matrix (row stride 0).
    let a = make(11, &[1, 8], DType::F32, 0).broadcast_as([5, 8]).unwrap();
    let b = make(12, &[8, 20], DType::F32, 1);
    check(&a, &b, &ops::matmul(&a, &b).unwrap());
}

#[test]
fn half_types_compute_in_f32() {
    for dt in [DType::BF16, DType::F16] {
        let a = make(1, &[2, 19, 33], dt, 1);
        let b = make(2, &[33, 21], dt, 0);
        let out = ops::matmul(&a, &b).unwrap();
        assert_eq!(out.dtype(), dt);
        check(&a, &b, &out);
    }
}

#[test]
fn empty_dims() {
    for dt in [DType::F32, DType::F64] {
        for (m, k, n) in [(0, 4, 3), (3, 4, 0), (3, 0, 5), (0, 0, 0)] {
            let a = Tensor::zeros((m, k), dt, &CPU).unwrap();
            let b = Tensor::ones((k, n), dt, &CPU).unwrap();
            let out = ops::matmul(&a, &b).unwrap();
            assert_eq!(out.dims(), &[m, n]);
            assert!(out.to_vec_f64().unwrap().iter().all(|&v| v == 0.0));
        }
        let a = Tensor::ones((0, 3, 4), dt, &CPU).unwrap();
        let b = Tensor::ones((4, 2), dt, &CPU).unwrap();
        assert_eq!(ops::matmul(&a, &b).unwrap().dims(), &[0, 3, 2]);
    }
}

#[test]
fn exact_small_product() {
    let a = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (2, 3), &CPU).unwrap();
    let b = Tensor::from_vec(vec![7f32, 8., 9., 10., 11., 12.], (3, 2), &CPU).unwrap();
    let out = ops::matmul(&a, &b).unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![58., 64., 139., 154.]);
    // The same through transposed views of the transposed data.
    let at = Tensor::from_vec(vec![1f32, 4., 2., 5., 3., 6.], (3, 2), &CPU).unwrap().t().unwrap();
    let bt = Tensor::from_vec(vec![7f32, 9., 11., 8., 10., 12.], (2, 3), &CPU).unwrap().t().unwrap();
    assert_eq!(ops::matmul(&at, &bt).unwrap().to_vec::<f32>().unwrap(), vec![58., 64., 139., 154.]);
}

#[test]
fn shape_errors_name_both_shapes() {
    let a = Tensor::zeros((2, 3), DType::F32, &CPU).unwrap();
    let b = Tensor::zeros((4, 5), DType::F32, &CPU).unwrap();
    let e = ops::matmul(&a, &b).unwrap_err().to_string();
    assert!(e.contains("matmul") && e.contains("[2, 3]") && e.contains("[4, 5]"), "{e}");
    let a = Tensor::zeros((2, 2, 3), DType::F32, &CPU).unwrap();
    let b = Tensor::zeros((3, 3, 5), DType::F32, &CPU).unwrap();
    let e = ops::matmul(&a, &b).unwrap_err().to_string();
    assert!(e.contains("matmul") && e.contains("[2, 2, 3]") && e.contains("[3, 3, 5]"), "{e}");
    let v = Tensor::zeros(3, DType::F32, &CPU).unwrap();
    let e = ops::matmul(&v, &b).unwrap_err().to_string();
    assert!(e.contains("matmul") && e.contains("[3]"), "{e}");
    let i = Tensor::zeros((2, 3), DType::I64, &CPU).unwrap();
    assert!(ops::matmul(&i, &i.t().unwrap()).is_err());
    let d = Tensor::zeros((3, 5), DType::F64, &CPU).unwrap();
    let e = ops::matmul(&a, &d).unwrap_err().to_string();
    assert!(e.contains("matmul"), "{e}");
}

#[test]
fn fast_path_is_reported() {
    let p = moeba_kernels::cpu::matmul::f32_path();
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        assert!(p.contains("avx2"), "{p}");
    }
    assert!(!p.is_empty());
}
