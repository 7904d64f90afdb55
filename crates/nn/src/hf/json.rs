//! [`HfJson`]: typed reads of an HF `config.json` whose errors name the key, and the record of
//! what was read (the mapping `moeba inspect` prints).

use moeba_tensor::{Error, Result};
use serde_json::Value;

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

    /// RoPE's base: `rope_parameters.rope_theta` (transformers 5) or `rope_theta` (older
    /// configs), `default` when neither is present. A `rope_type` other than `default` (or a
    /// non-null `rope_scaling`) is an error: moeba implements plain RoPE only.
    pub fn rope_theta(&mut self, default: f64) -> Result<f64> {
        if let Some(p) = self.raw("rope_parameters") {
            let obj = p.as_object().ok_or_else(|| Self::bad("rope_parameters", p, "an object"))?;
            if let Some(t) = obj.get("rope_type").filter(|t| !t.is_null()) {
                if t.as_str() != Some("default") {
                    return Err(Error::Msg(format!(
                        "HF config: `rope_parameters.rope_type` = {t} is not supported; moeba implements \"default\" RoPE only"
                    )));
                }
            }
            if let Some(theta) = obj.get("rope_theta").filter(|t| !t.is_null()) {
                let th = theta
                    .as_f64()
                    .ok_or_else(|| Self::bad("rope_parameters.rope_theta", theta, "a number"))?;
                self.note(format!("rope_parameters.rope_theta = {th} -> RoPE base"));
                return Ok(th);
            }
        }
        if let Some(s) = self.raw("rope_scaling") {
            return Err(Error::Msg(format!(
                "HF config: `rope_scaling` = {s} is not supported; moeba implements unscaled RoPE only"
            )));
        }
        self.f64_or("rope_theta", default)
    }
}
