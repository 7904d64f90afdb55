//! Parameters with HuggingFace-style dotted names (`model.layers.0.mlp.up_proj.weight`).
//!
//! A [`ParamStore`] owns every parameter of a model. Layers hold [`Param`] handles; a handle
//! reads the current value as a [`Var`] for a forward pass, and an optimizer replaces the value
//! after a step. Initial values are drawn from a per-name seed, so a parameter's initial value
//! depends only on the model seed and its name, not on the order layers are built in.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use moeba_autograd::Var;
use moeba_tensor::{DType, Device, Error, Result, Shape, Tensor};

/// How a new parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones (norm weights).
    Ones,
    /// N(0, std²).
    Normal {
        /// Standard deviation.
        std: f64,
    },
    /// U(-bound, bound).
    Uniform {
        /// Half-width of the interval.
        bound: f64,
    },
}

/// A handle to one named parameter of a [`ParamStore`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Param {
    name: Arc<str>,
    value: Arc<RwLock<Var>>,
}

impl Param {
    /// The parameter's full dotted name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current value as a trainable [`Var`] (the same `Var`, same id, until [`Param::set`]).
    pub fn var(&self) -> Var {
        self.value.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The current value as a plain tensor.
    pub fn tensor(&self) -> Tensor {
        self.var().tensor().clone()
    }

    /// Replaces the value (an optimizer step, a checkpoint load). The shape and dtype must match.
    pub fn set(&self, t: Tensor) -> Result<()> {
        let mut slot = self.value.write().unwrap_or_else(|e| e.into_inner());
        if t.shape() != slot.shape() || t.dtype() != slot.dtype() {
            return Err(Error::invalid(
                "Param::set",
                "value",
                format!(
                    "`{}` is {} {} but the new value is {} {}",
                    self.name,
                    slot.shape(),
                    slot.dtype(),
                    t.shape(),
                    t.dtype()
                ),
            ));
        }
        *slot = Var::param(t);
        Ok(())
    }
}

/// Every parameter of a model, by dotted name, with the dtype, device and seed new ones get.
#[derive(Debug)]
pub struct ParamStore {
    params: RwLock<BTreeMap<String, Param>>,
    dtype: DType,
    device: Device,
    seed: u64,
}

impl ParamStore {
    /// An empty store; parameters created through it use `dtype`, `device` and `seed`.
    pub fn new(dtype: DType, device: Device, seed: u64) -> Self {
        ParamStore { params: RwLock::new(BTreeMap::new()), dtype, device, seed }
    }

    /// The path builder at the root (no prefix).
    pub fn root(&self) -> ParamPath<'_> {
        ParamPath { store: self, prefix: String::new() }
    }

    /// The parameter called `name`, created with `init` if it does not exist yet. An existing
    /// parameter of another shape is an error naming it and both shapes.
    pub fn get_or_init(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Param> {
        let shape = shape.into();
        let mut params = self.params.write().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = params.get(name) {
            let have = p.var();
            if have.shape() != &shape {
                return Err(Error::invalid(
                    "ParamStore::get_or_init",
                    "shape",
                    format!("`{name}` exists with shape {} but {} was asked for", have.shape(), shape),
                ));
            }
            return Ok(p.clone());
        }
        let seed = self.seed ^ fnv1a(name.as_bytes());
        let t = match init {
            Init::Zeros => Tensor::zeros(shape, self.dtype, &self.device)?,
            Init::Ones => Tensor::ones(shape, self.dtype, &self.device)?,
            Init::Normal { std } => Tensor::randn(seed, shape, 0.0, std, self.dtype, &self.device)?,
            Init::Uniform { bound } => Tensor::rand(seed, shape, -bound, bound, self.dtype, &self.device)?,
        };
        let p = Param { name: name.into(), value: Arc::new(RwLock::new(Var::param(t))) };
        params.insert(name.to_string(), p.clone());
        Ok(p)
    }

    /// The parameter called `name`, if any.
    pub fn get(&self, name: &str) -> Option<Param> {
        self.params.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// All parameters, sorted by name.
    pub fn params(&self) -> Vec<Param> {
        self.params.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// The total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.params().iter().map(|p| p.var().elem_count()).sum()
    }

    /// The dtype of new parameters.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of new parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every parameter as safetensors bytes (names as keys, in their own dtype).
    pub fn to_safetensors(
        &self,
        metadata: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Vec<u8>> {
        crate::safetensors_io::serialize(
            self.params().iter().map(|p| (p.name().to_string(), p.tensor())).collect(),
            metadata,
        )
    }

    /// Loads every parameter of the store from safetensors bytes. A parameter that is missing,
    /// a tensor the store does not have, or a shape/dtype mismatch is an error naming it; nothing
    /// is changed unless everything matches.
    pub fn load_safetensors(&self, bytes: &[u8]) -> Result<()> {
        let mut loaded = crate::safetensors_io::deserialize(bytes, &self.device)?;
        let params = self.params();
        let mut updates = Vec::with_capacity(params.len());
        for p in &params {
            let t = loaded.remove(p.name()).ok_or_else(|| {
                Error::invalid("load_safetensors", "tensors", format!("missing tensor `{}`", p.name()))
            })?;
            let have = p.var();
            if t.shape() != have.shape() {
                return Err(Error::invalid(
                    "load_safetensors",
                    "tensors",
                    format!(
                        "`{}`: file has shape {}, the model expects {}",
                        p.name(),
                        t.shape(),
                        have.shape()
                    ),
                ));
            }
            updates.push((p, t.to_dtype(have.dtype())?));
        }
        if let Some(extra) = loaded.keys().next() {
            return Err(Error::invalid(
                "load_safetensors",
                "tensors",
                format!("unexpected tensor `{extra}` (the model has no parameter of that name)"),
            ));
        }
        for (p, t) in updates {
            p.set(t)?;
        }
        Ok(())
    }
}

/// A prefix into a [`ParamStore`]: `store.root().pp("model").pp(0).get("weight", ...)` creates or
/// finds `model.0.weight`.
#[derive(Clone)]
pub struct ParamPath<'a> {
    store: &'a ParamStore,
    prefix: String,
}

impl<'a> ParamPath<'a> {
    /// The path one level down (`prefix.name`).
    pub fn pp(&self, name: impl std::fmt::Display) -> ParamPath<'a> {
        let prefix =
            if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        ParamPath { store: self.store, prefix }
    }

    /// Whether the store already holds `name` under this path (a layer applies its own
    /// initialisation only to parameters it creates, never to loaded ones).
    pub fn contains(&self, name: &str) -> bool {
        self.store().get(&self.name(name)).is_some()
    }

    /// The full name of `name` under this path.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The parameter `prefix.name`, created with `init` if new.
    pub fn get(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Param> {
        self.store.get_or_init(&self.name(name), shape, init)
    }

    /// The store behind the path.
    pub fn store(&self) -> &'a ParamStore {
        self.store
    }
}

/// FNV-1a, used to derive a parameter's seed from its name.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}
