//! The gradient checker itself: it passes correct backwards, and it catches wrong ones, stopped
//! gradients and ops without a backward, saying where.

use moeba_autograd::{check_gradients, CustomOp, GradCheckOptions, Var};
use moeba_kernels::ops;
use moeba_tensor::{DType, Device, Result, Tensor};

/// `y = x³` with a backward that is off by a factor (3x² would be right; this says 2x²).
struct BadCube;
impl CustomOp for BadCube {
    fn name(&self) -> &'static str {
        "bad_cube"
    }
    fn backward(&self, inputs: &[Tensor], _: &[Tensor], g: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let Some(g) = &g[0] else { return Ok(vec![None]) };
        let d = ops::affine(&ops::unary(&inputs[0], ops::UnaryOp::Sqr)?, 2.0, 0.0)?;
        Ok(vec![Some(ops::mul(g, &d)?)])
    }
}

fn bad_cube(x: &Var) -> Result<Var> {
    let y = ops::powf(x.tensor(), 3.0)?;
    Ok(Var::apply_custom(BadCube, &[x], vec![y]).remove(0))
}

fn randn(seed: u64, dims: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(seed, dims, 0.0, 1.0, dtype, &Device::Cpu).unwrap()
}

#[test]
fn a_correct_backward_passes_with_a_small_error_report() -> Result<()> {
    // f32 inputs are checked in f64.
    let (a, b) = (randn(1, &[3, 4], DType::F32), randn(2, &[4], DType::F32));
    let report =
        check_gradients(|v| v[0].mul(&v[1])?.softmax(1)?.log(), &[a, b], &GradCheckOptions::default())?;
    assert_eq!(report.inputs.len(), 2);
    assert_eq!(report.inputs[1].shape.dims(), &[4]);
    assert!(report.inputs.iter().all(|r| r.had_gradient));
    assert!(report.max_abs_err() < 1e-7, "{report:?}");
    assert!(report.max_rel_err().is_finite());
    Ok(())
}

#[test]
fn a_wrong_backward_is_reported_with_the_worst_element() {
    let x = randn(3, &[2, 3], DType::F64);
    let err = check_gradients(|v| bad_cube(&v[1]), &[x.clone(), x], &GradCheckOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("input 1") && err.contains("analytic") && err.contains("numeric"), "{err}");
    assert!(err.contains("shape [2, 3]"), "{err}");
}

#[test]
fn a_stopped_gradient_fails_the_check() {
    // The second factor is detached: its gradient is silently missing.
    let x = randn(4, &[3], DType::F64);
    let err = check_gradients(|v| v[0].mul(&v[0].detach()), &[x], &GradCheckOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("input 0"), "{err}");
    let y = randn(5, &[3], DType::F64);
    let err = check_gradients(
        |v| Ok(v[0].detach().exp()?.add(&v[0])?.detach()),
        &[y],
        &GradCheckOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("NO gradient"), "{err}");
}

struct NoBackward;
impl CustomOp for NoBackward {
    fn name(&self) -> &'static str {
        "fused_without_backward"
    }
}

#[test]
fn an_op_without_backward_fails_the_check_by_name() {
    let x = randn(6, &[3], DType::F64);
    let err = check_gradients(
        |v| {
            let y = ops::exp(v[0].tensor())?;
            Ok(Var::apply_custom(NoBackward, &[&v[0]], vec![y]).remove(0))
        },
        &[x],
        &GradCheckOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("fused_without_backward"), "{err}");
}

#[test]
fn integer_inputs_are_rejected_with_a_hint() {
    let ids = Tensor::zeros(3, DType::U32, &Device::Cpu).unwrap();
    let err =
        check_gradients(|v| Ok(v[0].clone()), &[ids], &GradCheckOptions::default()).unwrap_err().to_string();
    assert!(err.contains("check_gradients") && err.contains("u32") && err.contains("HINT"), "{err}");
}

#[test]
fn options_can_be_loosened() -> Result<()> {
    let o = GradCheckOptions::default().with_eps(1e-3).with_tolerances(1e-2, 1e-2);
    assert_eq!((o.eps, o.atol, o.rtol), (1e-3, 1e-2, 1e-2));
    check_gradients(|v| v[0].sqr()?.sum_all(), &[randn(7, &[4], DType::F64)], &o)?;
    Ok(())
}
