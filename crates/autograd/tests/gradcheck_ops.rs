//! Every built-in differentiable op, gradient-checked on random shapes.
//!
//! `check_op` matches on [`OpKind`] exhaustively, so an op added to the enum without a case here
//! does not compile; the property test walks [`DIFFERENTIABLE_OPS`] and checks each entry: the
//! case must record a node of that op (so it exercises what it claims to), its f64 backward must
//! match central differences, and its f32 backward must agree with the f64 one.

use moeba_autograd::{check_gradients, GradCheckOptions, OpKind, Var, DIFFERENTIABLE_OPS};
use moeba_kernels::ops::{BinaryOp, UnaryOp};
use moeba_tensor::{DType, Device, Error, Result, Rng, Tensor};
use proptest::prelude::*;

/// One random draw: a main shape (rank 1..=3, dims 1..=4), four extra sizes (1..=4) for the
/// ops that need more (matmul's m, k, n; counts of indices), and a seed for values and choices.
#[derive(Debug, Clone)]
struct Draw {
    dims: Vec<usize>,
    extra: [usize; 4],
    seed: u64,
}

fn draws() -> impl Strategy<Value = Draw> {
    (prop::collection::vec(1usize..5, 1..=3), prop::array::uniform4(1usize..5), any::<u64>())
        .prop_map(|(dims, extra, seed)| Draw { dims, extra, seed })
}

fn randn(seed: u64, dims: &[usize]) -> Result<Tensor> {
    Tensor::randn(seed, dims, 0.0, 1.0, DType::F64, &Device::Cpu)
}

fn rand(seed: u64, dims: &[usize], lo: f64, hi: f64) -> Result<Tensor> {
    Tensor::rand(seed, dims, lo, hi, DType::F64, &Device::Cpu)
}

/// Random indices in `0..bound` of `dims`, as u32 or i64 (picked at random).
fn indices(rng: &mut Rng, dims: &[usize], bound: usize) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<i64> = (0..n).map(|_| rng.below(bound as u64) as i64).collect();
    let t = Tensor::from_vec(v, dims, &Device::Cpu)?;
    if rng.below(2) == 0 {
        t.to_dtype(DType::U32)
    } else {
        Ok(t)
    }
}

/// A random 0/1 mask of `dims`, as u32 or f64.
fn mask(rng: &mut Rng, dims: &[usize]) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<u32> = (0..n).map(|_| rng.below(2) as u32).collect();
    let t = Tensor::from_vec(v, dims, &Device::Cpu)?;
    if rng.below(2) == 0 {
        t.to_dtype(DType::F64)
    } else {
        Ok(t)
    }
}

/// A shape that broadcasts to `dims`: some dims set to 1, or a suffix (possibly rank 0).
fn broadcastable(rng: &mut Rng, dims: &[usize]) -> Vec<usize> {
    match rng.below(3) {
        0 => dims.to_vec(),
        1 => dims.iter().map(|&n| if rng.below(2) == 0 { 1 } else { n }).collect(),
        _ => dims[rng.below(dims.len() as u64 + 1) as usize..].to_vec(),
    }
}

fn permutation(rng: &mut Rng, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i as u64 + 1) as usize);
    }
    p
}

/// Checks `f` at `inputs` for `op`: the output's node is `op`; f64 analytic = numeric; f32
/// analytic ≈ f64 analytic.
fn run<F>(op: OpKind, inputs: Vec<Tensor>, opts: GradCheckOptions, f: F) -> Result<()>
where
    F: Fn(&[Var]) -> Result<Var>,
{
    let grads_in = |dtype: DType| -> Result<(Option<&'static str>, Vec<Vec<f64>>)> {
        let vars: Vec<Var> =
            inputs.iter().map(|t| Ok(Var::param(t.to_dtype(dtype)?))).collect::<Result<_>>()?;
        let out = f(&vars)?;
        let cot = Tensor::randn(opts.seed, out.shape(), 0.0, 1.0, out.dtype(), out.device())?;
        let grads = out.backward_with(cot)?;
        let g = vars
            .iter()
            .map(|v| match grads.get(v) {
                Some(g) => g.to_vec_f64(),
                None => Ok(vec![0.0; v.elem_count()]),
            })
            .collect::<Result<_>>()?;
        Ok((out.op_name(), g))
    };
    let (name, g64) = grads_in(DType::F64)?;
    if name != Some(op.name()) {
        return Err(Error::Msg(format!("the case for {} recorded {name:?} last", op.name())));
    }
    check_gradients(&f, &inputs, &opts)?;
    let (_, g32) = grads_in(DType::F32)?;
    for (i, (a, b)) in g64.iter().zip(&g32).enumerate() {
        for (j, (x, y)) in a.iter().zip(b).enumerate() {
            if (x - y).abs() > 1e-3 + 1e-3 * x.abs() {
                return Err(Error::Msg(format!("f32 gradient of input {i} at {j}: {y} vs f64 {x}")));
            }
        }
    }
    Ok(())
}

/// The gradient check of `op` on draw `d`.
fn check_op(op: OpKind, d: &Draw) -> Result<()> {
    let s = d.dims.clone();
    let r = s.len();
    let [e0, e1, e2, e3] = d.extra;
    let mut rng = Rng::new(d.seed);
    let seed = d.seed;
    let opts = GradCheckOptions::default();
    match op {
        OpKind::Binary(b) => {
            let (mut sa, mut sb) = (s.clone(), broadcastable(&mut rng, &s));
            if rng.below(2) == 0 {
                std::mem::swap(&mut sa, &mut sb);
            }
            let a = randn(seed, &sa)?;
            let bt = match b {
                // Keep the divisor away from zero.
                BinaryOp::Div => with_random_signs(rand(seed ^ 1, &sb, 0.5, 2.0)?, &mut rng)?,
                _ => randn(seed ^ 1, &sb)?,
            };
            run(op, vec![a, bt], opts, move |v| v[0].binary(&v[1], b))
        }
        OpKind::Unary(u) => {
            let x = match u {
                UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Recip => rand(seed, &s, 0.5, 2.0)?,
                _ => randn(seed, &s)?,
            };
            if r >= 2 && rng.below(2) == 0 {
                // Through a transposed (non-contiguous) view.
                let x = x.transpose(0, r - 1)?.contiguous()?;
                run(op, vec![x], opts, move |v| v[0].transpose(0, r - 1)?.unary(u))
            } else {
                run(op, vec![x], opts, move |v| v[0].unary(u))
            }
        }
        OpKind::Affine => {
            let (m, a) = (rng.uniform() * 4.0 - 2.0, rng.uniform() - 0.5);
            run(op, vec![randn(seed, &s)?], opts, move |v| v[0].affine(m, a))
        }
        OpKind::Powf => {
            let e = [2.0, 3.0, 0.5, -1.5, 2.7][rng.below(5) as usize];
            run(op, vec![rand(seed, &s, 0.5, 2.0)?], opts, move |v| v[0].powf(e))
        }
        OpKind::Clamp => run(op, vec![randn(seed, &s)?], opts, |v| v[0].clamp(-0.5, 0.6)),
        OpKind::ToDType => {
            // Through f32 and back: a step large against f32 rounding.
            let opts = opts.with_eps(1e-2).with_tolerances(1e-4, 1e-3);
            run(op, vec![randn(seed, &s)?], opts, |v| v[0].to_dtype(DType::F32)?.to_dtype(DType::F64))
        }
        OpKind::Sum | OpKind::Mean | OpKind::Max | OpKind::Min => {
            let dims: Vec<usize> = (0..r).filter(|_| rng.below(2) == 0).collect();
            let keepdim = rng.below(2) == 0;
            run(op, vec![randn(seed, &s)?], opts, move |v| match op {
                OpKind::Sum => v[0].sum(&dims, keepdim),
                OpKind::Mean => v[0].mean(&dims, keepdim),
                OpKind::Max => v[0].max(&dims, keepdim),
                _ => v[0].min(&dims, keepdim),
            })
        }
        OpKind::SumAll => run(op, vec![randn(seed, &s)?], opts, |v| v[0].sum_all()),
        OpKind::Softmax | OpKind::LogSoftmax => {
            let dim = rng.below(r as u64) as usize;
            let x = randn(seed, &s)?;
            if op == OpKind::Softmax {
                run(op, vec![x], opts, move |v| v[0].softmax(dim))
            } else {
                run(op, vec![x], opts, move |v| v[0].log_softmax(dim))
            }
        }
        OpKind::Matmul => {
            let (m, k, n, batch) = (e0, e1, e2, s[0]);
            let (sa, sb): (Vec<usize>, Vec<usize>) = match rng.below(4) {
                0 => (vec![m, k], vec![k, n]),
                1 => (vec![batch, m, k], vec![k, n]),
                2 => (vec![batch, m, k], vec![batch, k, n]),
                _ => (vec![1, m, k], vec![e3, batch, k, n]),
            };
            let a = randn(seed, &sa)?;
            if rng.below(2) == 0 {
                // b through a transposed view.
                let bt = randn(seed ^ 1, &sb)?.t()?.contiguous()?;
                run(op, vec![a, bt], opts, |v| v[0].matmul(&v[1].t()?))
            } else {
                run(op, vec![a, randn(seed ^ 1, &sb)?], opts, |v| v[0].matmul(&v[1]))
            }
        }
        OpKind::Reshape => {
            let n: usize = s.iter().product();
            match rng.below(3) {
                0 => run(op, vec![randn(seed, &s)?], opts, move |v| v[0].reshape(n)),
                1 => {
                    let rev: Vec<usize> = s.iter().rev().copied().collect();
                    run(op, vec![randn(seed, &s)?], opts, move |v| v[0].reshape(rev.clone()))
                }
                // A non-contiguous input: reshape copies.
                _ => run(op, vec![randn(seed, &s)?], opts, move |v| v[0].transpose(0, r - 1)?.reshape(n)),
            }
        }
        OpKind::Transpose => {
            let (i, j) = (rng.below(r as u64) as usize, rng.below(r as u64) as usize);
            run(op, vec![randn(seed, &s)?], opts, move |v| v[0].transpose(i, j))
        }
        OpKind::Permute => {
            let p = permutation(&mut rng, r);
            run(op, vec![randn(seed, &s)?], opts, move |v| v[0].permute(&p))
        }
        OpKind::Narrow => {
            let dim = rng.below(r as u64) as usize;
            let start = rng.below(s[dim] as u64) as usize;
            let len = rng.below((s[dim] - start) as u64 + 1) as usize;
            run(op, vec![randn(seed, &s)?], opts, move |v| v[0].narrow(dim, start, len))
        }
        OpKind::BroadcastAs => {
            let small: Vec<usize> = s.iter().map(|&n| if rng.below(2) == 0 { 1 } else { n }).collect();
            let big: Vec<usize> = std::iter::once(e0).chain(s.iter().copied()).collect();
            run(op, vec![randn(seed, &small)?], opts, move |v| v[0].broadcast_as(big.clone()))
        }
        OpKind::Unsqueeze => {
            let dim = rng.below(r as u64 + 1) as usize;
            run(op, vec![randn(seed, &s)?], opts, move |v| v[0].unsqueeze(dim))
        }
        OpKind::Squeeze => {
            let dim = rng.below(r as u64 + 1) as usize;
            let mut sx = s.clone();
            sx.insert(dim, 1);
            run(op, vec![randn(seed, &sx)?], opts, move |v| v[0].squeeze(dim))
        }
        OpKind::Contiguous => {
            if r >= 2 {
                run(op, vec![randn(seed, &s)?], opts, move |v| v[0].transpose(0, r - 1)?.contiguous())
            } else {
                let n = s[0];
                run(op, vec![randn(seed, &[1])?], opts, move |v| v[0].broadcast_as(n)?.contiguous())
            }
        }
        OpKind::Concat => {
            let dim = rng.below(r as u64) as usize;
            let count = 2 + rng.below(2) as usize;
            let inputs = (0..count)
                .map(|i| {
                    let mut si = s.clone();
                    si[dim] = rng.below(4) as usize;
                    randn(seed ^ i as u64, &si)
                })
                .collect::<Result<Vec<_>>>()?;
            run(op, inputs, opts, move |v| Var::concat(&v.iter().collect::<Vec<_>>(), dim))
        }
        OpKind::Stack => {
            let dim = rng.below(r as u64 + 1) as usize;
            let count = 1 + rng.below(3) as usize;
            let inputs = (0..count).map(|i| randn(seed ^ i as u64, &s)).collect::<Result<Vec<_>>>()?;
            run(op, inputs, opts, move |v| Var::stack(&v.iter().collect::<Vec<_>>(), dim))
        }
        OpKind::IndexSelect => {
            let dim = rng.below(r as u64) as usize;
            let ids = indices(&mut rng, &[e0], s[dim])?;
            run(op, vec![randn(seed, &s)?], opts, move |v| v[0].index_select(dim, &ids))
        }
        OpKind::Embedding => {
            let (vocab, width) = (e0 + 1, e1);
            let ids = indices(&mut rng, &s, vocab)?;
            run(op, vec![randn(seed, &[vocab, width])?], opts, move |v| v[0].embedding(&ids))
        }
        OpKind::Gather | OpKind::ScatterAdd => {
            let dim = rng.below(r as u64) as usize;
            let idx_dims: Vec<usize> =
                (0..r).map(|k| if k == dim { e0 } else { 1 + rng.below(s[k] as u64) as usize }).collect();
            let idx = indices(&mut rng, &idx_dims, s[dim])?;
            if op == OpKind::Gather {
                run(op, vec![randn(seed, &s)?], opts, move |v| v[0].gather(dim, &idx))
            } else {
                let inputs = vec![randn(seed, &s)?, randn(seed ^ 1, &idx_dims)?];
                run(op, inputs, opts, move |v| v[0].scatter_add(dim, &idx, &v[1]))
            }
        }
        OpKind::WhereCond => {
            let cond_dims = broadcastable(&mut rng, &s);
            let cond = mask(&mut rng, &cond_dims)?;
            let (mut sa, mut sb) = (s.clone(), broadcastable(&mut rng, &s));
            if rng.below(2) == 0 {
                std::mem::swap(&mut sa, &mut sb);
            }
            let inputs = vec![randn(seed, &sa)?, randn(seed ^ 1, &sb)?];
            run(op, inputs, opts, move |v| Var::where_cond(&cond, &v[0], &v[1]))
        }
        OpKind::MaskedFill => {
            let m_dims = broadcastable(&mut rng, &s);
            let m = mask(&mut rng, &m_dims)?;
            run(op, vec![randn(seed, &s)?], opts, move |v| v[0].masked_fill(&m, 0.5))
        }
        OpKind::CrossEntropy => {
            let (n, vocab) = (e0, e1 + 1);
            let targets = indices(&mut rng, &[n], vocab)?;
            let ignore = if rng.below(3) == 0 { Some(targets.to_vec_f64()?[0] as i64) } else { None };
            run(op, vec![randn(seed, &[n, vocab])?], opts, move |v| v[0].cross_entropy(&targets, ignore))
        }
    }
}

/// `t` with each element's sign flipped at random.
fn with_random_signs(t: Tensor, rng: &mut Rng) -> Result<Tensor> {
    let v: Vec<f64> = t.to_vec_f64()?.into_iter().map(|x| if rng.below(2) == 0 { x } else { -x }).collect();
    Tensor::from_vec(v, t.shape(), &Device::Cpu)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_differentiable_op_matches_central_differences(d in draws()) {
        for &op in DIFFERENTIABLE_OPS {
            if let Err(e) = check_op(op, &d) {
                prop_assert!(false, "{}: {}", op.name(), e);
            }
        }
    }
}

#[test]
fn the_list_names_every_unary_and_binary_op_once() {
    for u in UnaryOp::ALL {
        assert!(DIFFERENTIABLE_OPS.contains(&OpKind::Unary(u)), "{} missing", u.name());
    }
    for b in BinaryOp::ALL {
        assert!(DIFFERENTIABLE_OPS.contains(&OpKind::Binary(b)), "{} missing", b.name());
    }
    let mut names: Vec<&str> = DIFFERENTIABLE_OPS.iter().map(|op| op.name()).collect();
    names.sort_unstable();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "duplicate op names in DIFFERENTIABLE_OPS");
}

#[test]
fn every_listed_op_has_a_passing_case_on_a_fixed_draw() {
    // The same walk as the property test on one hand-picked draw with rank 3 and sizes that
    // differ, so a failure here is easy to reproduce.
    let d = Draw { dims: vec![2, 3, 4], extra: [3, 2, 4, 2], seed: 42 };
    let failures: Vec<String> = DIFFERENTIABLE_OPS
        .iter()
        .filter_map(|&op| check_op(op, &d).err().map(|e| format!("{}: {e}", op.name())))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
