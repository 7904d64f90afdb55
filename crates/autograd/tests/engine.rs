//! The tape and the backward pass: accumulation, broadcasting, no-grad mode, detach, custom ops
//! (multi-output, without backward), deep graphs, errors.

use moeba_autograd::{
    check_gradients, is_grad_enabled, no_grad, reduce_to_shape, with_no_grad, CustomOp, GradCheckOptions, Var,
};
use moeba_kernels::ops;
use moeba_tensor::{DType, Device, Result, Shape, Tensor};

fn t64(v: &[f64], dims: &[usize]) -> Tensor {
    Tensor::from_slice(v, dims, &Device::Cpu).unwrap()
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

fn close(a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-12 + 1e-12 * y.abs(), "{a:?} vs {b:?}");
    }
}

#[test]
fn a_var_used_twice_accumulates() -> Result<()> {
    let x = Var::param(t64(&[1.0, -2.0, 3.0], &[3]));
    // y = x·x + x + exp(x): three uses of x along different paths.
    let y = x.mul(&x)?.add(&x)?.add(&x.exp()?)?.sum_all()?;
    let g = y.backward()?;
    let want: Vec<f64> = [1.0f64, -2.0, 3.0].iter().map(|v| 2.0 * v + 1.0 + v.exp()).collect();
    close(&vals(g.get(&x).unwrap()), &want);
    // An intermediate used twice: z = (2x)·(2x), dz/dx = 8x.
    let h = x.scale(2.0)?;
    let z = h.mul(&h)?.sum_all()?;
    close(&vals(z.backward()?.get(&x).unwrap()), &[8.0, -16.0, 24.0]);
    Ok(())
}

#[test]
fn broadcast_gradients_are_summed_back_to_each_shape() -> Result<()> {
    let a = Var::param(Tensor::arange(0, 12, DType::F64, &Device::Cpu)?.reshape((3, 4))?);
    let b = Var::param(t64(&[1.0, 2.0, 3.0, 4.0], &[4]));
    let c = Var::param(t64(&[1.0, 10.0, 100.0], &[3, 1]));
    let loss = a.add(&b)?.mul(&c)?.sum_all()?;
    let g = loss.backward()?;
    let (ga, gb, gc) = (g.get(&a).unwrap(), g.get(&b).unwrap(), g.get(&c).unwrap());
    assert_eq!(ga.dims(), &[3, 4]);
    assert_eq!(gb.dims(), &[4]);
    assert_eq!(gc.dims(), &[3, 1]);
    close(&vals(ga), &[1., 1., 1., 1., 10., 10., 10., 10., 100., 100., 100., 100.]);
    close(&vals(gb), &[111.0; 4]);
    // Σ_j (a_ij + b_j) per row: row sums 6, 22, 38 plus Σ b = 10.
    close(&vals(gc), &[16.0, 32.0, 48.0]);
    Ok(())
}

#[test]
fn reduce_to_shape_sums_broadcast_dims() -> Result<()> {
    let g = Tensor::ones((2, 3, 4), DType::F64, &Device::Cpu)?;
    close(&vals(&reduce_to_shape(&g, &Shape::from([3, 1]))?), &[8.0, 8.0, 8.0]);
    close(&vals(&reduce_to_shape(&g, &Shape::from([1, 1, 4]))?), &[6.0; 4]);
    close(&vals(&reduce_to_shape(&g, &Shape::scalar())?), &[24.0]);
    assert_eq!(reduce_to_shape(&g, &Shape::from([2, 3, 4]))?.dims(), &[2, 3, 4]);
    let err = reduce_to_shape(&g, &Shape::from([2, 4])).unwrap_err().to_string();
    assert!(err.contains("reduce_to_shape") && err.contains("[2, 4]"), "{err}");
    Ok(())
}

#[test]
fn no_grad_records_nothing_and_restores_the_mode() -> Result<()> {
    let w = Var::param(t64(&[1.0, 2.0], &[2]));
    assert!(is_grad_enabled());
    {
        let _g = no_grad();
        assert!(!is_grad_enabled());
        {
            let _inner = no_grad();
        }
        assert!(!is_grad_enabled(), "an inner guard restores the outer scope's mode");
        let y = w.exp()?.sum_all()?;
        assert!(!y.requires_grad());
        assert!(y.is_leaf() && y.op_name().is_none());
        let err = y.backward().unwrap_err().to_string();
        assert!(err.contains("does not require grad"), "{err}");
        // Another thread is not affected by this thread's scope.
        let other = std::thread::spawn(is_grad_enabled).join().unwrap();
        assert!(other);
    }
    assert!(is_grad_enabled());
    let y = with_no_grad(|| w.mul(&w))?;
    assert!(!y.requires_grad());
    let y = w.mul(&w)?;
    assert!(y.requires_grad());
    assert_eq!(y.op_name(), Some("mul"));
    Ok(())
}

#[test]
fn ops_on_constants_record_nothing() -> Result<()> {
    let c = Var::constant(t64(&[1.0, 2.0], &[2]));
    let y = c.exp()?.sum_all()?;
    assert!(!y.requires_grad() && y.is_leaf());
    // Integer results are never on the tape.
    let x = Var::param(t64(&[1.5, 2.5], &[2]));
    let i = x.to_dtype(DType::U32)?;
    assert!(!i.requires_grad());
    assert!(!Var::param(Tensor::zeros(2, DType::I64, &Device::Cpu)?).requires_grad());
    Ok(())
}

#[test]
fn detach_stops_the_gradient_on_its_branch_only() -> Result<()> {
    let x = Var::param(t64(&[1.0, 2.0, 3.0], &[3]));
    let d = x.detach();
    assert!(!d.requires_grad() && d.is_leaf() && d.id() != x.id());
    assert!(d.tensor().same_storage(x.tensor()), "detach shares the value");
    // y = detach(x)·x: dy/dx = x (the detached factor is a constant).
    let y = d.mul(&x)?.sum_all()?;
    let g = y.backward()?;
    close(&vals(g.get(&x).unwrap()), &[1.0, 2.0, 3.0]);
    assert!(g.get(&d).is_none());
    Ok(())
}

#[test]
fn only_the_leaves_that_require_grad_get_gradients() -> Result<()> {
    let x = Var::param(Tensor::randn(1, (2, 3), 0.0, 1.0, DType::F64, &Device::Cpu)?);
    let w = Var::constant(Tensor::randn(2, (3, 4), 0.0, 1.0, DType::F64, &Device::Cpu)?);
    let h = x.matmul(&w)?;
    let loss = h.tanh()?.sum_all()?;
    let mut g = loss.backward()?;
    assert_eq!(g.len(), 1);
    assert!(g.get(&w).is_none() && g.get(&h).is_none(), "constants and intermediates get none");
    assert_eq!(g.iter().map(|(id, _)| id).collect::<Vec<_>>(), vec![x.id()]);
    let gx = g.remove(&x).unwrap();
    assert!(g.is_empty());
    // Gradients can be put back (after clipping, say) and taken out by value.
    assert!(g.insert(&x, gx.clone()).is_none());
    assert_eq!(g.get_id(x.id()).map(|t| t.dims().to_vec()), Some(vec![2, 3]));
    let owned: Vec<_> = g.clone().into_iter().collect();
    assert_eq!(owned.len(), 1);
    assert_eq!(owned[0].0, x.id());
    assert_eq!(gx.dims(), &[2, 3]);
    // Running backward again from the same result gives the same gradients.
    let again = loss.backward()?;
    assert_eq!(vals(again.get(&x).unwrap()), vals(&gx));
    Ok(())
}

#[test]
fn leaf_gradients_are_contiguous() -> Result<()> {
    // The gradient of a transpose / broadcast is a strided view until it is stored.
    let x = Var::param(Tensor::randn(3, (2, 3), 0.0, 1.0, DType::F64, &Device::Cpu)?);
    let b = Var::param(t64(&[2.0], &[1]));
    let y = x.t()?.mul(&b.broadcast_as((3, 2))?)?.sum_all()?;
    let g = y.backward()?;
    assert!(g.get(&x).unwrap().is_contiguous() && g.get(&b).unwrap().is_contiguous());
    close(&vals(g.get(&x).unwrap()), &[2.0; 6]);
    Ok(())
}

#[test]
fn a_leaf_loss_gets_its_seed() -> Result<()> {
    let x = Var::param(t64(&[5.0], &[]));
    close(&vals(x.backward()?.get(&x).unwrap()), &[1.0]);
    Ok(())
}

#[test]
fn backward_checks_the_loss_and_the_seed() -> Result<()> {
    let x = Var::param(t64(&[1.0, 2.0], &[2]));
    let y = x.exp()?;
    let err = y.backward().unwrap_err().to_string();
    assert!(err.contains("backward") && err.contains("[2]") && err.contains("backward_with"), "{err}");
    let err = y.backward_with(t64(&[1.0], &[1])).unwrap_err().to_string();
    assert!(err.contains("backward_with") && err.contains("[1]"), "{err}");
    let err = y.backward_with(Tensor::ones(2, DType::F32, &Device::Cpu)?).unwrap_err().to_string();
    assert!(err.contains("dtype"), "{err}");
    let g = y.backward_with(t64(&[1.0, 10.0], &[2]))?;
    close(&vals(g.get(&x).unwrap()), &[1f64.exp(), 10.0 * 2f64.exp()]);
    Ok(())
}

#[test]
fn a_ten_thousand_node_chain_neither_recurses_in_backward_nor_in_drop() {
    // A small stack: a recursive walk or a recursive drop of the chain would overflow it.
    let run = || -> Result<()> {
        let x = Var::param(t64(&[1.0, 2.0], &[2]));
        let mut y = x.clone();
        for i in 0..10_000 {
            y = if i % 2 == 0 { y.affine(1.0, 0.5)? } else { y.scale(1.0)? };
        }
        let loss = y.sum_all()?;
        let g = loss.backward()?;
        close(&vals(g.get(&x).unwrap()), &[1.0, 1.0]);
        drop(loss);
        drop(y);
        Ok(())
    };
    let handle = std::thread::Builder::new().stack_size(256 * 1024).spawn(run).unwrap();
    handle.join().expect("the deep chain overflowed the stack").unwrap();
}

// ------------------------------------------------------------------------------ custom ops

/// A forward-only fused op (its backward is left out).
struct ForwardOnly;
impl CustomOp for ForwardOnly {
    fn name(&self) -> &'static str {
        "forward_only_fused"
    }
}

/// An op that says it has no backward even though it implements one.
struct Declared;
impl CustomOp for Declared {
    fn name(&self) -> &'static str {
        "declared_no_backward"
    }
    fn has_backward(&self) -> bool {
        false
    }
    fn backward(&self, _: &[Tensor], _: &[Tensor], _: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![None])
    }
}

#[test]
fn a_custom_op_without_backward_is_an_error_naming_it() -> Result<()> {
    let x = Var::param(t64(&[1.0, 2.0], &[2]));
    let out = ops::exp(x.tensor())?;
    let y = Var::apply_custom(ForwardOnly, &[&x], vec![out.clone()]).remove(0);
    assert!(y.requires_grad());
    assert_eq!(y.op_name(), Some("forward_only_fused"));
    let loss = y.mul(&x)?.sum_all()?;
    let err = loss.backward().unwrap_err().to_string();
    assert!(err.contains("forward_only_fused") && err.contains("no backward"), "{err}");

    let z = Var::apply_custom(Declared, &[&x], vec![out.clone()]).remove(0);
    let err = z.sum_all()?.backward().unwrap_err().to_string();
    assert!(err.contains("declared_no_backward"), "{err}");

    // No error when no gradient has to pass through it.
    let c = Var::constant(x.tensor().clone());
    let y = Var::apply_custom(ForwardOnly, &[&c], vec![out.clone()]).remove(0);
    assert!(!y.requires_grad());
    let g = y.mul(&x)?.sum_all()?.backward()?;
    close(&vals(g.get(&x).unwrap()), &vals(&out));
    let y = with_no_grad(|| Var::apply_custom(ForwardOnly, &[&x], vec![out.clone()]).remove(0));
    assert!(!y.requires_grad());
    Ok(())
}

/// A scan-like op with two outputs on a 1-d input: the running sum `y` and its last value
/// (the final state).
struct CumSum;
impl CumSum {
    fn forward(x: &Var) -> Result<Vec<Var>> {
        let v = x.tensor().to_vec::<f64>()?;
        let y: Vec<f64> = v.iter().scan(0.0, |acc, &e| Some(*acc + e).inspect(|s| *acc = *s)).collect();
        let last = *y.last().unwrap_or(&0.0);
        let n = y.len();
        let outs = vec![Tensor::from_vec(y, n, x.device())?, Tensor::from_vec(vec![last], (), x.device())?];
        Ok(Var::apply_custom(CumSum, &[x], outs))
    }
}
impl CustomOp for CumSum {
    fn name(&self) -> &'static str {
        "cumsum_with_state"
    }
    fn backward(&self, inputs: &[Tensor], _: &[Tensor], g: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let n = inputs[0].elem_count();
        let mut gx = vec![0.0; n];
        if let Some(gy) = &g[0] {
            // Reverse running sum.
            let gy = gy.to_vec::<f64>()?;
            let mut acc = 0.0;
            for i in (0..n).rev() {
                acc += gy[i];
                gx[i] += acc;
            }
        }
        if let Some(gl) = &g[1] {
            let gl = gl.to_scalar::<f64>()?;
            gx.iter_mut().for_each(|e| *e += gl);
        }
        Ok(vec![Some(Tensor::from_vec(gx, n, inputs[0].device())?)])
    }
}

#[test]
fn a_multi_output_custom_op_takes_gradients_from_either_or_both_outputs() -> Result<()> {
    let x = Var::param(t64(&[1.0, 2.0, 3.0], &[3]));
    let outs = CumSum::forward(&x)?;
    assert_eq!(outs.len(), 2);
    assert_eq!(vals(outs[0].tensor()), vec![1.0, 3.0, 6.0]);
    // Through the output only: d Σy / dx_i = n - i.
    let g = outs[0].sum_all()?.backward()?;
    close(&vals(g.get(&x).unwrap()), &[3.0, 2.0, 1.0]);
    // Through the state only.
    let g = outs[1].backward()?;
    close(&vals(g.get(&x).unwrap()), &[1.0, 1.0, 1.0]);
    // Both.
    let g = outs[0].sum_all()?.add(&outs[1].scale(10.0)?)?.backward()?;
    close(&vals(g.get(&x).unwrap()), &[13.0, 12.0, 11.0]);
    // And the gradient checker agrees on random data, combining both outputs.
    let xs = Tensor::randn(7, 5, 0.0, 1.0, DType::F64, &Device::Cpu)?;
    check_gradients(
        |v| {
            let o = CumSum::forward(&v[0])?;
            o[0].tanh()?.sum_all()?.add(&o[1].sqr()?)
        },
        &[xs],
        &GradCheckOptions::default(),
    )?;
    Ok(())
}

/// Top-1 "gating": the max value (differentiable) and its index (an integer output).
struct Top1;
impl CustomOp for Top1 {
    fn name(&self) -> &'static str {
        "top1"
    }
    fn backward(
        &self,
        inputs: &[Tensor],
        outputs: &[Tensor],
        g: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(gv) = &g[0] else { return Ok(vec![None]) };
        let x = &inputs[0];
        let zeros = Tensor::zeros(x.shape(), x.dtype(), x.device())?;
        Ok(vec![Some(ops::scatter_add(&zeros, 0, &outputs[1], gv)?)])
    }
}

#[test]
fn integer_outputs_of_a_custom_op_are_constants() -> Result<()> {
    let x = Var::param(t64(&[0.5, 3.0, -1.0], &[3]));
    let idx = ops::argmax(x.tensor(), 0, true)?;
    let val = ops::gather(x.tensor(), 0, &idx)?;
    let outs = Var::apply_custom(Top1, &[&x], vec![val, idx]);
    assert!(outs[0].requires_grad() && !outs[1].requires_grad());
    assert_eq!(outs[1].dtype(), DType::U32);
    let g = outs[0].scale(2.0)?.sum_all()?.backward()?;
    close(&vals(g.get(&x).unwrap()), &[0.0, 2.0, 0.0]);
    Ok(())
}

/// A buggy op whose backward returns the wrong shape.
struct WrongShape;
impl CustomOp for WrongShape {
    fn name(&self) -> &'static str {
        "wrong_shape"
    }
    fn backward(&self, _: &[Tensor], _: &[Tensor], _: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(Tensor::zeros(5, DType::F64, &Device::Cpu)?)])
    }
}

/// A buggy op whose backward returns too few gradients.
struct TooFew;
impl CustomOp for TooFew {
    fn name(&self) -> &'static str {
        "too_few"
    }
    fn backward(&self, _: &[Tensor], _: &[Tensor], _: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![])
    }
}

#[test]
fn a_custom_backward_that_breaks_the_contract_is_an_error_naming_the_op() -> Result<()> {
    let x = Var::param(t64(&[1.0, 2.0], &[2]));
    let y = Var::apply_custom(WrongShape, &[&x], vec![x.tensor().clone()]).remove(0);
    let err = y.sum_all()?.backward().unwrap_err().to_string();
    assert!(err.contains("wrong_shape") && err.contains("input 0"), "{err}");
    let y = Var::apply_custom(TooFew, &[&x], vec![x.tensor().clone()]).remove(0);
    let err = y.sum_all()?.backward().unwrap_err().to_string();
    assert!(err.contains("too_few") && err.contains("0 gradients for 1 inputs"), "{err}");
    Ok(())
}

#[test]
fn custom_ops_may_be_passed_boxed_or_shared() -> Result<()> {
    let x = Var::param(t64(&[1.0, 2.0], &[2]));
    let boxed: Box<dyn CustomOp> = Box::new(ForwardOnly);
    let y = Var::apply_custom(boxed, &[&x], vec![x.tensor().clone()]).remove(0);
    assert_eq!(y.op_name(), Some("forward_only_fused"));
    let shared = std::sync::Arc::new(CumSum);
    let outs = Var::apply_custom(shared, &[&x], vec![x.tensor().clone(), x.tensor().narrow(0, 1, 1)?]);
    assert_eq!(outs[1].op_name(), Some("cumsum_with_state"));
    Ok(())
}

#[test]
fn vars_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Var>();
    check::<moeba_autograd::Grads>();
}

#[test]
fn empty_dims_flow_through_backward() -> Result<()> {
    let empty = |dims: &[usize]| Tensor::zeros(dims, DType::F64, &Device::Cpu).unwrap();
    let opts = GradCheckOptions::default();
    // Every case must run its backward without error and give gradients of the input shapes.
    type Build = Box<dyn Fn(&[Var]) -> Result<Var>>;
    let cases: Vec<(Vec<Tensor>, Build)> = vec![
        (vec![empty(&[0, 3])], Box::new(|v| v[0].exp()?.sum(&[0], false))),
        (vec![empty(&[2, 0]), empty(&[0, 3])], Box::new(|v| v[0].matmul(&v[1]))),
        (vec![empty(&[0, 4])], Box::new(|v| v[0].softmax(1))),
        (
            vec![empty(&[2, 0]), Tensor::ones((2, 3), DType::F64, &Device::Cpu)?],
            Box::new(|v| Var::concat(&[&v[0], &v[1]], 1)),
        ),
        (vec![empty(&[3, 0])], Box::new(|v| v[0].t()?.reshape((2, 0, 3))?.sum_all())),
    ];
    for (i, (inputs, f)) in cases.iter().enumerate() {
        check_gradients(f, inputs, &opts).unwrap_or_else(|e| panic!("case {i}: {e}"));
        let vars: Vec<Var> = inputs.iter().cloned().map(Var::param).collect();
        let out = f(&vars)?;
        let g = out.backward_with(Tensor::ones(out.shape(), DType::F64, &Device::Cpu)?)?;
        for v in &vars {
            if let Some(gv) = g.get(v) {
                assert_eq!(gv.shape(), v.shape(), "case {i}");
            }
        }
    }
    Ok(())
}

#[test]
fn half_precision_gradients_keep_their_dtype() -> Result<()> {
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let x = Var::param(Tensor::from_vec(vec![1.0f64, -2.0, 0.5], 3, &Device::Cpu)?.to_dtype(dtype)?);
        let w = Var::param(Tensor::from_vec(vec![3.0f64], 1, &Device::Cpu)?.to_dtype(dtype)?);
        let loss = x.mul(&x)?.mul(&w)?.sum_all()?;
        let g = loss.backward()?;
        let (gx, gw) = (g.get(&x).unwrap(), g.get(&w).unwrap());
        assert_eq!((gx.dtype(), gw.dtype()), (dtype, dtype));
        assert_eq!(vals(gx), vec![6.0, -12.0, 3.0], "{dtype}");
        assert_eq!(vals(gw), vec![5.25], "{dtype}");
    }
    Ok(())
}

#[test]
fn conventions_at_ties_and_kinks() -> Result<()> {
    // max / min over dims: split evenly among the tied elements.
    let x = Var::param(t64(&[1.0, 3.0, 3.0, 2.0, 0.0, 0.0], &[2, 3]));
    close(&vals(x.max(&[1], false)?.sum_all()?.backward()?.get(&x).unwrap()), &[0., 0.5, 0.5, 1., 0., 0.]);
    close(&vals(x.min(&[1], true)?.sum_all()?.backward()?.get(&x).unwrap()), &[1., 0., 0., 0., 0.5, 0.5]);
    // maximum / minimum: half to each operand on a tie.
    let (a, b) = (Var::param(t64(&[1.0, 2.0, 5.0], &[3])), Var::param(t64(&[1.0, 3.0, 4.0], &[3])));
    let g = a.maximum(&b)?.sum_all()?.backward()?;
    close(&vals(g.get(&a).unwrap()), &[0.5, 0.0, 1.0]);
    close(&vals(g.get(&b).unwrap()), &[0.5, 1.0, 0.0]);
    let g = a.minimum(&b)?.sum_all()?.backward()?;
    close(&vals(g.get(&a).unwrap()), &[0.5, 1.0, 0.0]);
    close(&vals(g.get(&b).unwrap()), &[0.5, 0.0, 1.0]);
    // clamp passes the gradient on the closed interval [lo, hi] (as torch does).
    let x = Var::param(t64(&[-1.0, 0.0, 0.5, 1.0, 2.0], &[5]));
    close(&vals(x.clamp(0.0, 1.0)?.sum_all()?.backward()?.get(&x).unwrap()), &[0., 1., 1., 1., 0.]);
    let g = x.clamp(f64::NEG_INFINITY, 0.5)?.sum_all()?.backward()?;
    close(&vals(g.get(&x).unwrap()), &[1., 1., 1., 0., 0.]);
    // relu'(0) = 0, abs'(0) = 0 (the kernels' conventions).
    let z = Var::param(t64(&[-1.0, 0.0, 2.0], &[3]));
    close(&vals(z.relu()?.sum_all()?.backward()?.get(&z).unwrap()), &[0., 0., 1.]);
    close(&vals(z.abs()?.sum_all()?.backward()?.get(&z).unwrap()), &[-1., 0., 1.]);
    Ok(())
}
