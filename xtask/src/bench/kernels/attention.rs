//! RoPE and causal GQA attention (forward, forward+backward), MLA vs GQA decode.
//!
//! `attention`: causal GQA attention, f32; case dims `[b, hq, hkv, l, d]` (self-attention,
//! lq = lk = l, dk = dv = d, scale `1/√d`). Variants:
//! - 0: `ops::attention` (tiled online softmax), contiguous `(b, h, l, d)` inputs;
//! - 1: the same with q, k, v as transposed views of `(b, l, h, d)` tensors (what a layer's
//!   projections give; read in place);
//! - 2: forward and `ops::attention_backward`; the compared output is `grad_q` (grad_k and grad_v
//!   are computed, and checked against the reference by the kernel tests).
//!
//! Reference: sampled query rows of every head (the first, second, a third in, the last), each
//! computed alone in f64 (`O(l·d)` per row, so the largest cases stay cheap): the output row, and
//! for variant 2 `grad_q_i = scale Σ_j P_ij (dP_ij - Δ_i) k_j` with `dP_ij = dO_i·v_j`,
//! `Δ_i = Σ_j P_ij dP_ij`. Cost: `4 · hq · d · l(l+1)/2` FLOPs for the forward (two products over
//! the causal half), 2.5 times that more for the backward (five products, one of them the
//! recomputed `QKᵀ`); bytes: q, k, v (and dO) read, out (and the grads) written once.
//!
//! `attn_decode`: one decoding step of the GQA, MHA and MLA (absorbed) layers of moeba-nn at
//! the same width and context, with their caches; see [`AttentionDecode`].

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{bail, Result};
use moeba_kernels::ops::{self, AttentionOptions};
use moeba_nn::mla::{Mla, MlaCache, MlaConfig};
use moeba_nn::{Attention as AttentionLayer, AttentionConfig, KvCache, ParamStore, RopeConfig};
use moeba_tensor::{DType, Device, Tensor};

use super::on_device;
use crate::bench::harness::{rtol_for, Bound, Case, Cost, Expected, Kernel, Size, Variant};

/// The causal GQA attention benchmark (see the module docs).
pub struct Attention;

/// `[b, hq, hkv, l, d]` of a case.
fn dims(case: &Case) -> Result<[usize; 5]> {
    let mut d = [0; 5];
    for (i, x) in d.iter_mut().enumerate() {
        *x = case.dim("attention", i)?;
    }
    if d[2] == 0 || d[1] % d[2] != 0 {
        bail!("attention: case {} has hq not a multiple of hkv", case.label());
    }
    Ok(d)
}

fn opts(d: usize) -> AttentionOptions {
    AttentionOptions::causal(d)
}

impl Kernel for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant::cpu_only(0, "ops::attention fwd, tiled"),
            Variant::cpu_only(1, "ops::attention fwd, (b,l,h,d) views"),
            Variant::cpu_only(2, "fwd + ops::attention_backward"),
        ]
    }

    fn cases(&self, size: Size) -> Vec<Case> {
        let dims: &[[usize; 5]] = match size {
            Size::Full => {
                &[[1, 8, 4, 512, 64], [1, 8, 4, 1024, 64], [1, 8, 4, 2048, 64], [1, 8, 4, 4096, 64]]
            }
            Size::Quick => &[[1, 8, 4, 256, 64], [2, 4, 1, 130, 48]],
            Size::Tiny => &[[1, 2, 1, 17, 8], [1, 4, 2, 5, 6]],
        };
        dims.iter().map(|d| Case::f32(d)).collect()
    }

    fn bound(&self) -> Bound {
        Bound::Compute
    }

    fn cost(&self, variant: usize, case: &Case) -> Cost {
        let Ok([b, hq, hkv, l, d]) = dims(case) else { return Cost::default() };
        let pairs = (l * (l + 1) / 2) as f64;
        let fwd = 4.0 * (b * hq * d) as f64 * pairs;
        let e = case.dtype.size_in_bytes() as f64;
        let io_fwd = ((2 * b * hq * l * d) + 2 * b * hkv * l * d) as f64 * e;
        if variant == 2 {
            Cost { flops: Some(3.5 * fwd), bytes: Some(io_fwd * 2.0 + (b * hq * l * d) as f64 * e) }
        } else {
            Cost { flops: Some(fwd), bytes: Some(io_fwd) }
        }
    }

    fn setup(&self, case: &Case, device: &Device) -> Result<Vec<Tensor>> {
        let [b, hq, hkv, l, d] = dims(case)?;
        let cpu = Device::Cpu;
        let r = |s: u64, dd: [usize; 4]| Tensor::randn(s, dd.as_slice(), 0.0, 1.0, case.dtype, &cpu);
        // (b, l, h, d) storage; the kernel inputs are its (b, h, l, d) views or copies.
        let (q, k, v, g) =
            (r(1, [b, l, hq, d])?, r(2, [b, l, hkv, d])?, r(3, [b, l, hkv, d])?, r(4, [b, l, hq, d])?);
        let t = |x: &Tensor| -> Result<Tensor> { Ok(x.transpose(1, 2)?.contiguous()?) };
        on_device(&[t(&q)?, t(&k)?, t(&v)?, t(&g)?, q, k, v], device)
    }

    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [q, k, v, g, ql, kl, vl] = inputs else {
            bail!("attention: expected 7 inputs, got {}", inputs.len())
        };
        let o = opts(q.dims()[3]);
        Ok(match variant {
            0 => vec![ops::attention(q, k, v, &o)?.out],
            1 => {
                let (qv, kv, vv) = (ql.transpose(1, 2)?, kl.transpose(1, 2)?, vl.transpose(1, 2)?);
                vec![ops::attention(&qv, &kv, &vv, &o)?.out]
            }
            2 => {
                let fwd = ops::attention(q, k, v, &o)?;
                let (dq, _dk, _dv) = ops::attention_backward(q, k, v, &fwd, g, &o)?;
                vec![dq]
            }
            x => bail!("attention: no variant {x}"),
        })
    }

    fn reference(&self, variant: usize, case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
        let [b, hq, hkv, l, d] = dims(case)?;
        let (q, k, v, g) = (
            inputs[0].to_vec_f64()?,
            inputs[1].to_vec_f64()?,
            inputs[2].to_vec_f64()?,
            inputs[3].to_vec_f64()?,
        );
        let scale = opts(d).scale;
        let rep = hq / hkv;
        let mut rows: Vec<usize> = vec![0, 1.min(l - 1), l / 3, l - 1];
        rows.sort_unstable();
        rows.dedup();
        let (mut indices, mut values, mut scales) = (Vec::new(), Vec::new(), Vec::new());
        for bi in 0..b {
            for h in 0..hq {
                let kv = (bi * hkv + h / rep) * l;
                for &i in &rows {
                    let qi = &q[((bi * hq + h) * l + i) * d..][..d];
                    let gi = &g[((bi * hq + h) * l + i) * d..][..d];
                    let krow = |j: usize| &k[(kv + j) * d..(kv + j + 1) * d];
                    let vrow = |j: usize| &v[(kv + j) * d..(kv + j + 1) * d];
                    let s: Vec<f64> = (0..=i)
                        .map(|j| scale * qi.iter().zip(krow(j)).map(|(a, b)| a * b).sum::<f64>())
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let tot: f64 = e.iter().sum();
                    let p: Vec<f64> = e.iter().map(|x| x / tot).collect();
                    let (vals, scl): (Vec<f64>, Vec<f64>) = if variant == 2 {
                        let dp: Vec<f64> =
                            (0..=i).map(|j| gi.iter().zip(vrow(j)).map(|(a, b)| a * b).sum()).collect();
                        let delta: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                        (0..d)
                            .map(|t| {
                                let terms = (0..=i).map(|j| scale * p[j] * (dp[j] - delta) * krow(j)[t]);
                                let abs: f64 = (0..=i)
                                    .map(|j| (scale * p[j] * (dp[j].abs() + delta.abs()) * krow(j)[t]).abs())
                                    .sum();
                                (terms.sum::<f64>(), abs.max(1e-3))
                            })
                            .unzip()
                    } else {
                        (0..d)
                            .map(|t| {
                                let val = (0..=i).map(|j| p[j] * vrow(j)[t]).sum::<f64>();
                                let abs = (0..=i).map(|j| (p[j] * vrow(j)[t]).abs()).sum::<f64>();
                                (val, abs.max(1e-3))
                            })
                            .unzip()
                    };
                    indices.extend((0..d).map(|t| ((bi * hq + h) * l + i) * d + t));
                    values.extend(vals);
                    scales.extend(scl);
                }
            }
        }
        Ok(vec![Expected {
            dims: vec![b, hq, l, d],
            values,
            indices: Some(indices),
            scale: Some(scales),
            rtol: rtol_for(case.dtype, 2e-5),
            atol: 1e-6,
        }])
    }

    fn reference_key(&self, variant: usize) -> usize {
        usize::from(variant == 2)
    }
}

// ------------------------------------------------------------------ decode step: MLA vs GQA (C2)

/// One decoding step of an attention layer at context `ctx`; case dims `[d_model, ctx]`, heads of
/// 64 (`d_model / 64` of them), batch 1, f32.
///
/// Variants (different layers, so each has its own reference):
/// - 0: GQA, `Attention::forward_step`, kv heads = heads / 4: the cache holds
///   `2 · (heads/4) · 64` numbers per token;
/// - 1: MHA, the same with kv heads = heads: `2 · heads · 64` per token;
/// - 2: MLA, `Mla::forward_step` (absorbed form), kv latent `d_model / 4`, rope 32, nope 64,
///   v 64, no q latent (DeepSeek-V2-Lite proportions): `d_model/4 + 32` per token.
///
/// `setup` builds the three layers and prefills a cache of `ctx` tokens for each; every timed
/// call truncates the cache back to `ctx` (O(1)) and decodes one more token. Reference: the
/// layer's full forward without a cache over `ctx + 1` tokens in f64 (the naive form for MLA),
/// last row. Counted traffic: the layer's weights and the cache, read once.
pub struct AttentionDecode {
    state: Mutex<HashMap<(usize, usize), Vec<DecodeLayer>>>,
}

impl Default for AttentionDecode {
    fn default() -> Self {
        AttentionDecode { state: Mutex::new(HashMap::new()) }
    }
}

/// A layer of one decode variant with its store and prefilled cache.
struct DecodeLayer {
    store: ParamStore,
    layer: DecodeKind,
}

enum DecodeKind {
    Gqa(Box<AttentionLayer>, KvCache),
    Mla(Box<Mla>, MlaCache),
}

/// The GQA (`kv_div` = 4) or MHA (`kv_div` = 1) config of a decode case.
fn decode_gqa_config(d: usize, kv_div: usize) -> AttentionConfig {
    let h = (d / 64).max(1);
    AttentionConfig::new(d, h, (h / kv_div).max(1), 64)
}

/// The MLA config of a decode case.
fn decode_mla_config(d: usize) -> MlaConfig {
    MlaConfig {
        d_model: d,
        num_heads: (d / 64).max(1),
        q_latent_dim: None,
        kv_latent_dim: (d / 4).max(1),
        qk_nope_head_dim: 64,
        d_rope: 32,
        v_head_dim: 64,
        rope: RopeConfig::interleaved(10000.0),
        norm_eps: 1e-6,
        softmax_scale: None,
    }
}

/// Builds decode variant `variant` at width `d` in `dtype` under a fresh store.
fn decode_layer(variant: usize, d: usize, dtype: DType) -> Result<(ParamStore, DecodeKindNoCache)> {
    let store = ParamStore::new(dtype, Device::Cpu, 41);
    let layer = match variant {
        0 | 1 => {
            let cfg = decode_gqa_config(d, if variant == 0 { 4 } else { 1 });
            DecodeKindNoCache::Gqa(Box::new(AttentionLayer::new(&store.root().pp("attn"), &cfg)?))
        }
        2 => DecodeKindNoCache::Mla(Box::new(Mla::new(&store.root().pp("attn"), &decode_mla_config(d))?)),
        v => bail!("attn_decode: no variant {v}"),
    };
    Ok((store, layer))
}

enum DecodeKindNoCache {
    Gqa(Box<AttentionLayer>),
    Mla(Box<Mla>),
}

impl Kernel for AttentionDecode {
    fn name(&self) -> &'static str {
        "attn_decode"
    }

    fn variants(&self) -> Vec<Variant> {
        vec![
            Variant::cpu_only(0, "GQA step, kv heads h/4: 2(h/4)64 per token"),
            Variant::cpu_only(1, "MHA step, kv heads h: 2h64 per token"),
            Variant::cpu_only(2, "MLA step, absorbed: d/4+32 per token"),
        ]
    }

    fn cases(&self, size: Size) -> Vec<Case> {
        let dims: &[[usize; 2]] = match size {
            Size::Full => &[[1024, 512], [1024, 2048]],
            Size::Quick => &[[256, 100]],
            Size::Tiny => &[[128, 9]],
        };
        dims.iter().map(|d| Case::f32(d)).collect()
    }

    fn bound(&self) -> Bound {
        Bound::Memory
    }

    fn reference_key(&self, variant: usize) -> usize {
        variant
    }

    fn cost(&self, variant: usize, case: &Case) -> Cost {
        let (d, ctx) = (case.dims[0], case.dims[1] + 1);
        let h = (d / 64).max(1);
        let (weights, cache, attn_flops) = match variant {
            0 | 1 => {
                let kv = if variant == 0 { (h / 4).max(1) } else { h };
                (2 * d * h * 64 + 2 * d * kv * 64, 2 * kv * 64 * ctx, 4 * h * ctx * 64)
            }
            _ => {
                let c = decode_mla_config(d);
                let (r, dr) = (c.kv_latent_dim, c.d_rope);
                let w = d * h * 96 + d * (r + dr) + r * h * 128 + h * 64 * d;
                (w, (r + dr) * ctx, 2 * h * ctx * (2 * r + dr))
            }
        };
        let bytes = ((weights + cache) * case.dtype.size_in_bytes()) as f64;
        Cost { flops: Some((2 * weights + attn_flops) as f64), bytes: Some(bytes) }
    }

    fn setup(&self, case: &Case, device: &Device) -> Result<Vec<Tensor>> {
        if !device.is_cpu() {
            bail!("attn_decode: the decode benchmark runs on the CPU (the attention kernels are CPU-only)");
        }
        let (d, ctx) = (case.dim("attn_decode", 0)?, case.dim("attn_decode", 1)?);
        let prefix = Tensor::randn(3, [1, ctx, d].as_slice(), 0.0, 1.0, case.dtype, &Device::Cpu)?;
        let step = Tensor::randn(4, [1, 1, d].as_slice(), 0.0, 1.0, case.dtype, &Device::Cpu)?;
        let mut layers = Vec::new();
        for variant in 0..3 {
            let (store, layer) = decode_layer(variant, d, case.dtype)?;
            let layer = match layer {
                DecodeKindNoCache::Gqa(a) => {
                    let mut cache = a.new_cache(1, ctx + 1)?;
                    a.forward_step(&prefix, &mut cache)?;
                    DecodeKind::Gqa(a, cache)
                }
                DecodeKindNoCache::Mla(m) => {
                    let mut cache = m.new_cache(1, ctx + 1)?;
                    m.forward_step(&prefix, &mut cache)?;
                    DecodeKind::Mla(m, cache)
                }
            };
            layers.push(DecodeLayer { store, layer });
        }
        self.state
            .lock()
            .map_err(|_| anyhow::anyhow!("attn_decode: state poisoned"))?
            .insert((d, ctx), layers);
        Ok(vec![prefix, step])
    }

    fn run(&self, variant: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let [prefix, step] = inputs else { bail!("attn_decode: expected 2 inputs, got {}", inputs.len()) };
        let (ctx, d) = (prefix.dims()[1], prefix.dims()[2]);
        let mut state = self.state.lock().map_err(|_| anyhow::anyhow!("attn_decode: state poisoned"))?;
        let Some(layer) = state.get_mut(&(d, ctx)).and_then(|v| v.get_mut(variant)) else {
            bail!("attn_decode: variant {variant} of [{d}, {ctx}] was not set up");
        };
        let out = match &mut layer.layer {
            DecodeKind::Gqa(a, cache) => {
                cache.truncate(ctx)?;
                a.forward_step(step, cache)?
            }
            DecodeKind::Mla(m, cache) => {
                cache.truncate(ctx)?;
                m.forward_step(step, cache)?
            }
        };
        Ok(vec![out])
    }

    fn reference(&self, variant: usize, case: &Case, inputs: &[Tensor]) -> Result<Vec<Expected>> {
        let [prefix, step] = inputs else { bail!("attn_decode: expected 2 inputs, got {}", inputs.len()) };
        let (ctx, d) = (prefix.dims()[1], prefix.dims()[2]);
        // The same weights in f64.
        let (store64, layer64) = decode_layer(variant, d, DType::F64)?;
        {
            let state = self.state.lock().map_err(|_| anyhow::anyhow!("attn_decode: state poisoned"))?;
            let Some(src) = state.get(&(d, ctx)).and_then(|v| v.get(variant)) else {
                bail!("attn_decode: variant {variant} of [{d}, {ctx}] was not set up");
            };
            for p in store64.params() {
                let Some(s) = src.store.get(p.name()) else {
                    bail!("attn_decode: no parameter {}", p.name())
                };
                p.set(s.tensor().to_dtype(DType::F64)?)?;
            }
        }
        let x = ops::concat(&[&prefix.to_dtype(DType::F64)?, &step.to_dtype(DType::F64)?], 1)?;
        let _guard = moeba_autograd::no_grad();
        let x = moeba_autograd::Var::constant(x);
        let full = match layer64 {
            DecodeKindNoCache::Gqa(a) => a.forward(&x)?,
            DecodeKindNoCache::Mla(m) => m.forward(&x)?,
        };
        let last = full.tensor().narrow(1, ctx, 1)?.to_vec_f64()?;
        let scale = last.iter().fold(0f64, |m, v| m.max(v.abs()));
        let n = last.len();
        Ok(vec![Expected {
            dims: vec![1, 1, case.dims[0]],
            values: last,
            indices: None,
            scale: Some(vec![scale; n]),
            rtol: rtol_for(case.dtype, 1e-4),
            atol: 1e-12,
        }])
    }
}
