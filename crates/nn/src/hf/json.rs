//! [`HfJson`]: typed reads of an HF `config.json` whose errors name the key, and the record of
//! what was read (the mapping `moeba inspect` prints).

use moeba_tensor::{Error, Result};
use serde_json::Value;

use moeba_kernels::ops::{yarn_mscale, RopeScaling, YarnScaling};

/// A parsed `config.json` object. Every getter records `key = value` in the mapping; errors
/// name the key, what was found and what was expected.
#[derive(Debug)]
pub struct HfJson<'a> {
    obj: &'a serde_json::Map<String, Value>,
    mapping: Vec<String>,
}

impl<'a> HfJson<'a> {
    /// Wraps `v`, which must be a JSON object.
    pub fn new(v: &'a Value) -> Result<Self> {
        let obj =
            v.as_object().ok_or_else(|| Error::Msg("HF config: config.json is not a JSON object".into()))?;
        Ok(HfJson { obj, mapping: Vec::new() })
    }

    /// The raw value of `key` (not recorded), `None` when absent or `null`.
    pub fn raw(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn record(&mut self, key: &str, v: &Value) {
        self.mapping.push(format!("{key} = {v}"));
    }

    /// Adds a line to the mapping (what a value became in moeba).
    pub fn note(&mut self, line: impl Into<String>) {
        self.mapping.push(line.into());
    }

    /// The mapping lines, in the order they were read.
    pub fn into_mapping(self) -> Vec<String> {
        self.mapping
    }

    fn bad(key: &str, v: &Value, want: &str) -> Error {
        Error::Msg(format!("HF config: `{key}` is {v}, expected {want}"))
    }

    fn missing(key: &str) -> Error {
        Error::Msg(format!("HF config: required key `{key}` is missing"))
    }

    /// A required string.
    pub fn str(&mut self, key: &str) -> Result<String> {
        self.opt_str(key)?.ok_or_else(|| Self::missing(key))
    }

    /// An optional string.
    pub fn opt_str(&mut self, key: &str) -> Result<Option<String>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => {
                let s = v.as_str().ok_or_else(|| Self::bad(key, v, "a string"))?.to_string();
                self.record(key, v);
                Ok(Some(s))
            }
        }
    }

    /// A required non-negative integer.
    pub fn usize(&mut self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| Self::missing(key))
    }

    /// An optional non-negative integer.
    pub fn opt_usize(&mut self, key: &str) -> Result<Option<usize>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => {
                let n = v.as_u64().ok_or_else(|| Self::bad(key, v, "a non-negative integer"))? as usize;
                self.record(key, v);
                Ok(Some(n))
            }
        }
    }

    /// A non-negative integer, or `default` when absent.
    pub fn usize_or(&mut self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    /// A required number.
    pub fn f64(&mut self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| Self::missing(key))
    }

    /// An optional number.
    pub fn opt_f64(&mut self, key: &str) -> Result<Option<f64>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => {
                let n = v.as_f64().ok_or_else(|| Self::bad(key, v, "a number"))?;
                self.record(key, v);
                Ok(Some(n))
            }
        }
    }

    /// A number, or `default` when absent.
    pub fn f64_or(&mut self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    /// A boolean, or `default` when absent.
    pub fn bool_or(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => {
                let b = v.as_bool().ok_or_else(|| Self::bad(key, v, "true or false"))?;
                self.record(key, v);
                Ok(b)
            }
        }
    }

    /// A list of non-negative integers (empty when absent).
    pub fn usize_list(&mut self, key: &str) -> Result<Vec<usize>> {
        match self.raw(key) {
            None => Ok(Vec::new()),
            Some(v) => {
                let arr = v.as_array().ok_or_else(|| Self::bad(key, v, "a list of integers"))?;
                let out = arr
                    .iter()
                    .map(|x| {
                        x.as_u64().map(|n| n as usize).ok_or_else(|| Self::bad(key, v, "a list of integers"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                self.record(key, v);
                Ok(out)
            }
        }
    }

    /// A token id or a list of them (`eos_token_id`), empty when absent.
    pub fn token_ids(&mut self, key: &str) -> Result<Vec<u32>> {
        match self.raw(key) {
            None => Ok(Vec::new()),
            Some(v) if v.is_array() => Ok(self.usize_list(key)?.into_iter().map(|n| n as u32).collect()),
            Some(_) => Ok(vec![self.usize(key)? as u32]),
        }
    }

    /// Checks that the string `key` (default `default` when absent) is one of `allowed`; an
    /// error names the key, the value and what moeba supports.
    pub fn expect_str(&mut self, key: &str, default: &str, allowed: &[&str]) -> Result<String> {
        let s = self.opt_str(key)?.unwrap_or_else(|| default.to_string());
        if !allowed.contains(&s.as_str()) {
            return Err(Error::Msg(format!(
                "HF config: `{key}` = \"{s}\" is not supported; moeba supports {}",
                allowed.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(s)
    }

    /// RoPE's base and scaling: `rope_parameters` (transformers 5: `rope_type`, `rope_theta` and
    /// the scaling keys in one object) or `rope_scaling` + `rope_theta` (older configs); base
    /// `default_theta` when none is given. `rope_type` `"default"` (or no scaling) is plain RoPE,
    /// `"yarn"` is [`YarnScaling`] with HF's defaults and derivations; any other type is an error
    /// naming it.
    pub fn rope(&mut self, default_theta: f64) -> Result<HfRope> {
        let params = match self.raw("rope_parameters") {
            Some(p) => Some((
                "rope_parameters",
                p.as_object().ok_or_else(|| Self::bad("rope_parameters", p, "an object"))?,
            )),
            None => match self.raw("rope_scaling") {
                Some(p) => Some((
                    "rope_scaling",
                    p.as_object().ok_or_else(|| Self::bad("rope_scaling", p, "an object"))?,
                )),
                None => None,
            },
        };
        let get = |k: &str| params.and_then(|(_, o)| o.get(k)).filter(|v| !v.is_null());
        let num = |k: &str| -> Result<Option<f64>> {
            match get(k) {
                None => Ok(None),
                Some(v) => {
                    let key = format!("{}.{k}", params.map_or("", |p| p.0));
                    v.as_f64().map(Some).ok_or_else(|| Self::bad(&key, v, "a number"))
                }
            }
        };
        let theta = match num("rope_theta")? {
            Some(th) => {
                self.note(format!("{}.rope_theta = {th} -> RoPE base", params.map_or("", |p| p.0)));
                th
            }
            None => self.f64_or("rope_theta", default_theta)?,
        };
        let kind = match get("rope_type").or_else(|| get("type")) {
            None => "default".to_string(),
            Some(t) => t.as_str().ok_or_else(|| Self::bad("rope_type", t, "a string"))?.to_string(),
        };
        let section = params.map_or("rope_parameters", |p| p.0);
        match kind.as_str() {
            "default" => Ok(HfRope { theta, scaling: RopeScaling::None, mscale_all_dim: None }),
            "yarn" => {
                let original = match get("original_max_position_embeddings") {
                    Some(v) => v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                        Self::bad(&format!("{section}.original_max_position_embeddings"), v, "a positive integer")
                    })? as usize,
                    None => return Err(Self::missing(&format!("{section}.original_max_position_embeddings"))),
                };
                let factor = match num("factor")? {
                    Some(f) => f,
                    // DeepSeek-V3 style: the factor is the ratio of the two context lengths.
                    None => self.f64("max_position_embeddings")? / original as f64,
                };
                let mscale = num("mscale")?.filter(|&m| m != 0.0);
                let mscale_all_dim = num("mscale_all_dim")?.filter(|&m| m != 0.0);
                let attention_factor = match (num("attention_factor")?, mscale, mscale_all_dim) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(ma)) => yarn_mscale(factor, m) / yarn_mscale(factor, ma),
                    _ => yarn_mscale(factor, 1.0),
                };
                let truncate = match get("truncate") {
                    None => true,
                    Some(v) => v.as_bool().ok_or_else(|| Self::bad(&format!("{section}.truncate"), v, "true or false"))?,
                };
                let yarn = YarnScaling {
                    factor,
                    original_max_position: original,
                    beta_fast: num("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                    beta_slow: num("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                    truncate,
                    attention_factor,
                };
                yarn.validate("HF config").map_err(|e| Error::Msg(format!("HF config: `{section}`: {e}")))?;
                self.note(format!(
                    "{section}: yarn, factor {factor}, original context {original}, beta {}/{}, attention factor \
                     {attention_factor} -> YaRN RoPE",
                    yarn.beta_fast, yarn.beta_slow
                ));
                Ok(HfRope { theta, scaling: RopeScaling::Yarn(yarn), mscale_all_dim })
            }
            other => Err(Error::Msg(format!(
                "HF config: `{section}.rope_type` = \"{other}\" is not supported; moeba implements \"default\" \
                 and \"yarn\" RoPE"
            ))),
        }
    }
}

/// RoPE as an HF config describes it (see [`HfJson::rope`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HfRope {
    /// The frequency base.
    pub theta: f64,
    /// Plain or YaRN.
    pub scaling: RopeScaling,
    /// YaRN's `mscale_all_dim`, when set and non-zero: DeepSeek-V2 multiplies its softmax scale by
    /// `yarn_mscale(factor, mscale_all_dim)²`.
    pub mscale_all_dim: Option<f64>,
}

impl HfRope {
    /// DeepSeek-V2's softmax scale for a `qk_head_dim`-wide score: `1/√qk_head_dim`, times
    /// `yarn_mscale(factor, mscale_all_dim)²` under YaRN with a non-zero `mscale_all_dim`.
    pub fn deepseek_softmax_scale(&self, qk_head_dim: usize) -> f64 {
        let base = 1.0 / (qk_head_dim as f64).sqrt();
        match (self.scaling, self.mscale_all_dim) {
            (RopeScaling::Yarn(y), Some(m)) => {
                let ms = yarn_mscale(y.factor, m);
                base * ms * ms
            }
            _ => base,
        }
    }
}
