//! HuggingFace checkpoints as moeba models.
//!
//! Two steps, both data to data (reading the directory, memory-mapping the safetensors files and
//! finding `tokenizer.json` is moeba-train's job):
//!
//! 1. [`HfSpec::from_config`]: a parsed `config.json` becomes a [`HybridConfig`] (which family,
//!    which mixer and FFN per layer, every size), with one line per mapped key for
//!    `moeba inspect`. A key moeba cannot honour (an unknown `rope_type`, an activation other than
//!    SiLU, …) is an error naming it, never silently ignored.
//! 2. [`load_weights`]: the checkpoint's tensors (any [`TensorSource`]) are renamed, stacked or
//!    split onto the parameters of a [`HybridModel`](crate::HybridModel) built from that config.
//!    Every parameter must be set and every tensor used: a missing, unexpected or misshapen
//!    tensor is an error naming it (and both shapes); nothing is left at its initial value.
//!
//! Families ([`HfFamily`]): `mamba`, `mamba2`, `mixtral`, `qwen2_moe`, `jamba`, `deepseek_v2`,
//! each in its own file with its `config` and `load` functions. Expert weights are accepted in
//! both layouts transformers uses: the on-disk one of the hub checkpoints (one tensor per expert
//! and projection) and the fused in-memory one of transformers 5 (`experts.gate_up_proj
//! (E, 2f, d)`, `experts.down_proj (E, d, f)`), see [`HfWeights::experts`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use moeba_kernels::ops;
use moeba_tensor::{DType, Error, Result, Tensor};
use serde_json::Value;

use crate::{HybridConfig, ParamStore};

mod deepseek_v2;
mod jamba;
mod json;
mod mamba;
mod mamba2;
mod mixtral;
mod qwen2_moe;

pub use json::{HfJson, HfRope};

/// The HF model families moeba loads (`model_type` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfFamily {
    /// `mamba` (MambaForCausalLM): Mamba-1 blocks, no FFN, tied head.
    Mamba,
    /// `mamba2` (Mamba2ForCausalLM): Mamba-2 blocks, no FFN.
    Mamba2,
    /// `mixtral` (MixtralForCausalLM): GQA attention with RoPE + top-k MoE.
    Mixtral,
    /// `qwen2_moe` (Qwen2MoeForCausalLM): attention with qkv bias + MoE with a gated shared expert.
    Qwen2Moe,
    /// `jamba` (JambaForCausalLM): Mamba and attention layers, MLP and MoE FFNs by period/offset.
    Jamba,
    /// `deepseek_v2` (DeepseekV2ForCausalLM): MLA + MoE with shared experts, group-limited routing.
    DeepseekV2,
}

impl HfFamily {
    /// Every family, in the order above.
    pub const ALL: [HfFamily; 6] = [
        HfFamily::Mamba,
        HfFamily::Mamba2,
        HfFamily::Mixtral,
        HfFamily::Qwen2Moe,
        HfFamily::Jamba,
        HfFamily::DeepseekV2,
    ];

    /// The family of a `model_type` string, or an error listing the supported ones.
    pub fn from_model_type(model_type: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|f| f.model_type() == model_type).ok_or_else(|| {
            Error::Msg(format!(
                "HF config: model_type `{model_type}` is not supported; moeba loads {}",
                Self::ALL.map(|f| f.model_type()).join(", ")
            ))
        })
    }

    /// The `model_type` string of this family.
    pub fn model_type(self) -> &'static str {
        match self {
            HfFamily::Mamba => "mamba",
            HfFamily::Mamba2 => "mamba2",
            HfFamily::Mixtral => "mixtral",
            HfFamily::Qwen2Moe => "qwen2_moe",
            HfFamily::Jamba => "jamba",
            HfFamily::DeepseekV2 => "deepseek_v2",
        }
    }
}

/// An HF `config.json` mapped onto moeba: the family, the model config and how it was derived.
#[derive(Debug, Clone, PartialEq)]
pub struct HfSpec {
    /// The model family.
    pub family: HfFamily,
    /// The moeba model config (build the model with `HybridModel::new(&store.root(), &config)`).
    pub config: HybridConfig,
    /// One line per mapped key, `hf_key = value -> moeba meaning`, for `moeba inspect`.
    pub mapping: Vec<String>,
    /// `bos_token_id`, when the config has one.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (a number or a list), empty when absent.
    pub eos_token_ids: Vec<u32>,
}

impl HfSpec {
    /// Maps a parsed `config.json`. Errors name the key that is missing, mistyped or unsupported.
    pub fn from_config(json: &Value) -> Result<Self> {
        let mut c = HfJson::new(json)?;
        let family = HfFamily::from_model_type(&c.str("model_type")?)?;
        let config = match family {
            HfFamily::Mamba => mamba::config(&mut c)?,
            HfFamily::Mamba2 => mamba2::config(&mut c)?,
            HfFamily::Mixtral => mixtral::config(&mut c)?,
            HfFamily::Qwen2Moe => qwen2_moe::config(&mut c)?,
            HfFamily::Jamba => jamba::config(&mut c)?,
            HfFamily::DeepseekV2 => deepseek_v2::config(&mut c)?,
        };
        let bos_token_id = c.opt_usize("bos_token_id")?.map(|v| v as u32);
        let eos_token_ids = c.token_ids("eos_token_id")?;
        Ok(HfSpec { family, config, mapping: c.into_mapping(), bos_token_id, eos_token_ids })
    }
}

/// Named tensors of a checkpoint, read on demand (a map in memory, memory-mapped files, …).
pub trait TensorSource {
    /// Every tensor name, sorted.
    fn names(&self) -> Vec<String>;
    /// The shape of `name`, if present (without reading its data).
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The tensor `name` converted to f32 (from f32, bf16 or f16), or an error.
    fn get(&self, name: &str) -> Result<Tensor>;
}

impl TensorSource for HashMap<String, Tensor> {
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.keys().cloned().collect();
        v.sort();
        v
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.get(name).map(|t| t.dims().to_vec())
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        let t = HashMap::get(self, name)
            .ok_or_else(|| Error::Msg(format!("the checkpoint has no tensor `{name}`")))?;
        if t.dtype() == DType::F32 {
            Ok(t.clone())
        } else {
            t.to_dtype(DType::F32)
        }
    }
}

/// What [`load_weights`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Checkpoint tensors read.
    pub tensors_read: usize,
    /// moeba parameters set.
    pub params_set: usize,
    /// Checkpoint tensors deliberately skipped (a non-persistent buffer, a tied head equal to the
    /// embedding), with the reason.
    pub skipped: Vec<(String, String)>,
}

/// Sets every parameter of `store` (built by `HybridModel::new(&store.root(), &spec.config)`)
/// from `src`, by the family's mapping. Errors name the tensor (and both shapes); on success
/// every parameter was set and every tensor of `src` was used or deliberately skipped.
pub fn load_weights(spec: &HfSpec, store: &ParamStore, src: &dyn TensorSource) -> Result<LoadReport> {
    let mut w = HfWeights::new(store, src);
    match spec.family {
        HfFamily::Mamba => mamba::load(&spec.config, &mut w)?,
        HfFamily::Mamba2 => mamba2::load(&spec.config, &mut w)?,
        HfFamily::Mixtral => mixtral::load(&spec.config, &mut w)?,
        HfFamily::Qwen2Moe => qwen2_moe::load(&spec.config, &mut w)?,
        HfFamily::Jamba => jamba::load(&spec.config, &mut w)?,
        HfFamily::DeepseekV2 => deepseek_v2::load(&spec.config, &mut w)?,
    }
    w.finish(spec.family)
}

/// The loader's bookkeeping: reads checkpoint tensors, sets moeba parameters, and remembers both
/// so that [`HfWeights::finish`] can report what was missed. Family `load` functions use it.
pub struct HfWeights<'a> {
    store: &'a ParamStore,
    src: &'a dyn TensorSource,
    used: BTreeSet<String>,
    set: BTreeSet<String>,
    skipped: Vec<(String, String)>,
}

impl<'a> HfWeights<'a> {
    /// Bookkeeping for loading `src` into `store`.
    pub fn new(store: &'a ParamStore, src: &'a dyn TensorSource) -> Self {
        HfWeights { store, src, used: BTreeSet::new(), set: BTreeSet::new(), skipped: Vec::new() }
    }

    /// Whether the checkpoint has `hf`.
    pub fn has(&self, hf: &str) -> bool {
        self.src.shape(hf).is_some()
    }

    /// Reads `hf` (as f32) and marks it used. A missing tensor is an error naming it.
    pub fn take(&mut self, hf: &str) -> Result<Tensor> {
        if !self.has(hf) {
            return Err(Error::Msg(format!("HF checkpoint: tensor `{hf}` is missing")));
        }
        let t = self.src.get(hf)?;
        self.used.insert(hf.to_string());
        Ok(t)
    }

    /// Marks `hf` as deliberately unused (a non-persistent buffer saved by an old exporter, …).
    pub fn skip(&mut self, hf: &str, why: &str) {
        if self.has(hf) {
            self.used.insert(hf.to_string());
            self.skipped.push((hf.to_string(), why.to_string()));
        }
    }

    /// Sets moeba parameter `name` to `t`, read from `from` (named in errors). The shapes must
    /// agree up to size-1 axes (`conv1d.weight (C, 1, K)` fills `(C, K)`); otherwise an error
    /// names both tensors and shapes.
    pub fn set(&mut self, name: &str, t: Tensor, from: &str) -> Result<()> {
        let param = self.store.get(name).ok_or_else(|| {
            Error::Msg(format!(
                "HF checkpoint: tensor `{from}` maps to `{name}`, which this model does not have"
            ))
        })?;
        let want = param.tensor().dims().to_vec();
        let squeeze = |d: &[usize]| d.iter().copied().filter(|&n| n != 1).collect::<Vec<_>>();
        if t.dims() != want.as_slice() && squeeze(t.dims()) != squeeze(&want) {
            return Err(Error::Msg(format!(
                "HF checkpoint: tensor `{from}` has shape {:?} but moeba's `{name}` is {:?}",
                t.dims(),
                want
            )));
        }
        let t = if t.dims() == want.as_slice() { t } else { t.contiguous()?.reshape(want)? };
        param.set(t.to_dtype(param.tensor().dtype())?.contiguous()?)?;
        if !self.set.insert(name.to_string()) {
            return Err(Error::Msg(format!("HF checkpoint: moeba's `{name}` was set twice (from `{from}`)")));
        }
        Ok(())
    }

    /// [`HfWeights::take`] then [`HfWeights::set`]: the common one-to-one (renamed) tensor.
    pub fn copy(&mut self, hf: &str, name: &str) -> Result<()> {
        let t = self.take(hf)?;
        self.set(name, t, hf)
    }

    /// Copies every tensor under `hf_prefix.` to the same suffix under `moeba_prefix.`
    /// (`model.layers.0.self_attn` → `model.layers.0.self_attn`), for the parts of a layer whose
    /// names already agree. Returns how many were copied.
    pub fn copy_prefix(&mut self, hf_prefix: &str, moeba_prefix: &str) -> Result<usize> {
        let pre = format!("{hf_prefix}.");
        let names: Vec<String> = self.src.names().into_iter().filter(|n| n.starts_with(&pre)).collect();
        for n in &names {
            let target = format!("{moeba_prefix}.{}", &n[pre.len()..]);
            self.copy(n, &target)?;
        }
        Ok(names.len())
    }

    /// Loads the routed experts of one MoE layer into moeba's `{moeba}.experts.gate_up_proj
    /// (E, 2f, d)` and `{moeba}.experts.down_proj (E, d, f)`. Accepts the fused transformers-5
    /// layout (`{hf}.experts.gate_up_proj`, `{hf}.experts.down_proj`) or the per-expert on-disk
    /// one, `{hf}.experts.{e}.{gate}.weight (f, d)`, `.{up}.weight (f, d)`, `.{down}.weight (d, f)`
    /// with the family's projection names (`gate_proj/up_proj/down_proj`, Mixtral's `w1/w3/w2`).
    pub fn experts(
        &mut self,
        hf: &str,
        moeba: &str,
        num_experts: usize,
        [gate, up, down]: [&str; 3],
    ) -> Result<()> {
        let (fused_gu, fused_dn) = (format!("{hf}.experts.gate_up_proj"), format!("{hf}.experts.down_proj"));
        let (dst_gu, dst_dn) =
            (format!("{moeba}.experts.gate_up_proj"), format!("{moeba}.experts.down_proj"));
        if self.has(&fused_gu) || self.has(&fused_dn) {
            self.copy(&fused_gu, &dst_gu)?;
            return self.copy(&fused_dn, &dst_dn);
        }
        let mut gate_up = Vec::with_capacity(num_experts);
        let mut downs = Vec::with_capacity(num_experts);
        // moeba's per-expert shapes, (f, d) for gate/up and (d, f) for down, so that a misshapen
        // expert tensor is named with both shapes (rather than failing in the stack).
        let dims = |name: &str| self.store.get(name).map(|p| p.tensor().dims().to_vec());
        let want_gu = dims(&dst_gu).filter(|s| s.len() == 3).map(|s| vec![s[1] / 2, s[2]]);
        let want_dn = dims(&dst_dn).filter(|s| s.len() == 3).map(|s| vec![s[1], s[2]]);
        let check = |name: &str, t: &Tensor, want: &Option<Vec<usize>>, param: &str| {
            match want {
                Some(w) if t.dims() != w.as_slice() => Err(Error::Msg(format!(
                    "HF checkpoint: tensor `{name}` has shape {:?} but moeba's `{param}` expects {w:?} per expert",
                    t.dims()
                ))),
                _ => Ok(()),
            }
        };
        for e in 0..num_experts {
            let p = format!("{hf}.experts.{e}");
            let g = self.take(&format!("{p}.{gate}.weight"))?;
            check(&format!("{p}.{gate}.weight"), &g, &want_gu, &dst_gu)?;
            let u = self.take(&format!("{p}.{up}.weight"))?;
            check(&format!("{p}.{up}.weight"), &u, &want_gu, &dst_gu)?;
            if g.dims() != u.dims() {
                return Err(Error::Msg(format!(
                    "HF checkpoint: `{p}.{gate}.weight` is {:?} but `{p}.{up}.weight` is {:?}",
                    g.dims(),
                    u.dims()
                )));
            }
            gate_up.push(ops::concat(&[&g, &u], 0)?);
            let dn = self.take(&format!("{p}.{down}.weight"))?;
            check(&format!("{p}.{down}.weight"), &dn, &want_dn, &dst_dn)?;
            downs.push(dn);
        }
        let extra = format!("{hf}.experts.{num_experts}.{gate}.weight");
        if self.has(&extra) {
            return Err(Error::Msg(format!(
                "HF checkpoint: `{extra}` is present but the config has only {num_experts} experts"
            )));
        }
        let gu = ops::stack(&gate_up.iter().collect::<Vec<_>>(), 0)?;
        let dn = ops::stack(&downs.iter().collect::<Vec<_>>(), 0)?;
        self.set(&dst_gu, gu, &format!("{hf}.experts.*.{{{gate},{up}}}.weight"))?;
        self.set(&dst_dn, dn, &format!("{hf}.experts.*.{down}.weight"))
    }

    /// Checks that every parameter was set and every tensor used or skipped.
    pub fn finish(self, family: HfFamily) -> Result<LoadReport> {
        let unset: Vec<String> = self
            .store
            .params()
            .iter()
            .map(|p| p.name().to_string())
            .filter(|n| !self.set.contains(n))
            .collect();
        if !unset.is_empty() {
            return Err(Error::Msg(format!(
                "HF checkpoint ({}): {} moeba parameter(s) got no value: {}",
                family.model_type(),
                unset.len(),
                list(&unset)
            )));
        }
        let unused: Vec<String> = self.src.names().into_iter().filter(|n| !self.used.contains(n)).collect();
        if !unused.is_empty() {
            return Err(Error::Msg(format!(
                "HF checkpoint ({}): {} unexpected tensor(s) that moeba's {} mapping does not use: {}",
                family.model_type(),
                unused.len(),
                family.model_type(),
                list(&unused)
            )));
        }
        Ok(LoadReport { tensors_read: self.used.len(), params_set: self.set.len(), skipped: self.skipped })
    }
}

/// The first few names of a list, for an error message.
fn list(names: &[String]) -> String {
    const SHOW: usize = 8;
    let mut s = names.iter().take(SHOW).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    if names.len() > SHOW {
        s.push_str(&format!(" and {} more", names.len() - SHOW));
    }
    s
}

/// Shapes of the tensors a [`TensorSource`] holds, by name (for `moeba inspect`).
pub fn source_shapes(src: &dyn TensorSource) -> BTreeMap<String, Vec<usize>> {
    src.names().into_iter().filter_map(|n| src.shape(&n).map(|s| (n, s))).collect()
}
