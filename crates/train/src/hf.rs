//! HuggingFace model directories: [`HfDir`] reads `config.json` and the weights
//! (`model.safetensors`, or the shards named by `model.safetensors.index.json`), memory-mapped,
//! as a [`TensorSource`] (f32, bf16 and f16 tensors, converted to f32 when read);
//! [`load_hf_model`] turns a directory into an ordinary moeba model (with the tokenizer of its
//! `tokenizer.json` when there is one, and its end-of-sequence ids).
//!
//! A fine-tuning run records the HF `config.json` in its `[model]` table (`model.hf_config`), so
//! every checkpoint rebuilds the same [`HybridConfig`] ([`hybrid_config`]); `trainer.init_from_hf`
//! names the directory whose weights start the run ([`configure_run`] sets both).
//!
//! Errors name the file (and the tensor): a missing or invalid `config.json`, a truncated
//! safetensors file, an index naming a shard that is missing, a tensor listed in two shards, a
//! tensor of a dtype moeba does not load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use moeba_nn::hf::{load_weights, source_shapes, HfSpec, LoadReport, TensorSource};
use moeba_nn::{FfnConfig, HybridConfig, HybridModel, ParamStore};
use moeba_tensor::{DType, Device, Error, Result, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorInfo};
use safetensors::SafeTensors;
use serde_json::Value;

use crate::config::{ConfigError, RunConfig, TrainerConfig};
use crate::sampling::SampleOptions;
use crate::tokenizer::Tokenizer;
use crate::trainer::TrainError;

/// The HF config file of a model directory.
pub const CONFIG_JSON: &str = "config.json";
/// The single-file weights of a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded model directory (`weight_map`: tensor name → shard file).
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The tokenizer of a model directory (optional).
pub const TOKENIZER_JSON: &str = "tokenizer.json";
/// The generation defaults of a model directory (optional; `eos_token_id`).
pub const GENERATION_CONFIG_JSON: &str = "generation_config.json";

fn msg(s: impl Into<String>) -> Error {
    Error::Msg(s.into())
}

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8 + header length).
    data_start: usize,
}

/// Where one tensor lives: its shard and its header entry.
struct Entry {
    shard: usize,
    info: TensorInfo,
}

/// An opened HF model directory: `config.json` parsed, the safetensors files memory-mapped and
/// their headers checked (nothing is read until [`TensorSource::get`]).
pub struct HfDir {
    dir: PathBuf,
    config_text: String,
    config: Value,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for HfDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfDir")
            .field("dir", &self.dir)
            .field("files", &self.files())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Maps `path` read-only and checks its safetensors header; errors name the file.
fn open_shard(path: &Path) -> Result<(Shard, Vec<(String, TensorInfo)>)> {
    let file = std::fs::File::open(path).map_err(|e| msg(format!("{}: cannot open: {e}", path.display())))?;
    // SAFETY: the file is mapped read-only; moeba never writes to it, and a model directory is
    // not expected to change while it is being loaded (the same contract as transformers' and
    // safetensors' own memory-mapped loading).
    let mmap = unsafe { Mmap::map(&file) }
        .map_err(|e| msg(format!("{}: cannot memory-map: {e}", path.display())))?;
    let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
        msg(format!(
            "{}: not a valid safetensors file ({} bytes): {e:?}; the file may be truncated or corrupt",
            path.display(),
            mmap.len()
        ))
    })?;
    let infos = meta.tensors().into_iter().map(|(name, info)| (name, info.clone())).collect();
    Ok((Shard { path: path.to_path_buf(), mmap, data_start: 8 + n }, infos))
}

impl HfDir {
    /// Opens `dir`: `config.json` (required) and `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`. Errors name the file that is missing or invalid, and a
    /// tensor that two shards both hold or that the index names but its shard lacks.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(msg(format!("{}: no such HuggingFace model directory", dir.display())));
        }
        let cfg_path = dir.join(CONFIG_JSON);
        let config_text = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(msg(format!(
                    "{}: missing; a HuggingFace model directory needs its config.json",
                    cfg_path.display()
                )))
            }
            Err(e) => return Err(msg(format!("{}: cannot read: {e}", cfg_path.display()))),
        };
        let config: Value = serde_json::from_str(&config_text)
            .map_err(|e| msg(format!("{}: not valid JSON: {e}", cfg_path.display())))?;
        let mut out = HfDir {
            dir: dir.to_path_buf(),
            config_text,
            config,
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        };
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(WEIGHTS_FILE);
        if index_path.is_file() {
            out.open_sharded(&index_path)?;
        } else if single.is_file() {
            let (shard, infos) = open_shard(&single)?;
            out.add_shard(shard, infos)?;
        } else {
            let mut found: Vec<String> = std::fs::read_dir(dir)
                .map_err(|e| msg(format!("{}: cannot list: {e}", dir.display())))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            found.sort();
            let hint = if found.is_empty() {
                String::new()
            } else {
                format!(" (found {}: a sharded checkpoint needs its {INDEX_FILE})", found.join(", "))
            };
            return Err(msg(format!("{}: no {WEIGHTS_FILE} and no {INDEX_FILE}{hint}", dir.display())));
        }
        Ok(out)
    }

    fn open_sharded(&mut self, index_path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(index_path)
            .map_err(|e| msg(format!("{}: cannot read: {e}", index_path.display())))?;
        let index: Value = serde_json::from_str(&text)
            .map_err(|e| msg(format!("{}: not valid JSON: {e}", index_path.display())))?;
        let map = index.get("weight_map").and_then(Value::as_object).ok_or_else(|| {
            msg(format!("{}: has no `weight_map` object (tensor name → shard file)", index_path.display()))
        })?;
        // Shard file → the tensors the index puts there.
        let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                msg(format!("{}: `weight_map.{name}` is {file}, expected a file name", index_path.display()))
            })?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(msg(format!(
                    "{}: `weight_map.{name}` names `{file}`, which is not a file of this directory",
                    index_path.display()
                )));
            }
            by_file.entry(file.to_string()).or_default().push(name.clone());
        }
        if by_file.is_empty() {
            return Err(msg(format!("{}: `weight_map` is empty", index_path.display())));
        }
        for (file, names) in &by_file {
            let path = self.dir.join(file);
            if !path.is_file() {
                return Err(msg(format!(
                    "{}: missing, but {INDEX_FILE} names it as the shard of {} tensor(s) (e.g. `{}`)",
                    path.display(),
                    names.len(),
                    names[0]
                )));
            }
            let (shard, infos) = open_shard(&path)?;
            let have: std::collections::HashSet<&str> = infos.iter().map(|(n, _)| n.as_str()).collect();
            if let Some(lost) = names.iter().find(|n| !have.contains(n.as_str())) {
                return Err(msg(format!(
                    "{}: has no tensor `{lost}`, which {INDEX_FILE} says is in it",
                    path.display()
                )));
            }
            self.add_shard(shard, infos)?;
        }
        Ok(())
    }

    fn add_shard(&mut self, shard: Shard, infos: Vec<(String, TensorInfo)>) -> Result<()> {
        let idx = self.shards.len();
        for (name, info) in infos {
            if let Some(prev) = self.tensors.get(&name) {
                return Err(msg(format!(
                    "tensor `{name}` is in two shards: {} and {}",
                    self.shards[prev.shard].path.display(),
                    shard.path.display()
                )));
            }
            self.tensors.insert(name, Entry { shard: idx, info });
        }
        self.shards.push(shard);
        Ok(())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// `config.json` as written (recorded in fine-tuning checkpoints).
    pub fn config_text(&self) -> &str {
        &self.config_text
    }

    /// The safetensors files read, in order.
    pub fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }

    /// The stored dtype of tensor `name` (`F32`, `BF16`, …), if present.
    pub fn dtype_of(&self, name: &str) -> Option<String> {
        self.tensors.get(name).map(|e| format!("{:?}", e.info.dtype))
    }

    /// The mapped config ([`HfSpec::from_config`] of `config.json`), errors naming the file.
    pub fn spec(&self) -> Result<HfSpec> {
        HfSpec::from_config(&self.config)
            .map_err(|e| msg(format!("{}: {e}", self.dir.join(CONFIG_JSON).display())))
    }

    /// The end-of-sequence ids: `generation_config.json`'s `eos_token_id` (a number or a list)
    /// when present, else `config.json`'s.
    pub fn eos_token_ids(&self, spec: &HfSpec) -> Result<Vec<u32>> {
        let path = self.dir.join(GENERATION_CONFIG_JSON);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| msg(format!("{}: not valid JSON: {e}", path.display())))?;
            match v.get("eos_token_id") {
                None | Some(Value::Null) => {}
                Some(Value::Number(n)) => {
                    let id = n.as_u64().ok_or_else(|| bad_eos(&path, &v))?;
                    return Ok(vec![id as u32]);
                }
                Some(Value::Array(a)) => {
                    return a
                        .iter()
                        .map(|x| x.as_u64().map(|n| n as u32).ok_or_else(|| bad_eos(&path, &v)))
                        .collect()
                }
                Some(_) => return Err(bad_eos(&path, &v)),
            }
        }
        Ok(spec.eos_token_ids.clone())
    }

    /// The tokenizer of `tokenizer.json`, `None` when the directory has none.
    pub fn tokenizer(&self) -> Result<Option<Tokenizer>> {
        let path = self.dir.join(TOKENIZER_JSON);
        if !path.is_file() {
            return Ok(None);
        }
        Tokenizer::from_file(&path).map(Some).map_err(|e| msg(e.to_string()))
    }
}

fn bad_eos(path: &Path, v: &Value) -> Error {
    msg(format!(
        "{}: `eos_token_id` is {}, expected a token id or a list of them",
        path.display(),
        v.get("eos_token_id").unwrap_or(&Value::Null)
    ))
}

impl TensorSource for HfDir {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|e| e.info.shape.clone())
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        let e =
            self.tensors.get(name).ok_or_else(|| msg(format!("the checkpoint has no tensor `{name}`")))?;
        let shard = &self.shards[e.shard];
        let dtype = match e.info.dtype {
            StDtype::F32 => DType::F32,
            StDtype::BF16 => DType::BF16,
            StDtype::F16 => DType::F16,
            other => {
                return Err(msg(format!(
                    "{}: tensor `{name}` has dtype {other:?}; moeba loads F32, BF16 and F16 weights",
                    shard.path.display()
                )))
            }
        };
        let (a, b) = e.info.data_offsets;
        let bytes = shard.mmap.get(shard.data_start + a..shard.data_start + b).ok_or_else(|| {
            msg(format!("{}: tensor `{name}` lies outside the file (truncated?)", shard.path.display()))
        })?;
        let t = Tensor::from_bytes(bytes, dtype, e.info.shape.clone(), &Device::Cpu)
            .map_err(|err| msg(format!("{}: tensor `{name}`: {err}", shard.path.display())))?;
        if dtype == DType::F32 {
            Ok(t)
        } else {
            t.to_dtype(DType::F32)
        }
    }
}

/// An HF model directory loaded as a moeba model.
pub struct HfModel {
    /// The directory.
    pub dir: PathBuf,
    /// The mapped config (family, [`HybridConfig`], the mapping lines).
    pub spec: HfSpec,
    /// The parameters (f32).
    pub store: ParamStore,
    /// The model.
    pub model: HybridModel,
    /// What the weight mapping did.
    pub report: LoadReport,
    /// The tokenizer of `tokenizer.json`, when the directory has one.
    pub tokenizer: Option<Tokenizer>,
    /// End-of-sequence ids (`generation_config.json`, else `config.json`).
    pub eos_token_ids: Vec<u32>,
    /// `config.json` as written.
    pub config_text: String,
    /// The safetensors files read.
    pub files: Vec<PathBuf>,
    /// Every tensor of the checkpoint: name → (shape, stored dtype).
    pub tensors: BTreeMap<String, (Vec<usize>, String)>,
}

impl std::fmt::Debug for HfModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfModel")
            .field("dir", &self.dir)
            .field("family", &self.spec.family)
            .field("params", &self.store.num_elements())
            .field("tokenizer", &self.tokenizer)
            .finish_non_exhaustive()
    }
}

/// Loads the HF model directory `dir` (see [`HfDir::open`]) into a new f32 moeba model; every
/// parameter is set from the checkpoint and every tensor used (see [`load_weights`]). Errors
/// name the file, the key or the tensor.
pub fn load_hf_model(dir: impl AsRef<Path>) -> Result<HfModel> {
    let src = HfDir::open(dir)?;
    let spec = src.spec()?;
    let store = ParamStore::new(DType::F32, Device::Cpu, 0);
    let model = HybridModel::new(&store.root(), &spec.config)?;
    let report = load_weights(&spec, &store, &src).map_err(|e| {
        let files: Vec<String> = src.files().iter().map(|p| p.display().to_string()).collect();
        msg(format!("{}: {e}", files.join(", ")))
    })?;
    let tokenizer = src.tokenizer()?;
    let eos_token_ids = src.eos_token_ids(&spec)?;
    let tensors = source_shapes(&src)
        .into_iter()
        .map(|(n, s)| {
            let dt = src.dtype_of(&n).unwrap_or_default();
            (n, (s, dt))
        })
        .collect();
    Ok(HfModel {
        dir: src.dir().to_path_buf(),
        files: src.files(),
        config_text: src.config_text().to_string(),
        spec,
        store,
        model,
        report,
        tokenizer,
        eos_token_ids,
        tensors,
    })
}

/// Loads the weights of the HF directory `dir` into `store`, whose model was built from
/// `config` (the HF config as a run maps it, see [`hybrid_config`]). The directory's
/// `config.json` must map to the same architecture.
pub fn load_hf_weights(dir: &Path, config: &HybridConfig, store: &ParamStore) -> Result<LoadReport> {
    let src = HfDir::open(dir)?;
    let mut spec = src.spec()?;
    if !same_architecture(&spec.config, config) {
        return Err(msg(format!(
            "{}: describes a different model than the run's model.hf_config",
            dir.join(CONFIG_JSON).display()
        )));
    }
    spec.config = config.clone();
    load_weights(&spec, store, &src).map_err(|e| {
        let files: Vec<String> = src.files().iter().map(|p| p.display().to_string()).collect();
        msg(format!("{}: {e}", files.join(", ")))
    })
}

/// Whether two configs have the same shapes (they may differ in MoE aux-loss weights).
fn same_architecture(a: &HybridConfig, b: &HybridConfig) -> bool {
    with_alphas(a.clone(), 0.0, 0.0, 0.0) == with_alphas(b.clone(), 0.0, 0.0, 0.0)
}

/// `cfg` with every MoE layer's load-balancing, z-loss and usage-variance weights set.
fn with_alphas(mut cfg: HybridConfig, lb: f64, z: f64, usage_var: f64) -> HybridConfig {
    for b in &mut cfg.blocks {
        if let FfnConfig::Moe(m) = &mut b.ffn {
            m.lb_loss_alpha = lb;
            m.z_loss_alpha = z;
            m.usage_var_alpha = usage_var;
        }
    }
    cfg
}

/// The model of a run whose `model.hf_config` is `json` (the text of an HF `config.json`):
/// the mapped config, with the MoE aux-loss weights of `trainer` (as for any moeba model).
pub fn hybrid_config(json: &str, trainer: &TrainerConfig) -> std::result::Result<HybridConfig, ConfigError> {
    let spec = spec_of_text(json)?;
    Ok(with_alphas(
        spec.config,
        trainer.load_balance_alpha,
        trainer.router_z_loss_alpha,
        trainer.usage_variance_alpha,
    ))
}

/// [`HfSpec::from_config`] of the text of a `config.json`, errors naming `model.hf_config`.
pub fn spec_of_text(json: &str) -> std::result::Result<HfSpec, ConfigError> {
    let bad = |m: String| ConfigError::Invalid { key: "model.hf_config".into(), msg: m };
    let v: Value = serde_json::from_str(json).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    HfSpec::from_config(&v).map_err(|e| bad(e.to_string()))
}

/// Makes `cfg` a fine-tuning run of the HF model in `dir`: `[model]` records the directory's
/// `config.json` (`model.hf_config`; `vocab_size`, `hidden_size`, `num_layers`,
/// `tie_embeddings` and `norm_eps` copied for display and checks; `max_seq_len` kept, raised to
/// `trainer.seq_len`), the MoE aux-loss weights (`trainer.load_balance_alpha`,
/// `router_z_loss_alpha`, `usage_variance_alpha`) are the HF model's (as its config maps them), `trainer.init_from_hf` is `dir` (its weights start the run) and, unless
/// `keep_tokenizer`, `trainer.tokenizer` is the directory's `tokenizer.json` (an error when
/// there is none: the data must be tokenized with the model's tokenizer).
pub fn configure_run(cfg: &mut RunConfig, dir: &Path, keep_tokenizer: bool) -> Result<HfSpec> {
    let src = HfDir::open(dir)?;
    let spec = src.spec()?;
    let c = &spec.config;
    let m = &mut cfg.model;
    m.hf_config = Some(src.config_text().to_string());
    m.vocab_size = c.vocab_size;
    m.hidden_size = c.hidden_size;
    m.num_layers = c.blocks.len();
    m.tie_embeddings = c.tie_embeddings;
    m.norm_eps = c.norm_eps;
    m.max_seq_len = m.max_seq_len.max(cfg.trainer.seq_len);
    // The HF model's own aux-loss weights (e.g. none when `output_router_logits` is false) are
    // the run's defaults; `--set trainer.…` after this overrides them.
    if let Some(moe) = c.blocks.iter().find_map(|b| match &b.ffn {
        FfnConfig::Moe(m) => Some(m),
        _ => None,
    }) {
        cfg.trainer.load_balance_alpha = moe.lb_loss_alpha;
        cfg.trainer.router_z_loss_alpha = moe.z_loss_alpha;
        cfg.trainer.usage_variance_alpha = moe.usage_var_alpha;
    }
    let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    cfg.trainer.init_from_hf = Some(abs.display().to_string());
    if !keep_tokenizer {
        let tok = abs.join(TOKENIZER_JSON);
        if !tok.is_file() {
            return Err(msg(format!(
                "{}: missing; fine-tuning needs the model's tokenizer to tokenize the data set \
                 (HINT: add the model's tokenizer.json, or pass --set trainer.tokenizer=PATH)",
                dir.join(TOKENIZER_JSON).display()
            )));
        }
        cfg.trainer.tokenizer = tok.display().to_string();
    }
    Ok(spec)
}

/// Parses token ids written as `1,2,3` (spaces allowed); `what` names the argument in errors.
pub fn parse_ids(text: &str, what: &str) -> Result<Vec<u32>> {
    let text = text.trim();
    if text.is_empty() {
        return Err(msg(format!("{what}: no token ids given (write them like 1,2,3)")));
    }
    text.split(',')
        .map(|s| {
            let s = s.trim();
            s.parse::<u32>()
                .map_err(|_| msg(format!("{what}: `{s}` is not a token id (write ids like 1,2,3)")))
        })
        .collect()
}

/// Parses rows of token ids, `1,2,3;4,5,6` (every row as long as the first).
pub fn parse_id_rows(text: &str, what: &str) -> Result<Vec<Vec<u32>>> {
    let rows = text.split(';').map(|r| parse_ids(r, what)).collect::<Result<Vec<_>>>()?;
    let len = rows.first().map_or(0, Vec::len);
    if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != len) {
        return Err(msg(format!(
            "{what}: row {i} has {} ids but row 0 has {len}; every row must be as long",
            r.len()
        )));
    }
    Ok(rows)
}

/// The no-cache logits `(batch, seq, vocab)` in f32 of `rows` (equal lengths, ids below the
/// vocabulary; errors name the offending id).
pub fn logits_of(model: &HybridModel, rows: &[Vec<u32>]) -> Result<Tensor> {
    let vocab = model.config().vocab_size;
    let len = rows.first().map_or(0, Vec::len);
    if rows.is_empty() || len == 0 {
        return Err(msg("logits: no token ids given"));
    }
    for (i, r) in rows.iter().enumerate() {
        if r.len() != len {
            return Err(msg(format!("logits: row {i} has {} ids but row 0 has {len}", r.len())));
        }
        if let Some(&id) = r.iter().find(|&&id| id as usize >= vocab) {
            return Err(msg(format!(
                "logits: token id {id} (row {i}) is not below the vocabulary size {vocab}"
            )));
        }
    }
    let flat: Vec<u32> = rows.concat();
    let ids = Tensor::from_vec(flat, (rows.len(), len), &Device::Cpu)?;
    let _guard = moeba_autograd::no_grad();
    let out = model.forward(&ids, &moeba_nn::ForwardOptions::default())?;
    let t = out.logits.tensor().clone();
    if t.dtype() == DType::F32 {
        t.contiguous()
    } else {
        t.to_dtype(DType::F32)?.contiguous()
    }
}

/// Writes `tensors` to `path` as safetensors (atomically); errors name the file.
pub fn write_safetensors(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let bytes = moeba_nn::safetensors_io::serialize(tensors, None)?;
    crate::checkpoint::write_atomic(path, &bytes)
        .map_err(|e| msg(format!("{}: cannot write: {e}", path.display())))
}

/// Decodes like [`crate::generate_ids`] (greedy at temperature 0, else sampled as `opts`
/// says, with the model's caches) but stops after the first token of `stop` (it is returned,
/// as transformers' `generate` does). Returns the new ids; `on_token` sees each as it comes.
pub fn generate_until(
    model: &HybridModel,
    prompt_ids: &[u32],
    opts: &SampleOptions,
    stop: &[u32],
    on_token: impl FnMut(u32),
) -> std::result::Result<Vec<u32>, TrainError> {
    crate::sampling::generate_ids_until(model, prompt_ids, opts, None, stop, on_token)
}
