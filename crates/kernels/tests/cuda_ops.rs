//! Every CUDA op against the CPU implementation, on random inputs: contiguous tensors and
//! strided views (transposed, narrowed, permuted, broadcast), sizes that are not multiples of 8,
//! size-1 and empty dims, in f32, f64, bf16 and f16.
//!
//! Without a GPU (or without the driver library) each test prints
//! `skipping: no CUDA device (...)` and returns. Outputs are poisoned (NaN bytes) before every
//! launch in these debug builds, so an element a kernel fails to write shows up as a mismatch.
#![cfg(feature = "cuda")]

use moeba_kernels::ops::{self, BinaryOp, ReduceOp, UnaryOp};
use moeba_tensor::{DType, Device, Error, Tensor};
use proptest::prelude::*;

/// CUDA device 0, or `None` after printing why the test is skipped.
fn gpu() -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("skipping: no CUDA device ({e})");
            None
        }
    }
}

const FLOATS: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];

/// Relative/absolute tolerance of a dtype (bf16/f16 results are rounded once, f32 may differ in
/// summation order and in the last bits of transcendental functions).
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 2e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1.6e-2,
        _ => 0.0,
    }
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert!(got.device().is_cuda(), "{what}: result not on the GPU");
    let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let ok = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol * (1.0 + b.abs());
        assert!(ok, "{what}: element {i}: cuda {a} vs cpu {b} (tol {tol})");
    }
}

/// A random tensor on the CPU in `[lo, hi)`.
fn rand(seed: u64, dims: &[usize], lo: f64, hi: f64, dtype: DType) -> Tensor {
    Tensor::rand(seed, dims.to_vec(), lo, hi, dtype, &Device::Cpu).unwrap()
}

/// The same tensor (same layout, same values) on `dev`: uploaded, then the same view rebuilt.
fn on(dev: &Device, base: &Tensor, view: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
    let cpu = view(base);
    let gpu = view(&base.to_device(dev).unwrap());
    assert_eq!(cpu.layout(), gpu.layout());
    (cpu, gpu)
}

/// A named way of viewing a tensor.
type View = Box<dyn Fn(&Tensor) -> Tensor>;

/// Views worth testing for a rank-2 base of shape (r, c): as is, transposed, narrowed (offset,
/// gaps), and a column broadcast.
fn views_2d() -> Vec<(&'static str, View)> {
    vec![
        ("contiguous", Box::new(|t: &Tensor| t.clone())),
        ("transposed", Box::new(|t: &Tensor| t.t().unwrap())),
        ("narrowed", Box::new(|t: &Tensor| t.narrow(1, 1, t.dims()[1] - 2).unwrap())),
        (
            "broadcast",
            Box::new(|t: &Tensor| t.narrow(0, 0, 1).unwrap().broadcast_as((3, t.dims()[1])).unwrap()),
        ),
    ]
}

#[test]
fn device_errors_are_errors_not_panics() {
    // Runs everywhere: an absurd ordinal is an error whether or not a driver is present.
    let err = Device::cuda(10_000).unwrap_err();
    assert!(matches!(err, Error::Cuda(_)), "{err}");
    let Some(_) = gpu() else { return };
}

#[test]
fn upload_download_and_full() {
    let Some(dev) = gpu() else { return };
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16, DType::I64, DType::U32] {
        let cpu = Tensor::arange(0, 37, dtype, &Device::Cpu).unwrap();
        let g = cpu.to_device(&dev).unwrap();
        assert_eq!(g.to_vec_f64().unwrap(), cpu.to_vec_f64().unwrap(), "{dtype}");
        // A strided view downloads through its layout.
        let m = Tensor::arange(0, 12, dtype, &dev).unwrap().reshape((3, 4)).unwrap().t().unwrap();
        let want = Tensor::arange(0, 12, dtype, &Device::Cpu).unwrap().reshape((3, 4)).unwrap().t().unwrap();
        assert_eq!(m.to_vec_f64().unwrap(), want.to_vec_f64().unwrap(), "{dtype} transposed");
        for v in [0.0, 1.0, 2.5, -3.0] {
            let f = Tensor::full(v, (5, 3), dtype, &dev).unwrap();
            let w = Tensor::full(v, (5, 3), dtype, &Device::Cpu).unwrap();
            assert_eq!(f.to_vec_f64().unwrap(), w.to_vec_f64().unwrap(), "full {v} {dtype}");
        }
        assert_eq!(Tensor::zeros((0, 4), dtype, &dev).unwrap().elem_count(), 0);
    }
}

#[test]
fn unary_all_ops() {
    let Some(dev) = gpu() else { return };
    for (i, dtype) in FLOATS.into_iter().enumerate() {
        for op in UnaryOp::ALL {
            // log/sqrt/recip want positive inputs; the others see both signs.
            let (lo, hi) = match op {
                UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Recip => (0.1, 3.0),
                _ => (-4.0, 4.0),
            };
            for dims in [[5usize, 19], [33, 130], [1, 7]] {
                let base = rand(100 + i as u64, &dims, lo, hi, dtype);
                for (vname, view) in views_2d() {
                    if vname == "narrowed" && dims[1] < 3 {
                        continue;
                    }
                    let (c, g) = on(&dev, &base, &view);
                    let want = ops::unary(&c, op).unwrap();
                    let got = ops::unary(&g, op).unwrap();
                    assert_close(&format!("{} {dtype} {dims:?} {vname}", op.name()), &got, &want, tol(dtype));
                }
            }
        }
    }
}

#[test]
fn unary_backward_all_ops() {
    let Some(dev) = gpu() else { return };
    for (i, dtype) in FLOATS.into_iter().enumerate() {
        for op in UnaryOp::ALL {
            let (lo, hi) = match op {
                UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Recip => (0.1, 3.0),
                _ => (-4.0, 4.0),
            };
            let x = rand(200 + i as u64, &[27, 45], lo, hi, dtype);
            let dy = rand(300 + i as u64, &[45, 27], -1.0, 1.0, dtype);
            let (xc, xg) = on(&dev, &x, |t| t.clone());
            // dy transposed: the two inputs have different layouts.
            let (dc, dg) = on(&dev, &dy, |t| t.t().unwrap());
            let want = ops::unary_backward(&xc, &dc, op).unwrap();
            let got = ops::unary_backward(&xg, &dg, op).unwrap();
            assert_close(&format!("{}' {dtype}", op.name()), &got, &want, 2.0 * tol(dtype));
        }
    }
}

#[test]
fn affine_powf_clamp() {
    let Some(dev) = gpu() else { return };
    for (i, dtype) in FLOATS.into_iter().enumerate() {
        for dims in [[3usize, 1001], [16, 16], [0, 5]] {
            let base = rand(400 + i as u64, &dims, 0.05, 3.0, dtype);
            for (vname, view) in views_2d() {
                if dims[1] < 3 && vname == "narrowed" || dims[0] == 0 && vname == "broadcast" {
                    continue;
                }
                let (c, g) = on(&dev, &base, &view);
                let what = format!("{dtype} {dims:?} {vname}");
                let t = tol(dtype);
                assert_close(
                    &format!("affine {what}"),
                    &ops::affine(&g, 1.5, -0.25).unwrap(),
                    &ops::affine(&c, 1.5, -0.25).unwrap(),
                    t,
                );
                assert_close(
                    &format!("powf {what}"),
                    &ops::powf(&g, 2.5).unwrap(),
                    &ops::powf(&c, 2.5).unwrap(),
                    t,
                );
                assert_close(
                    &format!("powf int {what}"),
                    &ops::powf(&g, 3.0).unwrap(),
                    &ops::powf(&c, 3.0).unwrap(),
                    t,
                );
                assert_close(
                    &format!("clamp {what}"),
                    &ops::clamp(&g, 0.5, 1.75).unwrap(),
                    &ops::clamp(&c, 0.5, 1.75).unwrap(),
                    t,
                );
            }
        }
    }
}

#[test]
fn binary_broadcasting() {
    let Some(dev) = gpu() else { return };
    let shapes: [(&[usize], &[usize]); 7] = [
        (&[7, 13], &[7, 13]),
        (&[4, 1, 9], &[5, 1]),
        (&[3, 5, 8], &[8]),
        (&[1], &[6, 2]),
        (&[], &[3, 3]),
        (&[2, 0, 3], &[1, 3]),
        (&[1025, 3], &[1025, 1]),
    ];
    for (i, dtype) in FLOATS.into_iter().enumerate() {
        for (sa, sb) in shapes {
            let a = rand(500 + i as u64, sa, -2.0, 2.0, dtype);
            // b kept away from 0 for div.
            let b = rand(600 + i as u64, sb, 0.5, 2.5, dtype);
            let (ac, ag) = on(&dev, &a, |t| t.clone());
            let (bc, bg) = on(&dev, &b, |t| t.clone());
            for op in BinaryOp::ALL {
                let want = ops::binary(&ac, &bc, op).unwrap();
                let got = ops::binary(&ag, &bg, op).unwrap();
                assert_close(&format!("{} {dtype} {sa:?} {sb:?}", op.name()), &got, &want, tol(dtype));
                let want = ops::binary(&bc, &ac, op).unwrap();
                let got = ops::binary(&bg, &ag, op).unwrap();
                assert_close(&format!("{} {dtype} {sb:?} {sa:?}", op.name()), &got, &want, tol(dtype));
            }
        }
        // Strided operands: a transposed against a narrowed view.
        let a = rand(700, &[9, 6], -2.0, 2.0, dtype);
        let b = rand(701, &[6, 12], 0.5, 2.5, dtype);
        let (ac, ag) = on(&dev, &a, |t| t.t().unwrap());
        let (bc, bg) = on(&dev, &b, |t| t.narrow(1, 2, 9).unwrap());
        for op in BinaryOp::ALL {
            let want = ops::binary(&ac, &bc, op).unwrap();
            assert_close(
                &format!("{} {dtype} strided", op.name()),
                &ops::binary(&ag, &bg, op).unwrap(),
                &want,
                tol(dtype),
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn binary_random_broadcast(
        dims in proptest::collection::vec(1usize..6, 1..4),
        mask in proptest::collection::vec(any::<bool>(), 4),
        seed in 0u64..1000,
    ) {
        let Some(dev) = gpu() else { return Ok(()) };
        // b: dims with some set to 1 (broadcast), a: dims.
        let bd: Vec<usize> = dims.iter().zip(&mask).map(|(&d, &m)| if m { 1 } else { d }).collect();
        let a = rand(seed, &dims, -2.0, 2.0, DType::F32);
        let b = rand(seed + 1, &bd, 0.5, 2.0, DType::F32);
        let (ac, ag) = on(&dev, &a, |t| t.clone());
        let (bc, bg) = on(&dev, &b, |t| t.clone());
        for op in BinaryOp::ALL {
            let want = ops::binary(&ac, &bc, op).unwrap();
            assert_close(&format!("{} {dims:?} {bd:?}", op.name()), &ops::binary(&ag, &bg, op).unwrap(), &want, tol(DType::F32));
        }
    }
}

#[test]
fn reductions() {
    let Some(dev) = gpu() else { return };
    let cases: [(&[usize], &[usize]); 9] = [
        (&[6, 37], &[1]),
        (&[6, 37], &[0]),
        (&[2048, 5], &[0]),
        (&[3, 5000], &[1]),
        (&[4, 3, 5], &[0, 2]),
        (&[4, 3, 5], &[0, 1, 2]),
        (&[4, 3, 5], &[]),
        (&[2, 0, 3], &[1]),
        (&[2, 0, 3], &[0]),
    ];
    for (i, dtype) in FLOATS.into_iter().enumerate() {
        for (dims, red) in cases {
            let base = rand(800 + i as u64, dims, -3.0, 3.0, dtype);
            let views: [(&str, View); 2] = [
                ("contiguous", Box::new(|t: &Tensor| t.clone())),
                (
                    "permuted",
                    Box::new(|t: &Tensor| {
                        let perm: Vec<usize> = (0..t.rank()).rev().collect();
                        // Reverse the dims, then reverse again through a view: same logical tensor,
                        // reversed strides.
                        t.permute(&perm).unwrap().contiguous().unwrap().permute(&perm).unwrap()
                    }),
                ),
            ];
            for (vname, view) in views {
                let (c, g) = on(&dev, &base, view);
                for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
                    for keepdim in [false, true] {
                        let want = ops::reduce(&c, red, keepdim, op).unwrap();
                        let got = ops::reduce(&g, red, keepdim, op).unwrap();
                        let n: usize = red.iter().map(|&d| dims[d]).product();
                        let t = tol(dtype) * (1.0 + (n as f64).sqrt());
                        assert_close(
                            &format!("{} {dtype} {dims:?} {red:?} {keepdim} {vname}", op.name()),
                            &got,
                            &want,
                            t,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn argmax_matches_cpu() {
    let Some(dev) = gpu() else { return };
    for (i, dtype) in FLOATS.into_iter().enumerate() {
        for (dims, dim) in [(&[7usize, 33][..], 1usize), (&[7, 33], 0), (&[3, 3000], 1), (&[2, 3, 4], 1)] {
            // Clamped: most values sit at the bounds, so ties occur and the first index must win.
            let base = rand(900 + i as u64, dims, -3.0, 3.0, dtype);
            let base = ops::clamp(&base, -1.0, 1.0).unwrap();
            for (vname, view) in [("contiguous", false), ("transposed", true)] {
                let (c, g) =
                    on(&dev, &base, |t| if view && t.rank() == 2 { t.t().unwrap() } else { t.clone() });
                let dim = dim.min(c.rank() - 1);
                for keepdim in [false, true] {
                    let want = ops::argmax(&c, dim, keepdim).unwrap();
                    let got = ops::argmax(&g, dim, keepdim).unwrap();
                    assert_eq!(got.dtype(), DType::U32);
                    assert_eq!(got.dims(), want.dims());
                    assert_eq!(
                        got.to_vec::<u32>().unwrap(),
                        want.to_vec::<u32>().unwrap(),
                        "argmax {dtype} {dims:?} dim {dim} {vname}"
                    );
                }
            }
        }
    }
}

#[test]
fn softmax_and_log_softmax() {
    let Some(dev) = gpu() else { return };
    for (i, dtype) in FLOATS.into_iter().enumerate() {
        for (dims, dim) in [
            (&[5usize, 37][..], 1usize),
            (&[5, 37], 0),
            (&[3, 2000], 1),
            (&[2, 3, 4], 1),
            (&[4, 1], 1),
            (&[0, 3], 1),
        ] {
            let base = rand(1000 + i as u64, dims, -6.0, 6.0, dtype);
            for transposed in [false, true] {
                let (c, g) = on(&dev, &base, |t| {
                    if transposed {
                        t.transpose(0, t.rank() - 1).unwrap()
                    } else {
                        t.clone()
                    }
                });
                let what = format!("{dtype} {dims:?} dim {dim} transposed {transposed}");
                assert_close(
                    &format!("softmax {what}"),
                    &ops::softmax(&g, dim).unwrap(),
                    &ops::softmax(&c, dim).unwrap(),
                    tol(dtype),
                );
                assert_close(
                    &format!("log_softmax {what}"),
                    &ops::log_softmax(&g, dim).unwrap(),
                    &ops::log_softmax(&c, dim).unwrap(),
                    tol(dtype) * 4.0,
                );
            }
        }
    }
}

#[test]
fn softmax_handles_minus_infinity() {
    let Some(dev) = gpu() else { return };
    let x =
        Tensor::from_vec(vec![f32::NEG_INFINITY, 0.0, 1.0, f32::NEG_INFINITY], (1, 4), &Device::Cpu).unwrap();
    let got = ops::softmax(&x.to_device(&dev).unwrap(), 1).unwrap();
    assert_close("softmax -inf", &got, &ops::softmax(&x, 1).unwrap(), 1e-6);
}

#[test]
fn contiguous_and_casts() {
    let Some(dev) = gpu() else { return };
    let all = [DType::F32, DType::F64, DType::BF16, DType::F16, DType::I64, DType::U32];
    for (i, &src) in all.iter().enumerate() {
        // Integer-valued inputs within every dtype's exact range, plus fractions for floats.
        let lo = if src == DType::U32 { 0.0 } else { -100.0 };
        let base = rand(1100 + i as u64, &[13, 21], lo, 100.0, src);
        for (vname, view) in views_2d() {
            let (c, g) = on(&dev, &base, &view);
            let got = ops::contiguous(&g).unwrap();
            assert!(got.is_contiguous());
            assert_eq!(got.to_vec_f64().unwrap(), c.to_vec_f64().unwrap(), "contiguous {src} {vname}");
            for &dst in &all {
                let want = ops::to_dtype(&c, dst).unwrap();
                let got = ops::to_dtype(&g, dst).unwrap();
                // f64 -> bf16 may round a tie differently (half truncates before rounding): 1 ulp.
                let t = if dst.is_float() && src == DType::F64 { tol(dst) } else { 0.0 };
                assert_close(&format!("cast {src} -> {dst} {vname}"), &got, &want, t);
            }
        }
    }
    // Out-of-range and NaN float -> int conversions saturate / give 0, as on the CPU.
    let x = Tensor::from_vec(vec![f32::NAN, -5.0, 1e20, -1e20, 3.7, -3.7], 6, &Device::Cpu).unwrap();
    let g = x.to_device(&dev).unwrap();
    for dst in [DType::I64, DType::U32] {
        assert_eq!(
            ops::to_dtype(&g, dst).unwrap().to_vec_f64().unwrap(),
            ops::to_dtype(&x, dst).unwrap().to_vec_f64().unwrap(),
            "saturating cast to {dst}"
        );
    }
}

#[test]
fn matmul_cublas() {
    let Some(dev) = gpu() else { return };
    let cases: [(&[usize], &[usize]); 7] = [
        (&[5, 7], &[7, 3]),
        (&[1, 33], &[33, 1]),
        (&[4, 17, 9], &[4, 9, 6]),
        (&[2, 3, 5, 4], &[4, 6]),
        (&[3, 1, 5, 4], &[2, 4, 6]),
        (&[0, 4], &[4, 3]),
        (&[3, 0], &[0, 5]),
    ];
    for (i, dtype) in FLOATS.into_iter().enumerate() {
        for (sa, sb) in cases {
            let a = rand(1200 + i as u64, sa, -1.0, 1.0, dtype);
            let b = rand(1300 + i as u64, sb, -1.0, 1.0, dtype);
            let (ac, ag) = on(&dev, &a, |t| t.clone());
            let (bc, bg) = on(&dev, &b, |t| t.clone());
            let k = sa[sa.len() - 1] as f64;
            let t = tol(dtype) * (1.0 + k.sqrt()) * 4.0;
            assert_close(
                &format!("matmul {dtype} {sa:?} {sb:?}"),
                &ops::matmul(&ag, &bg).unwrap(),
                &ops::matmul(&ac, &bc).unwrap(),
                t,
            );
        }
        // Transposed operands (read through their strides) and a narrowed one, and a permuted
        // (neither stride 1) one that is copied first.
        let a = rand(1400, &[9, 6], -1.0, 1.0, dtype);
        let b = rand(1401, &[11, 9], -1.0, 1.0, dtype);
        let (ac, ag) = on(&dev, &a, |t| t.t().unwrap());
        let (bc, bg) = on(&dev, &b, |t| t.t().unwrap().narrow(1, 1, 8).unwrap());
        let t = tol(dtype) * 16.0;
        assert_close(
            &format!("matmul {dtype} transposed"),
            &ops::matmul(&ag, &bg).unwrap(),
            &ops::matmul(&ac, &bc).unwrap(),
            t,
        );
        let c3 = rand(1402, &[5, 4, 3], -1.0, 1.0, dtype);
        let d3 = rand(1403, &[3, 5, 2], -1.0, 1.0, dtype);
        let (cc, cg) = on(&dev, &c3, |t| t.permute(&[1, 0, 2]).unwrap().narrow(2, 0, 3).unwrap());
        let (dc, dg) = on(&dev, &d3, |t| t.permute(&[1, 0, 2]).unwrap());
        assert_close(
            &format!("matmul {dtype} permuted"),
            &ops::matmul(&cg, &dg).unwrap(),
            &ops::matmul(&cc, &dc).unwrap(),
            t,
        );
    }
}

#[test]
fn concat_on_gpu() {
    let Some(dev) = gpu() else { return };
    for dtype in [DType::F32, DType::BF16, DType::F64, DType::U32] {
        let a = rand(1500, &[3, 4, 5], 0.0, 9.0, dtype);
        let b = rand(1501, &[3, 2, 5], 0.0, 9.0, dtype);
        let e = rand(1502, &[3, 0, 5], 0.0, 9.0, dtype);
        let (ac, ag) = on(&dev, &a, |t| t.clone());
        let (bc, bg) = on(&dev, &b, |t| t.clone());
        let (ec, eg) = on(&dev, &e, |t| t.clone());
        let want = ops::concat(&[&ac, &bc, &ec], 1).unwrap();
        let got = ops::concat(&[&ag, &bg, &eg], 1).unwrap();
        assert_close(&format!("concat {dtype}"), &got, &want, 0.0);
        // Strided inputs along dim 0.
        let (tc, tg) = on(&dev, &a, |t| t.transpose(0, 2).unwrap());
        let want = ops::concat(&[&tc, &tc], 0).unwrap();
        assert_close(
            &format!("concat {dtype} transposed"),
            &ops::concat(&[&tg, &tg], 0).unwrap(),
            &want,
            0.0,
        );
    }
}

#[test]
fn where_cond_and_masked_fill() {
    let Some(dev) = gpu() else { return };
    // cond of several dtypes (with exact zeros), values of several dtypes, broadcasting.
    for (i, cdt) in [DType::F32, DType::U32, DType::I64, DType::BF16].into_iter().enumerate() {
        let cond = rand(1600 + i as u64, &[4, 1, 6], 0.0, 2.0, cdt);
        let cond = if cdt.is_float() { ops::affine(&cond, 1.0, -1.0).unwrap() } else { cond };
        let cond = if cdt.is_float() { ops::clamp(&cond, 0.0, 1.0).unwrap() } else { cond };
        for vdt in [DType::F32, DType::F64, DType::BF16, DType::U32] {
            let a = rand(1700, &[5, 6], 0.0, 50.0, vdt);
            let b = rand(1701, &[4, 5, 1], 0.0, 50.0, vdt);
            let (cc, cg) = on(&dev, &cond, |t| t.clone());
            let (ac, ag) = on(&dev, &a, |t| t.clone());
            let (bc, bg) = on(&dev, &b, |t| t.clone());
            let want = ops::where_cond(&cc, &ac, &bc).unwrap();
            let got = ops::where_cond(&cg, &ag, &bg).unwrap();
            assert_close(&format!("where_cond {cdt} {vdt}"), &got, &want, 0.0);
            // A transposed value operand.
            let (tc, tg) = on(&dev, &rand(1702, &[6, 5], 0.0, 50.0, vdt), |t| t.t().unwrap());
            let want = ops::where_cond(&cc, &tc, &bc).unwrap();
            assert_close(
                &format!("where_cond {cdt} {vdt} transposed"),
                &ops::where_cond(&cg, &tg, &bg).unwrap(),
                &want,
                0.0,
            );
        }
    }
    let x = rand(1800, &[3, 7], -1.0, 1.0, DType::F32);
    let mask = rand(1801, &[1, 7], 0.0, 2.0, DType::U32);
    let (xc, xg) = on(&dev, &x, |t| t.clone());
    let (mc, mg) = on(&dev, &mask, |t| t.clone());
    let want = ops::masked_fill(&xc, &mc, f64::NEG_INFINITY).unwrap();
    assert_close("masked_fill", &ops::masked_fill(&xg, &mg, f64::NEG_INFINITY).unwrap(), &want, 0.0);
}

#[test]
fn kernels_load_for_this_gpu() {
    let Some(dev) = gpu() else { return };
    let Device::Cuda(d) = &dev else { unreachable!() };
    let k = moeba_kernels::cuda::runtime::kernels(d).unwrap();
    let v = k.binary_version("unary_f32").unwrap();
    let cc = d.compute_capability().unwrap();
    println!("{}: compute capability {cc:?}, kernels run code for {v}", d.name().unwrap());
    assert!(v >= 80, "binary version {v}");
}

#[test]
fn ops_not_on_cuda_yet_say_so() {
    let Some(dev) = gpu() else { return };
    let x = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
    let ids = Tensor::zeros(2, DType::U32, &dev).unwrap();
    let err = ops::index_select(&x, 0, &ids).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { op: "index_select", .. }) && err.to_string().contains("CUDA"),
        "{err}"
    );
}
