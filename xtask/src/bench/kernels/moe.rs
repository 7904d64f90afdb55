//! Top-k gating, grouped expert GEMM against a dense GEMM of equal FLOPs, the MoE layer.
//!
//! [`MoeGating`] (`moe_gating`): case dims `[tokens, experts, k]`, f32 logits.
//! - 0: `ops::topk_gating`, softmax scores, renormalised (Mixtral);
//! - 1: `ops::topk_gating`, sigmoid scores plus a selection bias, scaled (DeepSeek-V3);
//! - 2: `ops::topk_gating_backward` from the weights' gradient (the router's backward).
//!
//! Reference: `reference::moe` in f64 (indices compared exactly on these well-separated logits).
//! Counted traffic: the logits read, the scores, weights, indices and logsumexp written (the
//! backward: logits, scores and the weights' gradient read, the logits' gradient written).
//!
//! [`GroupedGemm`] (`grouped_gemm`): case dims `[rows, experts, in, out, skewed]`: `rows` token
//! copies (tokens × k) split over the experts uniformly (`skewed = 0`) or Zipf-like with a few
//! empty experts (`skewed = 1`); weights `(E, out, in)` in the nn.Linear layout.
//! - 0: `ops::grouped_matmul` (the AVX2 path on x86-64 with AVX2+FMA);
//! - 1: `ops::matmul (rows, in) @ (in, out)`: one dense GEMM of equal FLOPs, the ceiling to beat;
//! - 2: `ops::grouped_matmul_backward` (dx and dw);
//! - 3: the dense backward of equal FLOPs: `g @ W` and `gᵀ @ x`;
//! - 4: `cpu::grouped_gemm::generic_forward`: one `cpu::matmul::matmul` per expert on views and
//!   a concat (the portable path, CPU only).
//!
//! The grouped/dense ratio is variant 0 / variant 1 (forward) and 2 / 3 (backward) of one case:
//! same FLOPs, same run. Reference: f64 dot products on a sample of rows (64 evenly spread rows
//! of each output, 16 rows of dw), tolerance scaled by the Cauchy–Schwarz bound `‖a‖·‖b‖`.
//!
//! [`MoeLayerBench`] (`moe_layer`, B2): the whole `moeba_nn::moe::MoeLayer`, forward and
//! forward + backward, at the layer shapes (see its docs, at the end of this file).

use anyhow::{bail, Result};
use moeba_kernels::{cpu, ops, reference};
use moeba_tensor::{DType, Device, Rng, Tensor};

use super::on_device;
use crate::bench::harness::{rtol_for, Bound, Case, Cost, Expected, Kernel, Size, Variant};

// ---------------------------------------------------------------------------------- gating

/// The fused top-k gating benchmark (see the module docs).
pub struct MoeGating;

fn tek(case: &Case) -> Result<[usize; 3]> {
    Ok([case.dim("moe_gating", 0)?, case.dim("moe_gating", 1)?, case.dim("moe_gating", 2)?])
}

fn gating_opts(variant: usize, k: usize) -> ops::TopkGatingOptions {
    match variant {
        1 => ops::TopkGatingOptions { k, score: ops::MoeScoreFn::Sigmoid, renormalize: true, scaling: 2.5 },
        _ => ops::TopkGatingOptions::softmax(k),
    }
}

/// Logits whose sorted values per row are ≥ 0.1 apart (so f32 and f64 select the same experts).
fn separated_logits(seed: u64, t: usize, e: usize, dtype: DType) -> Result<Tensor> {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(t * e);
    for _ in 0..t {
        let mut p: Vec<usize> = (0..e).collect();
        for i in (1..e).rev() {
            p.swap(i, rng.below(i as u64 + 1) as usize);
        }
        v.extend(p.iter().map(|&i| (i as f64 - e as f64 / 2.0) * 8.0 / e as f64 + 0.02 * rng.uniform()));
    }
    Ok(Tensor::from_vec(v, (t, e), &Device::Cpu)?.to_dtype(dtype)?)
}

impl Kernel for MoeGating {
    fn name(&self) -> &'static str {
        "moe_gating"
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant::cpu_only(0, "ops::topk_gating softmax, renormalised"),
            Variant::cpu_only(1, "ops::topk_gating sigmoid + bias, scaled"),
            Variant::cpu_only(2, "ops::topk_gating_backward (weights)"),
        ]
    }

    fn cases(&self, size: Size) -> Vec<Case> {
        let dims: &[[usize; 3]] = match size {
            Size::Full => &[[4096, 8, 2], [4096, 64, 8], [32768, 64, 8]],
            Size::Quick => &[[512, 8, 2], [256, 64, 8]],
            Size::Tiny => &[[5, 4, 2], [3, 7, 3]],
        };
        dims.iter().map(|d| Case::f32(d)).collect()
    }

    fn bound(&self) -> Bound {
        Bound::Memory
    }

    fn cost(&self, variant: usize, case: &Case) -> Cost {
        let [t, e, k] = tek(case).unwrap_or([0; 3]).map(|d| d as f64);
        let el = case.dtype.size_in_bytes() as f64;
        let bytes = if variant == 2 {
            el * (3.0 * t * e + t * k) + 4.0 * t * k
        } else {
            el * (2.0 * t * e + t * k + t) + 4.0 * t * k
        };
        Cost { flops: None, bytes: Some(bytes) }
    }

    fn setup(&self, case: &Case, device: &Device) -> Result<Vec<Tensor>> {
        let [t, e, k] = tek(case)?;
        let logits = separated_logits(11, t, e, case.dtype)?;
        let bias = Tensor::rand(12, e, -0.01, 0.01, case.dtype, &Device::Cpu)?;
        let gw = Tensor::randn(13, (t, k), 0.0, 1.0, case.dtype, &Device::Cpu)?;
        // The forward's outputs, which the backward (variant 2) takes.
        let f = ops::topk_gating(&logits, None, &gating_opts(2, k))?;
        on_device(&[logits, bias, gw, f.indices, f.weights, f.scores, f.counts, f.mean_score, f.lse], device)
    }

    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [logits, bias, gw, indices, weights, scores, counts, mean_score, lse] = inputs else {
            bail!("moe_gating: expected 9 inputs, got {}", inputs.len())
        };
        let k = gw.dims()[1];
        let opts = gating_opts(variant, k);
        Ok(match variant {
            0 => {
                let g = ops::topk_gating(logits, None, &opts)?;
                vec![g.indices, g.weights]
            }
            1 => {
                let g = ops::topk_gating(logits, Some(bias), &opts)?;
                vec![g.indices, g.weights]
            }
            2 => {
                let fwd = ops::TopkGating {
                    indices: indices.clone(),
                    weights: weights.clone(),
                    scores: scores.clone(),
                    counts: counts.clone(),
                    mean_score: mean_score.clone(),
                    lse: lse.clone(),
                };
                vec![ops::topk_gating_backward(logits, &fwd, &opts, Some(gw), None, None)?]
            }
            v => bail!("moe_gating: no variant {v}"),
        })
    }

    fn reference(&self, variant: usize, _case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
        let (logits, bias, gw) = (&inputs[0], &inputs[1], &inputs[2]);
        let k = gw.dims()[1];
        let opts = gating_opts(variant, k);
        let rtol = rtol_for(logits.dtype(), 2e-5);
        let all = |t: &Tensor, rtol: f64, atol: f64| -> Result<Expected> {
            Ok(Expected::all(t.dims(), t.to_vec_f64()?, rtol, atol))
        };
        Ok(match variant {
            0 | 1 => {
                let g = reference::moe::topk_gating(logits, (variant == 1).then_some(bias), &opts)?;
                vec![all(&g.indices, 0.0, 0.0)?, all(&g.weights, rtol, 1e-7)?]
            }
            _ => {
                let g = reference::moe::topk_gating_backward(logits, &opts, None, Some(gw), None, None)?;
                vec![all(&g, rtol, 1e-6)?]
            }
        })
    }

    fn reference_key(&self, variant: usize) -> usize {
        variant
    }
}

// ------------------------------------------------------------------------------ grouped GEMM

/// The grouped expert GEMM benchmark (see the module docs).
pub struct GroupedGemm;

/// `[rows, experts, in, out, skewed]`.
fn gg_dims(case: &Case) -> Result<[usize; 5]> {
    let d = |i| case.dim("grouped_gemm", i);
    Ok([d(0)?, d(1)?, d(2)?, d(3)?, d(4)?])
}

/// Rows per expert: uniform (the remainder to the first experts), or Zipf-like weights
/// `1/(i+1)` with every 7th expert (from the 6th) empty and the rounding remainder on expert 0.
pub fn group_sizes(rows: usize, experts: usize, skewed: bool) -> Vec<usize> {
    if experts == 0 {
        return Vec::new();
    }
    let mut g: Vec<usize> = if skewed {
        let w: Vec<f64> =
            (0..experts).map(|i| if i % 7 == 5 { 0.0 } else { 1.0 / (i as f64 + 1.0) }).collect();
        let s: f64 = w.iter().sum();
        w.iter().map(|x| (x / s * rows as f64) as usize).collect()
    } else {
        vec![rows / experts; experts]
    };
    let short = rows - g.iter().sum::<usize>();
    if skewed {
        g[0] += short;
    } else {
        g.iter_mut().take(short).for_each(|x| *x += 1);
    }
    g
}

fn offsets_of(groups: &[usize]) -> Vec<usize> {
    let mut o = vec![0];
    for g in groups {
        o.push(o[o.len() - 1] + g);
    }
    o
}

/// 64 evenly spread indices of `0..n` and the last one.
fn sample(n: usize) -> Vec<usize> {
    if n <= 65 {
        return (0..n).collect();
    }
    let mut r: Vec<usize> = (0..64).map(|i| i * n / 64).collect();
    r.push(n - 1);
    r.dedup();
    r
}

/// Sampled rows of `c = a · b` where row `i` of `a` is `a_row(i)` and column `j` of `b` is
/// `b_col(i, j)` (both length `inner`): values and Cauchy–Schwarz scales for `Expected`.
fn sampled_rows(
    rows: &[usize],
    n: usize,
    a_row: impl Fn(usize) -> Vec<f64>,
    b_col: impl Fn(usize, usize) -> Vec<f64>,
) -> (Vec<usize>, Vec<f64>, Vec<f64>) {
    let (mut idx, mut vals, mut scale) = (Vec::new(), Vec::new(), Vec::new());
    for &i in rows {
        let a = a_row(i);
        let an = a.iter().map(|v| v * v).sum::<f64>().sqrt();
        for j in 0..n {
            let b = b_col(i, j);
            idx.push(i * n + j);
            vals.push(a.iter().zip(&b).map(|(x, y)| x * y).sum());
            scale.push(an * b.iter().map(|v| v * v).sum::<f64>().sqrt());
        }
    }
    (idx, vals, scale)
}

impl Kernel for GroupedGemm {
    fn name(&self) -> &'static str {
        "grouped_gemm"
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant::cpu_only(0, "ops::grouped_matmul"),
            Variant::cpu_only(1, "ops::matmul dense, equal FLOPs"),
            Variant::cpu_only(2, "ops::grouped_matmul_backward"),
            Variant::cpu_only(3, "dense backward (g@W, gT@x), equal FLOPs"),
            Variant::cpu_only(4, "per-expert cpu::matmul + concat (portable)"),
        ]
    }

    fn cases(&self, size: Size) -> Vec<Case> {
        let dims: &[[usize; 5]] = match size {
            // The two layers at 4096 tokens: (d 512, ff 1024, E 8, top-2) and
            // (d 256, ff 256, E 64, top-8); the gate_up (in d, out 2ff) and down projections.
            Size::Full => &[
                [8192, 8, 512, 2048, 0],
                [8192, 8, 1024, 512, 0],
                [8192, 8, 512, 2048, 1],
                [32768, 64, 256, 512, 0],
                [32768, 64, 256, 256, 0],
                [32768, 64, 256, 512, 1],
            ],
            Size::Quick => &[[512, 8, 64, 96, 0], [600, 16, 40, 50, 1]],
            Size::Tiny => &[[20, 3, 5, 7, 1], [9, 4, 3, 2, 0]],
        };
        dims.iter().map(|d| Case::f32(d)).collect()
    }

    fn bound(&self) -> Bound {
        Bound::Compute
    }

    fn cost(&self, variant: usize, case: &Case) -> Cost {
        let [r, e, i, o, _] = gg_dims(case).unwrap_or([0; 5]).map(|d| d as f64);
        let el = case.dtype.size_in_bytes() as f64;
        let dense_w = i * o;
        let w = if variant == 1 || variant == 3 { dense_w } else { e * dense_w };
        if variant == 2 || variant == 3 {
            Cost { flops: Some(4.0 * r * i * o), bytes: Some(el * (2.0 * r * i + 2.0 * r * o + 2.0 * w)) }
        } else {
            Cost { flops: Some(2.0 * r * i * o), bytes: Some(el * (r * i + r * o + w)) }
        }
    }

    fn setup(&self, case: &Case, device: &Device) -> Result<Vec<Tensor>> {
        let [r, e, i, o, skewed] = gg_dims(case)?;
        let offs = offsets_of(&group_sizes(r, e, skewed != 0));
        let cpu = Device::Cpu;
        let x = Tensor::randn(21, (r, i), 0.0, 1.0, case.dtype, &cpu)?;
        let w = Tensor::randn(22, (e, o, i), 0.0, 1.0, case.dtype, &cpu)?;
        let offsets = Tensor::from_vec(offs.iter().map(|&v| v as i64).collect::<Vec<_>>(), e + 1, &cpu)?;
        let g = Tensor::randn(23, (r, o), 0.0, 1.0, case.dtype, &cpu)?;
        // The dense weight of equal FLOPs in both layouts: (in, out) and (out, in).
        let wd = Tensor::randn(24, (i, o), 0.0, 1.0, case.dtype, &cpu)?;
        let wdt = wd.t()?.contiguous()?;
        on_device(&[x, w, offsets, g, wd, wdt], device)
    }

    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [x, w, offsets, g, wd, wdt] = inputs else {
            bail!("grouped_gemm: expected 6 inputs, got {}", inputs.len())
        };
        Ok(match variant {
            0 => vec![ops::grouped_matmul(x, w, offsets)?],
            1 => vec![ops::matmul(x, wd)?],
            2 => {
                let (dx, dw) = ops::grouped_matmul_backward(x, w, offsets, g)?;
                vec![dx, dw]
            }
            3 => vec![ops::matmul(g, wdt)?, ops::matmul(&g.t()?, x)?],
            4 => {
                let offs: Vec<usize> = offsets.to_vec::<i64>()?.iter().map(|&v| v as usize).collect();
                vec![cpu::grouped_gemm::generic_forward(x, w, &offs)?]
            }
            v => bail!("grouped_gemm: no variant {v}"),
        })
    }

    fn reference(&self, variant: usize, case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
        let [r, e, i, o, _] = gg_dims(case)?;
        let x = inputs[0].to_vec_f64()?;
        let w = inputs[1].to_vec_f64()?;
        let offs: Vec<usize> = inputs[2].to_vec::<i64>()?.iter().map(|&v| v as usize).collect();
        let g = inputs[3].to_vec_f64()?;
        let wd = inputs[4].to_vec_f64()?;
        let expert_of = |row: usize| (0..e).find(|&ex| row < offs[ex + 1]).unwrap_or(0);
        let rtol = rtol_for(case.dtype, 1e-5);
        let exp = |dims: Vec<usize>, (idx, vals, scale): (Vec<usize>, Vec<f64>, Vec<f64>)| Expected {
            dims,
            values: vals,
            indices: Some(idx),
            scale: Some(scale),
            rtol,
            atol: 0.0,
        };
        let xrow = |row: usize| x[row * i..(row + 1) * i].to_vec();
        let grow = |row: usize| g[row * o..(row + 1) * o].to_vec();
        Ok(match variant {
            0 | 4 => {
                let col = |row: usize, j: usize| {
                    let ex = expert_of(row);
                    w[(ex * o + j) * i..(ex * o + j + 1) * i].to_vec()
                };
                vec![exp(vec![r, o], sampled_rows(&sample(r), o, xrow, col))]
            }
            1 => {
                let col = |_: usize, j: usize| (0..i).map(|p| wd[p * o + j]).collect();
                vec![exp(vec![r, o], sampled_rows(&sample(r), o, xrow, col))]
            }
            2 => {
                let dx_col = |row: usize, c: usize| {
                    let ex = expert_of(row);
                    (0..o).map(|j| w[(ex * o + j) * i + c]).collect()
                };
                let dx = exp(vec![r, i], sampled_rows(&sample(r), i, grow, dx_col));
                // dw rows (e, out j): Σ_{rows of e} g[row, j] x[row, :]; 16 rows spread over (e, j).
                let dw_rows: Vec<usize> = (0..16).map(|s| s * (e * o) / 16).collect();
                let a_row = |er: usize| {
                    let (ex, j) = (er / o, er % o);
                    (offs[ex]..offs[ex + 1]).map(|row| g[row * o + j]).collect()
                };
                let b_col = |er: usize, c: usize| {
                    let ex = er / o;
                    (offs[ex]..offs[ex + 1]).map(|row| x[row * i + c]).collect()
                };
                vec![dx, exp(vec![e, o, i], sampled_rows(&dw_rows, i, a_row, b_col))]
            }
            _ => {
                // dx = g @ wdᵀ (wdt is (out, in)), dW = gᵀ @ x.
                let dx_col = |_: usize, c: usize| (0..o).map(|j| wd[c * o + j]).collect();
                let dx = exp(vec![r, i], sampled_rows(&sample(r), i, grow, dx_col));
                let a_row = |j: usize| (0..r).map(|row| g[row * o + j]).collect();
                let b_col = |_: usize, c: usize| (0..r).map(|row| x[row * i + c]).collect();
                vec![dx, exp(vec![o, i], sampled_rows(&sample(o)[..16.min(o)], i, a_row, b_col))]
            }
        })
    }

    fn reference_key(&self, variant: usize) -> usize {
        if variant == 4 {
            0
        } else {
            variant
        }
    }
}

// ------------------------------------------------------------------ the MoE layer (B2's rows)

/// `moe_layer`: the whole [`moeba_nn::moe::MoeLayer`] (top-k softmax router, renormalised, SwiGLU
/// experts, dropless) on `x (T, d)`; case dims `[T, d, ff, E, k]`, f32, weights N(0, 0.02) and
/// x N(0, 1) as in the PyTorch peer (`torch_bench.py` W4, HF `MixtralSparseMoeBlock`).
///
/// Variants:
/// - 0: forward under `no_grad` (the peer's `torch.no_grad()` forward);
/// - 1: forward + backward: gradients for the input, the router and every expert weight.
///
/// Cost: the expert GEMMs only, `2 · T · k · 3 · d · ff` per forward (the peer's convention),
/// three times that for forward + backward. Reference: the output of 24 evenly spread tokens
/// by a plain per-token f64 computation (routing, renormalised weights, SwiGLU of the chosen
/// experts); the backward is validated by the test suite, not here.
pub struct MoeLayerBench {
    layers: std::sync::Mutex<Vec<(Vec<usize>, std::sync::Arc<moeba_nn::moe::MoeLayer>)>>,
}

impl MoeLayerBench {
    /// A bench with no layers built yet.
    pub fn new() -> Self {
        MoeLayerBench { layers: std::sync::Mutex::new(Vec::new()) }
    }

    fn dims(case: &Case) -> Result<[usize; 5]> {
        let k = "moe_layer";
        Ok([case.dim(k, 0)?, case.dim(k, 1)?, case.dim(k, 2)?, case.dim(k, 3)?, case.dim(k, 4)?])
    }

    /// The layer of a case (its parameters are replaced by the inputs on every run).
    fn layer(&self, dims: &[usize]) -> Result<std::sync::Arc<moeba_nn::moe::MoeLayer>> {
        let mut cache = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, l)) = cache.iter().find(|(d, _)| d.as_slice() == dims) {
            return Ok(l.clone());
        }
        let [_, d, ff, e, k] = [dims[0], dims[1], dims[2], dims[3], dims[4]];
        let store = moeba_nn::ParamStore::new(DType::F32, Device::Cpu, 0);
        let cfg = moeba_nn::moe::MoeConfig::new(d, ff, e, k);
        // Tiny init work: the layer's own parameters are never used (forward_with gets the inputs).
        let layer = std::sync::Arc::new(moeba_nn::moe::MoeLayer::new(&store.root(), &cfg)?);
        cache.push((dims.to_vec(), layer.clone()));
        Ok(layer)
    }
}

impl Default for MoeLayerBench {
    fn default() -> Self {
        Self::new()
    }
}

impl Kernel for MoeLayerBench {
    fn name(&self) -> &'static str {
        "moe_layer"
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant::cpu_only(0, "MoeLayer forward (no_grad)"),
            Variant::cpu_only(1, "MoeLayer forward+backward"),
        ]
    }

    fn cases(&self, size: Size) -> Vec<Case> {
        let dims: &[[usize; 5]] = match size {
            Size::Full => &[[4096, 512, 1024, 8, 2], [4096, 256, 256, 64, 8]],
            Size::Quick => &[[256, 64, 128, 8, 2], [200, 32, 48, 16, 4]],
            Size::Tiny => &[[9, 8, 6, 4, 2], [5, 4, 3, 3, 1]],
        };
        dims.iter().map(|d| Case::f32(d)).collect()
    }

    fn bound(&self) -> Bound {
        Bound::Compute
    }

    fn cost(&self, variant: usize, case: &Case) -> Cost {
        let [t, d, ff, e, k] = Self::dims(case).unwrap_or([0; 5]).map(|v| v as f64);
        let fwd = 2.0 * t * k * 3.0 * d * ff;
        let elem = case.dtype.size_in_bytes() as f64;
        let bytes = elem * (2.0 * t * d + e * 3.0 * d * ff + e * d);
        Cost { flops: Some(if variant == 1 { 3.0 * fwd } else { fwd }), bytes: Some(bytes) }
    }

    fn setup(&self, case: &Case, device: &Device) -> Result<Vec<Tensor>> {
        let [t, d, ff, e, k] = Self::dims(case)?;
        self.layer(&case.dims)?;
        let w = |seed: u64, dims: &[usize]| Tensor::randn(seed, dims, 0.0, 0.02, case.dtype, &Device::Cpu);
        let x = super::randn(1, &[t, d], case.dtype)?;
        let dout = super::randn(2, &[t, d], case.dtype)?;
        let kt = Tensor::from_vec(vec![k as u32], 1, &Device::Cpu)?;
        let xs = [x, w(3, &[e, d])?, w(4, &[e, 2 * ff, d])?, w(5, &[e, d, ff])?, dout, kt];
        on_device(&xs, device)
    }

    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [x, router, gate_up, down, dout, kt] = inputs else {
            bail!("moe_layer: expected 6 inputs, got {}", inputs.len())
        };
        let k = kt.to_vec::<u32>()?.first().copied().unwrap_or(1) as usize;
        let layer = self.layer(&[x.dims()[0], x.dims()[1], down.dims()[2], router.dims()[0], k])?;
        let ctx = moeba_nn::moe::MoeContext::default();
        use moeba_autograd::Var;
        match variant {
            0 => {
                let _g = moeba_autograd::no_grad();
                let w = moeba_nn::moe::MoeWeights {
                    router: vec![Var::constant(router.clone())],
                    gate_up: Var::constant(gate_up.clone()),
                    down: Var::constant(down.clone()),
                    shared: None,
                };
                Ok(vec![layer.forward_with(&Var::constant(x.clone()), &w, &ctx)?.out.tensor().clone()])
            }
            1 => {
                let w = moeba_nn::moe::MoeWeights {
                    router: vec![Var::param(router.clone())],
                    gate_up: Var::param(gate_up.clone()),
                    down: Var::param(down.clone()),
                    shared: None,
                };
                let xv = Var::param(x.clone());
                let y = layer.forward_with(&xv, &w, &ctx)?.out;
                let grads = y.backward_with(dout.clone())?;
                let n = [&xv, &w.router[0], &w.gate_up, &w.down]
                    .iter()
                    .filter(|v| grads.get(v).is_some())
                    .count();
                if n != 4 {
                    bail!("moe_layer: backward produced {n} of 4 gradients");
                }
                Ok(vec![y.tensor().clone()])
            }
            v => bail!("moe_layer: no variant {v}"),
        }
    }

    fn reference(&self, _variant: usize, case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
        let [t, d, ff, e, k] = Self::dims(case)?;
        let x = inputs[0].to_vec_f64()?;
        let router = inputs[1].to_vec_f64()?;
        let gu = inputs[2].to_vec_f64()?;
        let dn = inputs[3].to_vec_f64()?;
        let mut tokens: Vec<usize> = (0..24.min(t)).map(|i| i * t / 24.min(t).max(1)).collect();
        if t > 0 {
            tokens.push(t - 1);
        }
        tokens.dedup();
        let (mut values, mut scale, mut indices) = (Vec::new(), Vec::new(), Vec::new());
        for &tok in &tokens {
            let xt = &x[tok * d..(tok + 1) * d];
            let logits: Vec<f64> = (0..e).map(|i| (0..d).map(|j| router[i * d + j] * xt[j]).sum()).collect();
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let sel = &order[..k];
            let z: f64 = sel.iter().map(|&i| p[i]).sum();
            let mut y = vec![0.0; d];
            let mut ys = vec![0.0; d];
            for &ex in sel {
                let w = p[ex] / z;
                let g = &gu[ex * 2 * ff * d..(ex + 1) * 2 * ff * d];
                let h: Vec<f64> = (0..ff)
                    .map(|i| {
                        let a: f64 = (0..d).map(|j| g[i * d + j] * xt[j]).sum();
                        let b: f64 = (0..d).map(|j| g[(ff + i) * d + j] * xt[j]).sum();
                        a / (1.0 + (-a).exp()) * b
                    })
                    .collect();
                let dw = &dn[ex * d * ff..(ex + 1) * d * ff];
                for o in 0..d {
                    let row = &dw[o * ff..(o + 1) * ff];
                    y[o] += w * row.iter().zip(&h).map(|(a, b)| a * b).sum::<f64>();
                    ys[o] += w * row.iter().zip(&h).map(|(a, b)| (a * b).abs()).sum::<f64>();
                }
            }
            values.extend(y);
            scale.extend(ys);
            indices.extend((0..d).map(|o| tok * d + o));
        }
        Ok(vec![Expected {
            dims: vec![t, d],
            values,
            indices: Some(indices),
            scale: Some(scale),
            rtol: rtol_for(case.dtype, 1e-4),
            atol: 1e-9,
        }])
    }
}
