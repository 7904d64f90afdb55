//! Activation checkpointing: gradients with `checkpoint` equal those without (bit for bit), on
//! random shapes and layouts, in f64 and f32; multiple outputs, by-products, call counts, nesting,
//! no-grad mode, integer outputs, numerical gradient checks and errors.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use moeba_autograd::{check_gradients, checkpoint, no_grad, GradCheckOptions, Grads, Var};
use moeba_kernels::ops;
use moeba_tensor::{DType, Device, Result, Tensor};
use proptest::prelude::*;

const DEV: Device = Device::Cpu;

fn randn(seed: u64, dims: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(seed, dims, 0.0, 0.7, dtype, &DEV).unwrap()
}

/// The parameters of a two-layer residual MLP `y = x + silu(x w1 + b1) w2`.
#[derive(Clone)]
struct Mlp {
    w1: Var,
    b1: Var,
    w2: Var,
}

impl Mlp {
    /// `d → h → d`; with `transposed`, the weights are transposed views.
    fn new(seed: u64, d: usize, h: usize, dtype: DType, transposed: bool) -> Mlp {
        let (w1, w2) = if transposed {
            (randn(seed, &[h, d], dtype).t().unwrap(), randn(seed + 1, &[d, h], dtype).t().unwrap())
        } else {
            (randn(seed, &[d, h], dtype), randn(seed + 1, &[h, d], dtype))
        };
        Mlp { w1: Var::param(w1), b1: Var::param(randn(seed + 2, &[h], dtype)), w2: Var::param(w2) }
    }

    fn params(&self) -> Vec<Var> {
        vec![self.w1.clone(), self.b1.clone(), self.w2.clone()]
    }

    fn forward(&self, x: &Var) -> Result<Var> {
        let h = x.matmul(&self.w1)?.add(&self.b1)?.silu()?.matmul(&self.w2)?;
        x.add(&h)
    }
}

/// The input `x` of shape `[b, d]` in one of four layouts.
fn input(seed: u64, b: usize, d: usize, dtype: DType, layout: usize) -> Tensor {
    match layout {
        0 => randn(seed, &[b, d], dtype),
        1 => randn(seed, &[d, b], dtype).t().unwrap(),
        2 => randn(seed, &[b + 2, d + 1], dtype).narrow(0, 1, b).unwrap().narrow(1, 1, d).unwrap(),
        _ => randn(seed, &[1, d], dtype).broadcast_as([b, d]).unwrap(),
    }
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_vec_f64().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Asserts that `a` and `b` hold bit-equal gradients for every Var of `vars`.
fn assert_same_grads(a: &Grads, b: &Grads, vars: &[&Var]) {
    for (i, v) in vars.iter().enumerate() {
        match (a.get(v), b.get(v)) {
            (Some(ga), Some(gb)) => {
                assert_eq!(ga.dims(), gb.dims(), "var {i}");
                assert_eq!(ga.dtype(), gb.dtype(), "var {i}");
                assert_eq!(bits(ga), bits(gb), "var {i}: {:?} vs {:?}", ga.to_vec_f64(), gb.to_vec_f64());
            }
            (None, None) => {}
            (ga, gb) => panic!("var {i}: gradient {ga:?} vs {gb:?}"),
        }
    }
}

/// Loss `Σ y ⊙ c` with a fixed random `c`.
fn loss(y: &Var, seed: u64) -> Result<Var> {
    let c = Var::constant(Tensor::randn(seed, y.shape(), 0.0, 1.0, y.dtype(), y.device())?);
    y.mul(&c)?.sum_all()
}

fn mlp_case(dtype: DType, b: usize, d: usize, h: usize, layout: usize, seed: u64) -> Result<()> {
    let mlp = Mlp::new(seed, d, h, dtype, layout == 1);
    let x = Var::param(input(seed + 10, b, d, dtype, layout));

    let plain = loss(&mlp.forward(&x)?, seed + 20)?.backward()?;

    let m = mlp.clone();
    let (ys, ()) = checkpoint(&[&x], &mlp.params(), move |xs| Ok((vec![m.forward(&xs[0])?], ())))?;
    assert_eq!(ys.len(), 1);
    assert_eq!(ys[0].op_name(), Some("checkpoint"));
    assert_eq!(ys[0].dims(), &[b, d]);
    let ckpt = loss(&ys[0], seed + 20)?.backward()?;

    assert_same_grads(&plain, &ckpt, &[&x, &mlp.w1, &mlp.b1, &mlp.w2]);
    assert!(ckpt.get(&x).is_some() && ckpt.get(&mlp.w1).is_some());
    assert_eq!(ckpt.len(), 4);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn checkpointed_mlp_grads_are_bit_equal_f64(
        b in 0usize..6, d in 1usize..11, h in 1usize..11, layout in 0usize..4, seed in 0u64..1000,
    ) {
        mlp_case(DType::F64, b, d, h, layout, seed).unwrap();
    }

    #[test]
    fn checkpointed_mlp_grads_are_bit_equal_f32(
        b in 0usize..6, d in 1usize..11, h in 1usize..11, layout in 0usize..4, seed in 0u64..1000,
    ) {
        mlp_case(DType::F32, b, d, h, layout, seed).unwrap();
    }
}

#[test]
fn larger_mlp_not_a_multiple_of_eight() -> Result<()> {
    mlp_case(DType::F32, 13, 19, 37, 0, 7)?;
    mlp_case(DType::F64, 9, 17, 33, 2, 8)
}

/// Three outputs: `silu(x w1)`, `x w2ᵀ`-like and `exp(x)`; the loss uses a chosen subset.
fn multi_outputs(mlp: &Mlp, x: &Var) -> Result<Vec<Var>> {
    let a = x.matmul(&mlp.w1)?.add(&mlp.b1)?.silu()?;
    let b = a.matmul(&mlp.w2)?;
    let c = x.exp()?;
    Ok(vec![a, b, c])
}

#[test]
fn multiple_outputs_where_only_some_get_gradients() -> Result<()> {
    for dtype in [DType::F64, DType::F32] {
        // Each subset of the outputs used by the loss: one (the single-root path) or several.
        for used in [vec![0], vec![1], vec![2], vec![0, 2], vec![1, 2], vec![0, 1, 2]] {
            let mlp = Mlp::new(3, 5, 7, dtype, false);
            let x = Var::param(randn(4, &[3, 5], dtype));
            let total = |outs: &[Var]| -> Result<Var> {
                let mut acc: Option<Var> = None;
                for &i in &used {
                    let l = loss(&outs[i], 40 + i as u64)?;
                    acc = Some(match acc {
                        Some(a) => a.add(&l)?,
                        None => l,
                    });
                }
                Ok(acc.unwrap())
            };
            let plain = total(&multi_outputs(&mlp, &x)?)?.backward()?;
            let m = mlp.clone();
            let (outs, ()) =
                checkpoint(&[&x], &mlp.params(), move |xs| Ok((multi_outputs(&m, &xs[0])?, ())))?;
            assert_eq!(outs.len(), 3);
            assert!(outs.iter().all(Var::requires_grad));
            let ckpt = total(&outs)?.backward()?;
            assert_same_grads(&plain, &ckpt, &[&x, &mlp.w1, &mlp.b1, &mlp.w2]);
            // Only output 2 (exp x) used: the weights get no gradient at all.
            if used == [2] {
                assert!(ckpt.get(&mlp.w1).is_none() && ckpt.get(&mlp.w2).is_none());
                assert!(ckpt.get(&x).is_some());
            }
        }
    }
    Ok(())
}

#[test]
fn by_product_is_the_first_calls_and_f_runs_twice_per_backward() -> Result<()> {
    let calls = Arc::new(AtomicUsize::new(0));
    let mlp = Mlp::new(5, 4, 6, DType::F64, false);
    let x = Var::param(randn(6, &[2, 4], DType::F64));
    let (m, c) = (mlp.clone(), calls.clone());
    let (ys, first) = checkpoint(&[&x], &mlp.params(), move |xs| {
        let call = c.fetch_add(1, Ordering::SeqCst);
        Ok((vec![m.forward(&xs[0])?], call))
    })?;
    assert_eq!(first, 0, "the by-product of the forward call is returned");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let l = loss(&ys[0], 1)?;
    let g1 = l.backward()?;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one recompute per backward");
    // The tape is not consumed: a second backward recomputes again, with the same result.
    let g2 = l.backward()?;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_same_grads(&g1, &g2, &[&x, &mlp.w1, &mlp.b1, &mlp.w2]);
    Ok(())
}

#[test]
fn nested_checkpoints() -> Result<()> {
    for dtype in [DType::F64, DType::F32] {
        let inner_calls = Arc::new(AtomicUsize::new(0));
        let outer_calls = Arc::new(AtomicUsize::new(0));
        let l1 = Mlp::new(11, 5, 8, dtype, false);
        let l2 = Mlp::new(12, 5, 3, dtype, true);
        let x = Var::param(randn(13, &[4, 5], dtype));

        let plain = loss(&l2.forward(&l1.forward(&x)?)?, 2)?.backward()?;

        let mut all_params = l1.params();
        all_params.extend(l2.params());
        let (a, b, ic, oc) = (l1.clone(), l2.clone(), inner_calls.clone(), outer_calls.clone());
        let (ys, ()) = checkpoint(&[&x], &all_params, move |xs| {
            oc.fetch_add(1, Ordering::SeqCst);
            let (a, ic) = (a.clone(), ic.clone());
            let (hs, ()) = checkpoint(&[&xs[0]], &a.params(), move |xs| {
                ic.fetch_add(1, Ordering::SeqCst);
                Ok((vec![a.forward(&xs[0])?], ()))
            })?;
            Ok((vec![b.forward(&hs[0])?], ()))
        })?;
        assert_eq!((outer_calls.load(Ordering::SeqCst), inner_calls.load(Ordering::SeqCst)), (1, 1));
        let ckpt = loss(&ys[0], 2)?.backward()?;
        // Outer: forward + recompute. Inner: the outer forward (grad off: a plain call), the outer
        // recompute (records the inner node) and the inner node's own recompute.
        assert_eq!((outer_calls.load(Ordering::SeqCst), inner_calls.load(Ordering::SeqCst)), (2, 3));
        assert_same_grads(&plain, &ckpt, &[&x, &l1.w1, &l1.b1, &l1.w2, &l2.w1, &l2.b1, &l2.w2]);
        assert_eq!(ckpt.len(), 7);
    }
    Ok(())
}

#[test]
fn a_chain_of_checkpointed_blocks() -> Result<()> {
    // The way a model uses it: one checkpoint per block, the output of one the input of the next.
    let blocks: Vec<Mlp> = (0..4).map(|i| Mlp::new(100 + 3 * i, 6, 9, DType::F32, i % 2 == 1)).collect();
    let x = Var::param(randn(1, &[5, 6], DType::F32));
    let mut h = x.clone();
    for blk in &blocks {
        h = blk.forward(&h)?;
    }
    let plain = loss(&h, 9)?.backward()?;
    let mut h = x.clone();
    for blk in &blocks {
        let m = blk.clone();
        h = checkpoint(&[&h], &blk.params(), move |xs| Ok((vec![m.forward(&xs[0])?], ())))?.0.remove(0);
    }
    let ckpt = loss(&h, 9)?.backward()?;
    let mut vars = vec![&x];
    for blk in &blocks {
        vars.extend([&blk.w1, &blk.b1, &blk.w2]);
    }
    assert_same_grads(&plain, &ckpt, &vars);
    assert_eq!(ckpt.len(), 13);
    Ok(())
}

#[test]
fn under_no_grad_f_runs_once_and_returns_plain_vars() -> Result<()> {
    let calls = Arc::new(AtomicUsize::new(0));
    let mlp = Mlp::new(21, 3, 4, DType::F64, false);
    let x = Var::param(randn(22, &[2, 3], DType::F64));
    let want = {
        let _g = no_grad();
        mlp.forward(&x)?
    };
    let (m, c) = (mlp.clone(), calls.clone());
    let (ys, n) = {
        let _g = no_grad();
        checkpoint(&[&x], &mlp.params(), move |xs| {
            assert!(xs[0].requires_grad(), "the inputs are passed as they are");
            Ok((vec![m.forward(&xs[0])?], c.fetch_add(1, Ordering::SeqCst)))
        })?
    };
    assert_eq!((n, calls.load(Ordering::SeqCst)), (0, 1));
    assert!(!ys[0].requires_grad() && ys[0].is_leaf() && ys[0].op_name().is_none());
    assert_eq!(bits(ys[0].tensor()), bits(want.tensor()));

    // Grad on, but nothing requires grad (constant input, frozen params): also a plain call.
    let frozen = Mlp { w1: mlp.w1.detach(), b1: mlp.b1.detach(), w2: mlp.w2.detach() };
    let (m, c) = (frozen.clone(), calls.clone());
    let (ys, n) = checkpoint(&[&x.detach()], &frozen.params(), move |xs| {
        Ok((vec![m.forward(&xs[0])?], c.fetch_add(1, Ordering::SeqCst)))
    })?;
    assert_eq!((n, calls.load(Ordering::SeqCst)), (1, 2));
    assert!(!ys[0].requires_grad() && ys[0].op_name().is_none());
    assert_eq!(bits(ys[0].tensor()), bits(want.tensor()));
    Ok(())
}

#[test]
fn backward_inside_a_no_grad_scope_still_recomputes_with_recording() -> Result<()> {
    let mlp = Mlp::new(31, 4, 5, DType::F64, false);
    let x = Var::param(randn(32, &[3, 4], DType::F64));
    let plain = loss(&mlp.forward(&x)?, 3)?.backward()?;
    let m = mlp.clone();
    let (ys, ()) = checkpoint(&[&x], &mlp.params(), move |xs| Ok((vec![m.forward(&xs[0])?], ())))?;
    let l = loss(&ys[0], 3)?;
    let ckpt = {
        let _g = no_grad();
        let g = l.backward()?;
        assert!(!moeba_autograd::is_grad_enabled(), "the mode is restored after the recompute");
        g
    };
    assert_same_grads(&plain, &ckpt, &[&x, &mlp.w1, &mlp.b1, &mlp.w2]);
    Ok(())
}

#[test]
fn integer_and_constant_outputs() -> Result<()> {
    let mlp = Mlp::new(41, 4, 6, DType::F64, false);
    let x = Var::param(randn(42, &[3, 4], DType::F64));
    let k = Tensor::ones(&[3, 4][..], DType::F64, &DEV)?;
    let f = {
        let (m, k) = (mlp.clone(), k.clone());
        move |xs: &[Var]| -> Result<(Vec<Var>, ())> {
            let y = m.forward(&xs[0])?;
            let idx = Var::constant(ops::argmax(y.tensor(), 1, false)?);
            // A float output that depends on nothing differentiable, and a param returned as is.
            Ok((vec![y, idx, Var::constant(k.clone()), m.b1.clone()], ()))
        }
    };
    let (outs, ()) = checkpoint(&[&x], &mlp.params(), f)?;
    let y_plain = mlp.forward(&x)?;
    assert_eq!(outs[1].dtype(), DType::U32);
    assert!(!outs[1].requires_grad() && outs[1].op_name().is_none(), "integer outputs are constants");
    assert_eq!(outs[1].tensor().to_vec::<u32>()?, ops::argmax(y_plain.tensor(), 1, false)?.to_vec::<u32>()?);
    assert_eq!(bits(outs[2].tensor()), bits(&k));

    // Gradient through y, the constant output and the param output.
    let total = loss(&outs[0], 5)?.add(&loss(&outs[2], 6)?)?.add(&loss(&outs[3], 7)?)?;
    let ckpt = total.backward()?;
    let plain = loss(&y_plain, 5)?.add(&loss(&mlp.b1, 7)?)?.backward()?;
    assert_same_grads(&plain, &ckpt, &[&x, &mlp.w1, &mlp.w2]);
    let (gp, gc) = (plain.get(&mlp.b1).unwrap().to_vec_f64()?, ckpt.get(&mlp.b1).unwrap().to_vec_f64()?);
    for (a, b) in gp.iter().zip(&gc) {
        assert!((a - b).abs() <= 1e-12 * (1.0 + a.abs()), "{gp:?} vs {gc:?}");
    }
    Ok(())
}

#[test]
fn check_gradients_agrees() -> Result<()> {
    let x = randn(51, &[3, 4], DType::F64);
    let w1 = randn(52, &[4, 5], DType::F64);
    let b1 = randn(53, &[5], DType::F64);
    let w2 = randn(54, &[5, 4], DType::F64);
    let report = check_gradients(
        |v| {
            let m = Mlp { w1: v[1].clone(), b1: v[2].clone(), w2: v[3].clone() };
            let (mut ys, ()) = checkpoint(&[&v[0]], &m.params(), {
                let m = m.clone();
                move |xs| Ok((vec![m.forward(&xs[0])?.tanh()?], ()))
            })?;
            Ok(ys.remove(0))
        },
        &[x, w1, b1, w2],
        &GradCheckOptions::default(),
    )?;
    assert!(report.inputs.iter().all(|r| r.had_gradient), "{report:?}");
    assert!(report.max_abs_err() < 1e-6, "{report:?}");
    Ok(())
}

#[test]
fn a_param_missing_from_params_is_an_error_not_a_lost_gradient() -> Result<()> {
    let mlp = Mlp::new(61, 3, 4, DType::F64, false);
    let x = Var::param(randn(62, &[2, 3], DType::F64));
    let m = mlp.clone();
    let listed = vec![mlp.w1.clone(), mlp.b1.clone()]; // w2 forgotten
    let (ys, ()) = checkpoint(&[&x], &listed, move |xs| Ok((vec![m.forward(&xs[0])?], ())))?;
    let err = loss(&ys[0], 1)?.backward().unwrap_err().to_string();
    assert!(err.contains("checkpoint") && err.contains("params") && err.contains("[4, 3]"), "{err}");
    Ok(())
}

#[test]
fn a_param_that_is_not_a_leaf_is_an_error() -> Result<()> {
    let w = Var::param(randn(71, &[3, 3], DType::F64));
    let w2 = w.scale(2.0)?;
    let x = Var::param(randn(72, &[2, 3], DType::F64));
    let c = w2.clone();
    let err = checkpoint(&[&x], &[w2], move |xs| Ok((vec![xs[0].matmul(&c)?], ())))
        .expect_err("a non-leaf param is refused")
        .to_string();
    assert!(err.contains("checkpoint") && err.contains("params[0]"), "{err}");
    Ok(())
}

#[test]
fn a_non_deterministic_f_is_an_error() -> Result<()> {
    let calls = Arc::new(AtomicUsize::new(0));
    let x = Var::param(randn(81, &[4, 3], DType::F64));
    let c = calls.clone();
    let (ys, ()) = checkpoint(&[&x], &[], move |xs| {
        let n = 4 - c.fetch_add(1, Ordering::SeqCst).min(1);
        Ok((vec![xs[0].narrow(0, 0, n)?], ()))
    })?;
    let err = loss(&ys[0], 1)?.backward().unwrap_err().to_string();
    assert!(err.contains("checkpoint") && err.contains("deterministic"), "{err}");
    Ok(())
}

#[test]
fn errors_of_f_are_returned() {
    let x = Var::param(randn(91, &[2, 3], DType::F64));
    let w = Var::param(randn(92, &[4, 4], DType::F64));
    let c = w.clone();
    let err = checkpoint(&[&x], &[w], move |xs| Ok((vec![xs[0].matmul(&c)?], ())))
        .expect_err("a shape error from f")
        .to_string();
    assert!(err.contains("matmul"), "{err}");
}
