//! [`AdamW`]: Adam with decoupled weight decay (Loshchilov & Hutter), and global-norm clipping.

use std::collections::HashMap;

use moeba_autograd::Grads;
use moeba_kernels::ops;
use moeba_nn::Param;
use moeba_tensor::{Device, Error, Result, Tensor};

/// AdamW's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁, the first-moment decay.
    pub beta1: f64,
    /// β₂, the second-moment decay.
    pub beta2: f64,
    /// Added to √v̂.
    pub eps: f64,
    /// Decoupled weight decay, applied as `p -= lr · wd · p` to the parameters it is on for.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// AdamW over a fixed list of parameters. Weight decay applies to matrices (rank ≥ 2) other than
/// embeddings; never to norms or biases.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(Param, bool)>,
    state: HashMap<String, (Tensor, Tensor)>,
    step: usize,
    /// Whether CPU f32/f64 parameters take the fused path (tests turn it off to compare).
    fused: bool,
}

impl AdamW {
    /// An optimizer for `params` (decay decided per parameter as described on the type).
    pub fn new(params: Vec<Param>, cfg: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|p| {
                let decay = p.var().rank() >= 2 && !p.name().contains("embed");
                (p, decay)
            })
            .collect();
        Ok(AdamW { cfg, params, state: HashMap::new(), step: 0, fused: true })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One update with learning rate `lr` from `grads` scaled by `grad_scale` (clipping; see
    /// [`clip_factor`]). A parameter without a gradient is left as it is. A non-finite update is
    /// an error naming the parameter; nothing is updated then.
    ///
    /// CPU parameters in f32 or f64 take one fused pass per parameter; others
    /// (CUDA, bf16/f16) go through the ops. Both compute the same thing in the same order and
    /// give bit-identical results.
    pub fn step(&mut self, grads: &Grads, lr: f64, grad_scale: f64) -> Result<()> {
        let mut updates = Vec::with_capacity(self.params.len());
        let t = (self.step + 1) as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (p, decay) in &self.params {
            let var = p.var();
            let Some(g) = grads.get(&var) else { continue };
            let keep = if *decay { 1.0 - lr * self.cfg.weight_decay } else { 1.0 };
            let h = fused::Hyper {
                grad_scale,
                beta1: b1,
                beta2: b2,
                inv_bc2: 1.0 / bc2,
                eps: self.cfg.eps,
                step_size: lr / bc1,
                keep,
            };
            let state = self.state.get(p.name());
            let fast = if self.fused { fused::update(var.tensor(), g, state, &h)? } else { None };
            let (new, m, v, finite) = match fast {
                Some((new, m, v, finite)) => (new, m, v, Some(finite)),
                None => {
                    let (new, m, v) = update_ops(var.tensor(), g, state, &h)?;
                    (new, m, v, None)
                }
            };
            updates.push((p.clone(), new, m, v, finite));
        }
        for (p, new, _, _, finite) in &updates {
            let finite = match finite {
                Some(f) => *f,
                None => {
                    ops::sum_all(new)?.to_dtype(moeba_tensor::DType::F64)?.to_scalar::<f64>()?.is_finite()
                }
            };
            if !finite {
                return Err(Error::invalid(
                    "AdamW::step",
                    "grads",
                    format!("non-finite update for `{}`", p.name()),
                ));
            }
        }
        for (p, new, m, v, _) in updates {
            p.set(new)?;
            self.state.insert(p.name().to_string(), (m, v));
        }
        self.step += 1;
        Ok(())
    }

    /// Turns the fused CPU update on (the default) or off (every parameter then goes through the
    /// ops). Both give the same bits; this exists to test and benchmark that.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The moments `(exp_avg, exp_avg_sq)` of the parameter `name`, once it has been updated.
    pub fn moments(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        self.state.get(name).map(|(m, v)| (m, v))
    }

    /// The optimizer state as safetensors bytes: per updated parameter `{name}.exp_avg` and
    /// `{name}.exp_avg_sq` (in the parameter's dtype), and the step count in the metadata
    /// (`step`). Parameters never updated (no gradient yet) have no entries.
    pub fn state_to_safetensors(&self) -> Result<Vec<u8>> {
        let mut tensors = Vec::with_capacity(2 * self.state.len());
        for (p, _) in &self.params {
            if let Some((m, v)) = self.state.get(p.name()) {
                tensors.push((format!("{}{EXP_AVG}", p.name()), m.clone()));
                tensors.push((format!("{}{EXP_AVG_SQ}", p.name()), v.clone()));
            }
        }
        // One key only: safetensors writes metadata in hash-map order, and the bytes of a
        // checkpoint should not depend on it.
        let metadata = HashMap::from([("step".to_string(), self.step.to_string())]);
        moeba_tensor::safetensors_io::serialize(tensors, Some(metadata))
    }

    /// Restores the state written by [`AdamW::state_to_safetensors`] (bit for bit: the next
    /// step is the one the saving optimizer would have taken). A tensor for a parameter this
    /// optimizer does not have, a parameter with only one of its two moments, a shape that
    /// differs from the parameter's, or a missing or bad `step` is an error naming it; nothing
    /// changes then.
    pub fn load_state_safetensors(&mut self, bytes: &[u8]) -> Result<()> {
        const OP: &str = "AdamW::load_state_safetensors";
        let (_, st_meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
            Error::Msg(format!(
                "{OP}: cannot parse the optimizer state ({} bytes): {e}; the file may be truncated",
                bytes.len()
            ))
        })?;
        let meta = st_meta.metadata().clone().unwrap_or_default();
        let step_str = meta.get("step").ok_or_else(|| {
            Error::invalid(OP, "metadata", "no `step` in the metadata: not a moeba AdamW state")
        })?;
        let step: usize = step_str.parse().map_err(|_| {
            Error::invalid(OP, "metadata", format!("`step` is {step_str:?}, expected a whole number"))
        })?;
        let mut loaded = moeba_tensor::safetensors_io::deserialize(bytes, &Device::Cpu)?;
        let mut state = HashMap::with_capacity(self.params.len());
        for (p, _) in &self.params {
            let name = p.name();
            let m = loaded.remove(&format!("{name}{EXP_AVG}"));
            let v = loaded.remove(&format!("{name}{EXP_AVG_SQ}"));
            let (m, v) = match (m, v) {
                (None, None) => continue,
                (Some(m), Some(v)) => (m, v),
                (m, _) => {
                    let missing = if m.is_some() { EXP_AVG_SQ } else { EXP_AVG };
                    return Err(Error::invalid(OP, "tensors", format!("missing tensor `{name}{missing}`")));
                }
            };
            let have = p.var();
            let conform = |t: Tensor, suffix: &str| -> Result<Tensor> {
                if t.shape() != have.shape() {
                    return Err(Error::invalid(
                        OP,
                        "tensors",
                        format!(
                            "`{name}{suffix}` has shape {}, the parameter `{name}` is {}",
                            t.shape(),
                            have.shape()
                        ),
                    ));
                }
                t.to_dtype(have.dtype())?.to_device(have.tensor().device())
            };
            let pair = (conform(m, EXP_AVG)?, conform(v, EXP_AVG_SQ)?);
            state.insert(name.to_string(), pair);
        }
        if let Some(extra) = loaded.keys().min() {
            return Err(Error::invalid(
                OP,
                "tensors",
                format!("unexpected tensor `{extra}` (this optimizer has no parameter it belongs to)"),
            ));
        }
        if step == 0 && !state.is_empty() {
            return Err(Error::invalid(OP, "metadata", "`step` is 0 but the state holds moments"));
        }
        self.state = state;
        self.step = step;
        Ok(())
    }
}

/// The suffix of a first-moment tensor in the optimizer state file.
const EXP_AVG: &str = ".exp_avg";
/// The suffix of a second-moment tensor in the optimizer state file.
const EXP_AVG_SQ: &str = ".exp_avg_sq";

/// The AdamW update of one parameter through the ops (any device and float dtype): returns the
/// new value and the new moments. [`fused::update`] computes the same, bit for bit.
fn update_ops(
    param: &Tensor,
    g: &Tensor,
    state: Option<&(Tensor, Tensor)>,
    h: &fused::Hyper,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = &ops::affine(g, h.grad_scale, 0.0)?;
    let (m, v) = match state {
        Some(s) => s.clone(),
        None => (g.zeros_like()?, g.zeros_like()?),
    };
    let (b1, b2) = (h.beta1, h.beta2);
    let m = ops::add(&ops::affine(&m, b1, 0.0)?, &ops::affine(g, 1.0 - b1, 0.0)?)?;
    let v = ops::add(&ops::affine(&v, b2, 0.0)?, &ops::affine(&ops::mul(g, g)?, 1.0 - b2, 0.0)?)?;
    // p ← p·(1 − lr·wd) − lr · m̂ / (√v̂ + eps)
    let denom = ops::affine(&ops::sqrt(&ops::affine(&v, h.inv_bc2, 0.0)?)?, 1.0, h.eps)?;
    let upd = ops::div(&ops::affine(&m, h.step_size, 0.0)?, &denom)?;
    let new = ops::sub(&ops::affine(param, h.keep, 0.0)?, &upd)?;
    Ok((new, m, v))
}

/// The global L2 norm of the gradients of `params`, summed in parameter order (deterministic,
/// unlike a walk over the gradient map, so clipping and hence resumed runs are bit-exact).
/// Parameters without a gradient count as zero.
pub fn grad_norm(params: &[Param], grads: &Grads) -> Result<f64> {
    let mut total = 0.0f64;
    for p in params {
        if let Some(g) = grads.get(&p.var()) {
            let s = ops::sum_all(&ops::mul(g, g)?)?;
            total += s.to_dtype(moeba_tensor::DType::F64)?.to_scalar::<f64>()?;
        }
    }
    Ok(total.sqrt())
}

/// The factor that clips a gradient of global norm `norm` to `max_norm` (1 when it is already
/// below, or when `max_norm` is 0; pass it to [`AdamW::step`]).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / norm
    } else {
        1.0
    }
}

/// The fused CPU AdamW update: one pass over a parameter, its gradient and its two moments,
/// writing the new value and moments, with the exact arithmetic of [`update_ops`].
///
/// The ops path computes, per element, `g' = affine(g, s, 0)`, `m' = affine(m, β₁, 0) +
/// affine(g', 1−β₁, 0)`, `v' = affine(v, β₂, 0) + affine(g'·g', 1−β₂, 0)`,
/// `d = affine(√affine(v', 1/bc₂, 0), 1, ε)`, `p' = affine(p, keep, 0) − affine(m', lr/bc₁, 0) / d`.
/// In f64 `affine(x, a, b)` is `x·a + b` (two roundings); in f32 it is the SIMD kernels'
/// `fma(x, a as f32, b as f32)` on the active SIMD path (fused where the path has FMA, `x·a + b`
/// on the scalar path). The f32 loop here is written over the same [`Vf32`] trait and run through
/// the same [`simd::dispatch`], so it rounds exactly as the ops do on every path; `+ 0` is kept
/// (it turns `-0` into `+0`). Elements are independent, so cutting the work into parallel chunks
/// changes nothing.
mod fused {
    use std::mem::MaybeUninit;

    use moeba_kernels::cpu::par;
    use moeba_kernels::cpu::simd::{self, Kernel, Vf32};
    use moeba_tensor::{CpuStorage, DType, Result, Tensor};
    use rayon::prelude::*;

    /// The per-step constants of one parameter's update (f64, as the ops take them).
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Hyper {
        /// Gradient scale (clipping).
        pub grad_scale: f64,
        /// β₁.
        pub beta1: f64,
        /// β₂.
        pub beta2: f64,
        /// `1 / (1 − β₂ᵗ)`.
        pub inv_bc2: f64,
        /// ε.
        pub eps: f64,
        /// `lr / (1 − β₁ᵗ)`.
        pub step_size: f64,
        /// `1 − lr·wd` (decayed parameters) or 1.
        pub keep: f64,
    }

    /// The new value, moments, and whether every new value is finite; `None` when the fused
    /// path does not apply (not on the CPU, not f32/f64, dtypes or shapes that differ: the ops
    /// path then handles it, errors included).
    pub(super) fn update(
        param: &Tensor,
        g: &Tensor,
        state: Option<&(Tensor, Tensor)>,
        h: &Hyper,
    ) -> Result<Option<(Tensor, Tensor, Tensor, bool)>> {
        let dtype = param.dtype();
        let mut all = vec![param, g];
        if let Some((m, v)) = state {
            all.extend([m, v]);
        }
        let applies = matches!(dtype, DType::F32 | DType::F64)
            && all.iter().all(|t| t.device().is_cpu() && t.dtype() == dtype && t.shape() == param.shape());
        if !applies {
            return Ok(None);
        }
        let shape = param.shape().clone();
        let (p, m, v, finite) = match dtype {
            DType::F32 => {
                let c = Consts32::new(h);
                let (p, g) = (param.cpu_data::<f32>()?, g.cpu_data::<f32>()?);
                let mv = match state {
                    Some((m, v)) => Some((m.cpu_data::<f32>()?, v.cpu_data::<f32>()?)),
                    None => None,
                };
                let mv = mv.as_ref().map(|(m, v)| (&m[..], &v[..]));
                let (p, m, v, ok) = run(&p, &g, mv, |p, g, mv, out| {
                    let k = AdamF32 {
                        c,
                        p: p.as_ptr(),
                        g: g.as_ptr(),
                        m: mv.map_or(std::ptr::null(), |(m, _)| m.as_ptr()),
                        v: mv.map_or(std::ptr::null(), |(_, v)| v.as_ptr()),
                        out: [
                            out[0].as_mut_ptr().cast(),
                            out[1].as_mut_ptr().cast(),
                            out[2].as_mut_ptr().cast(),
                        ],
                        n: p.len(),
                    };
                    // SAFETY: every pointer is valid for `n` elements (the chunks have equal
                    // lengths); the kernel writes all `n` outputs.
                    unsafe { simd::dispatch(k) }
                });
                (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v), ok)
            }
            _ => {
                let (p, g) = (param.cpu_data::<f64>()?, g.cpu_data::<f64>()?);
                let mv = match state {
                    Some((m, v)) => Some((m.cpu_data::<f64>()?, v.cpu_data::<f64>()?)),
                    None => None,
                };
                let mv = mv.as_ref().map(|(m, v)| (&m[..], &v[..]));
                let (p, m, v, ok) = run(&p, &g, mv, |p, g, mv, out| adam_f64(h, p, g, mv, out));
                (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v), ok)
            }
        };
        Ok(Some((
            Tensor::from_cpu_storage(p, shape.clone())?,
            Tensor::from_cpu_storage(m, shape.clone())?,
            Tensor::from_cpu_storage(v, shape)?,
            finite,
        )))
    }

    type Outs<'a, T> = [&'a mut [MaybeUninit<T>]; 3];

    /// Runs `f(p, g, (m, v), [p', m', v'])` over the elements, in parallel chunks when large;
    /// returns the three outputs and whether every chunk reported finite values.
    #[allow(clippy::type_complexity)]
    fn run<T: Copy + Send + Sync>(
        p: &[T],
        g: &[T],
        mv: Option<(&[T], &[T])>,
        f: impl Fn(&[T], &[T], Option<(&[T], &[T])>, Outs<'_, T>) -> bool + Sync,
    ) -> (Vec<T>, Vec<T>, Vec<T>, bool) {
        let n = p.len();
        let mut outs: [Vec<T>; 3] = std::array::from_fn(|_| Vec::with_capacity(n));
        let [op, om, ov] = &mut outs;
        let (sp, sm, sv) = (
            &mut op.spare_capacity_mut()[..n],
            &mut om.spare_capacity_mut()[..n],
            &mut ov.spare_capacity_mut()[..n],
        );
        let finite = if par::use_threads(n) {
            let c = par::chunk_len::<T>();
            sp.par_chunks_mut(c)
                .zip(sm.par_chunks_mut(c))
                .zip(sv.par_chunks_mut(c))
                .enumerate()
                .map(|(i, ((a, b), d))| {
                    let r = i * c..i * c + a.len();
                    let mv = mv.map(|(m, v)| (&m[r.clone()], &v[r.clone()]));
                    f(&p[r.clone()], &g[r], mv, [a, b, d])
                })
                .reduce(|| true, |x, y| x && y)
        } else {
            f(p, g, mv, [sp, sm, sv])
        };
        // SAFETY: `f` wrote all `n` elements of each output (see `AdamF32::run`, `adam_f64`).
        unsafe {
            op.set_len(n);
            om.set_len(n);
            ov.set_len(n);
        }
        let [p, m, v] = outs;
        (p, m, v, finite)
    }

    /// The ops' f64 `affine`.
    #[inline(always)]
    fn aff(x: f64, mul: f64, add: f64) -> f64 {
        x * mul + add
    }

    /// The f64 update of a chunk (scalar code, as the ops' f64 kernels).
    fn adam_f64(h: &Hyper, p: &[f64], g: &[f64], mv: Option<(&[f64], &[f64])>, out: Outs<'_, f64>) -> bool {
        let [op, om, ov] = out;
        let (b1, b2) = (h.beta1, h.beta2);
        let mut finite = true;
        for i in 0..p.len() {
            let (m, v) = mv.map_or((0.0, 0.0), |(m, v)| (m[i], v[i]));
            let g = aff(g[i], h.grad_scale, 0.0);
            let m = aff(m, b1, 0.0) + aff(g, 1.0 - b1, 0.0);
            let v = aff(v, b2, 0.0) + aff(g * g, 1.0 - b2, 0.0);
            let denom = aff(aff(v, h.inv_bc2, 0.0).sqrt(), 1.0, h.eps);
            let new = aff(p[i], h.keep, 0.0) - aff(m, h.step_size, 0.0) / denom;
            finite &= new.is_finite();
            op[i].write(new);
            om[i].write(m);
            ov[i].write(v);
        }
        finite
    }

    /// The f32 constants, as the ops' f32 `affine` receives them (`mul as f32`, `add as f32`).
    #[derive(Debug, Clone, Copy)]
    struct Consts32 {
        grad_scale: f32,
        b1: f32,
        one_b1: f32,
        b2: f32,
        one_b2: f32,
        inv_bc2: f32,
        eps: f32,
        step_size: f32,
        keep: f32,
    }

    impl Consts32 {
        fn new(h: &Hyper) -> Self {
            Consts32 {
                grad_scale: h.grad_scale as f32,
                b1: h.beta1 as f32,
                one_b1: (1.0 - h.beta1) as f32,
                b2: h.beta2 as f32,
                one_b2: (1.0 - h.beta2) as f32,
                inv_bc2: h.inv_bc2 as f32,
                eps: h.eps as f32,
                step_size: h.step_size as f32,
                keep: h.keep as f32,
            }
        }
    }

    /// One vector of the f32 update: `(p', m', v')`.
    #[inline(always)]
    unsafe fn lane<V: Vf32>(c: &Consts32, p: V, g: V, m: V, v: V) -> (V, V, V) {
        unsafe {
            let z = V::splat(0.0);
            let aff = |x: V, mul: f32, add: V| x.fma(V::splat(mul), add);
            let g = aff(g, c.grad_scale, z);
            let m = aff(m, c.b1, z).add(aff(g, c.one_b1, z));
            let v = aff(v, c.b2, z).add(aff(g.mul(g), c.one_b2, z));
            let denom = aff(aff(v, c.inv_bc2, z).sqrt(), 1.0, V::splat(c.eps));
            let p = aff(p, c.keep, z).sub(aff(m, c.step_size, z).div(denom));
            (p, m, v)
        }
    }

    /// The f32 update of `n` elements; `m`/`v` null means zero moments (the first step).
    struct AdamF32 {
        c: Consts32,
        p: *const f32,
        g: *const f32,
        m: *const f32,
        v: *const f32,
        out: [*mut f32; 3],
        n: usize,
    }

    impl Kernel for AdamF32 {
        type Output = bool;

        #[inline(always)]
        unsafe fn run<V: Vf32>(self) -> bool {
            let AdamF32 { c, p, g, m, v, out, n } = self;
            let l = V::LANES;
            unsafe {
                let z = V::splat(0.0);
                let load = |ptr: *const f32, i: usize| if ptr.is_null() { z } else { V::load(ptr.add(i)) };
                // `x - x` is 0 for finite x and NaN otherwise; the sum stays 0 iff all are finite.
                let mut acc = z;
                let mut i = 0;
                while i + l <= n {
                    let (np, nm, nv) = lane(&c, V::load(p.add(i)), V::load(g.add(i)), load(m, i), load(v, i));
                    np.store(out[0].add(i));
                    nm.store(out[1].add(i));
                    nv.store(out[2].add(i));
                    acc = acc.add(np.sub(np));
                    i += l;
                }
                let mut finite = acc.lanes()[..l].iter().all(|&x| x == 0.0);
                let rest = n - i;
                if rest > 0 {
                    // The tail through padded vectors: the same vector code, so the same bits.
                    let mut buf = [[0f32; 16]; 4];
                    for (b, ptr) in buf.iter_mut().zip([p, g, m, v]) {
                        if !ptr.is_null() {
                            std::ptr::copy_nonoverlapping(ptr.add(i), b.as_mut_ptr(), rest);
                        }
                    }
                    let [bp, bg, bm, bv] = buf.map(|b| V::load(b.as_ptr()));
                    let (np, nm, nv) = lane(&c, bp, bg, bm, bv);
                    for (x, o) in [np, nm, nv].into_iter().zip(out) {
                        let vals = x.lanes();
                        std::ptr::copy_nonoverlapping(vals.as_ptr(), o.add(i), rest);
                    }
                    finite &= np.lanes()[..rest].iter().all(|x| x.is_finite());
                }
                finite
            }
        }
    }
}
