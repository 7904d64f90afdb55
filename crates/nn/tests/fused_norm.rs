//! The fused RMSNorm (`rms_norm`, one CPU kernel forward and backward) against the composite
//! reference (`rms_norm_composite`, six differentiable ops) on random shapes: widths that are not
//! multiples of 8, size-1 and empty dims, f32 and f64, contiguous, transposed, narrowed and
//! broadcast inputs; plus a finite-difference gradient check of the fused node.

use moeba_autograd::{check_gradients, GradCheckOptions, Var};
use moeba_nn::{rms_norm, rms_norm_composite};
use moeba_tensor::{DType, Device, Tensor};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

/// `(rows, d)` logical shape as layout `view`: 0 contiguous, 1 a transposed view, 2 narrowed
/// from a larger tensor, 3 a row broadcast to every row.
fn make(seed: u64, rows: usize, d: usize, dt: DType, view: u8) -> Tensor {
    let t = match view {
        1 => Tensor::randn(seed, (d, rows), 0.0, 1.0, dt, &CPU).unwrap().t().unwrap(),
        2 => Tensor::randn(seed, (rows + 2, d + 3), 0.0, 1.0, dt, &CPU)
            .unwrap()
            .narrow(0, 1, rows)
            .unwrap()
            .narrow(1, 2, d)
            .unwrap(),
        3 => Tensor::randn(seed, (1, d), 0.0, 1.0, dt, &CPU).unwrap().broadcast_as((rows, d)).unwrap(),
        _ => Tensor::randn(seed, (rows, d), 0.0, 1.0, dt, &CPU).unwrap(),
    };
    assert_eq!(t.dims(), [rows, d]);
    t
}

fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}");
    for (i, (g, w)) in got.to_vec_f64().unwrap().iter().zip(want.to_vec_f64().unwrap()).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}: element {i}: got {g}, want {w}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn fused_rms_norm_matches_composite(
        b in 0usize..4, l in 1usize..7, d in 1usize..41, view in 0u8..4,
        f64_ in any::<bool>(), seed in 0u64..1000, eps in prop::sample::select(vec![1e-6, 1e-5, 0.5]),
    ) {
        let dt = if f64_ { DType::F64 } else { DType::F32 };
        let tol = if f64_ { 1e-12 } else { 2e-5 };
        let rows = b * l;
        let x = make(seed, rows, d, dt, view).reshape((b, l, d)).unwrap();
        let w = Tensor::randn(seed + 1, d, 1.0, 0.5, dt, &CPU).unwrap();
        let gy = Tensor::randn(seed + 2, (b, l, d), 0.0, 1.0, dt, &CPU).unwrap();

        let (xf, wf) = (Var::param(x.clone()), Var::param(w.clone()));
        let yf = rms_norm(&xf, &wf, eps).unwrap();
        let (xr, wr) = (Var::param(x), Var::param(w));
        let yr = rms_norm_composite(&xr, &wr, eps).unwrap();
        assert_close(yf.tensor(), yr.tensor(), tol, "forward");
        if b > 0 {
            prop_assert_eq!(yf.op_name(), Some("rms_norm"));
            let gf = yf.backward_with(gy.clone()).unwrap();
            let gr = yr.backward_with(gy).unwrap();
            assert_close(gf.get(&xf).unwrap(), gr.get(&xr).unwrap(), tol * 4.0, "grad x");
            assert_close(gf.get(&wf).unwrap(), gr.get(&wr).unwrap(), tol * 4.0 * (rows as f64).sqrt(), "grad w");
        }
    }
}

#[test]
fn fused_rms_norm_gradient_check() {
    for (shape, d) in [((3usize, 5usize), 5usize), ((2, 1), 1), ((1, 13), 13)] {
        let x = Tensor::randn(1, shape, 0.0, 1.0, DType::F64, &CPU).unwrap();
        let w = Tensor::randn(2, d, 1.0, 0.3, DType::F64, &CPU).unwrap();
        check_gradients(|v: &[Var]| rms_norm(&v[0], &v[1], 1e-5), &[x, w], &GradCheckOptions::default())
            .unwrap();
    }
}

#[test]
fn non_fusable_inputs_fall_back_to_the_composite_form() {
    // A weight that broadcasts from (1, d) is not the fused kernel's (d): same result, composite tape.
    let x = Var::param(Tensor::randn(3, (4, 6), 0.0, 1.0, DType::F32, &CPU).unwrap());
    let w = Var::param(Tensor::randn(4, (1, 6), 1.0, 0.1, DType::F32, &CPU).unwrap());
    let y = rms_norm(&x, &w, 1e-5).unwrap();
    assert_eq!(y.op_name(), Some("mul"));
    let want = rms_norm_composite(&x, &w, 1e-5).unwrap();
    assert_close(y.tensor(), want.tensor(), 0.0, "fallback");
    // bf16 runs the composite path too.
    let xb = Var::param(x.tensor().to_dtype(DType::BF16).unwrap());
    let wb = Var::param(Tensor::ones(6, DType::BF16, &CPU).unwrap());
    assert_eq!(rms_norm(&xb, &wb, 1e-5).unwrap().op_name(), Some("mul"));
}
