//! Checkpoints: a directory per saved step holding the weights (`model.safetensors`), the
//! optimizer state (`optimizer.safetensors`), the run config (`config.toml`) and the training
//! state (`state.json`: step, RNG and data position, losses, and a manifest of every file's size
//! and CRC32 so truncation is detected). A checkpoint directory is written under a temporary
//! name and renamed into place, so a crash never leaves a broken one; the last N are kept, plus
//! the best by validation loss. Also [`write_atomic`] for single files.
//!
//! Layout of a run directory:
//!
//! ```text
//! <run>/checkpoints/step-000500/{model.safetensors, optimizer.safetensors, config.toml, state.json}
//! <run>/checkpoints/step-001000/…
//! <run>/checkpoints/best/…                      (same four files)
//! <run>/checkpoints/.tmp-step-001500-<pid>/     (only while being written)
//! ```
//!
//! `state.json` is written last, so a directory without a valid one is never taken for a
//! checkpoint.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::BatcherState;

/// Writes `bytes` to `path` atomically (temporary file + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The version of the checkpoint layout written by this build (`state.json`'s `version`).
pub const FORMAT_VERSION: u32 = 1;

/// The weights file of a checkpoint.
pub const MODEL_FILE: &str = "model.safetensors";
/// The optimizer state file of a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The run config file of a checkpoint.
pub const CONFIG_FILE: &str = "config.toml";
/// The training state and manifest file of a checkpoint (written last).
pub const STATE_FILE: &str = "state.json";

/// The files a checkpoint's manifest covers, in the order they are written.
const DATA_FILES: [&str; 3] = [MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE];

/// CRC-32 (IEEE 802.3, the zlib/PNG one: reflected polynomial 0xEDB88320) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    static TABLES: [[u32; 256]; 8] = crate::tensorboard::crc_tables(0xEDB8_8320);
    !crate::tensorboard::crc_update(&TABLES, !0, data)
}

/// A checkpoint that cannot be written or used, naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be read or written.
    #[error("{path}: {msg}")]
    Io {
        /// The file or directory.
        path: String,
        /// What went wrong.
        msg: String,
    },
    /// The checkpoint is truncated, corrupt, or does not match the model.
    #[error("checkpoint {path}: {msg}")]
    Invalid {
        /// The checkpoint directory or file.
        path: String,
        /// What is wrong.
        msg: String,
    },
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Io { path: path.display().to_string(), msg: e.to_string() }
}

fn invalid(path: &Path, msg: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid { path: path.display().to_string(), msg: msg.into() }
}

/// Everything besides tensors needed to continue a run bit for bit (`state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// The trainer's RNG (dropout-free models use it for MoE jitter seeds).
    pub rng: [u64; 4],
    /// The training data sampler's position.
    pub data: BatcherState,
    /// Tokens trained on so far.
    pub tokens_seen: u64,
    /// Seconds of training so far (wall time, summed over resumes).
    pub elapsed_s: f64,
    /// The validation loss at this step, if evaluated.
    pub val_loss: Option<f64>,
    /// The best validation loss of the run so far.
    pub best_val_loss: Option<f64>,
    /// Per MoE layer with aux-loss-free balancing: (layer name, bias per expert).
    pub balancing_bias: Vec<(String, Vec<f64>)>,
}

/// One file's entry in the manifest of `state.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// The file's length in bytes.
    pub bytes: u64,
    /// Its CRC-32 ([`crc32`]).
    pub crc32: u32,
}

impl ManifestEntry {
    /// The entry describing `data`.
    pub fn of(data: &[u8]) -> Self {
        ManifestEntry { bytes: data.len() as u64, crc32: crc32(data) }
    }
}

/// The contents of `state.json`: the format version, the training state and the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// The layout version ([`FORMAT_VERSION`] when written by this build).
    pub version: u32,
    /// The training state.
    pub state: TrainState,
    /// File name → size and CRC-32, for every other file of the checkpoint.
    pub manifest: BTreeMap<String, ManifestEntry>,
}

impl StateFile {
    /// Parses `state.json` bytes and checks the version; `dir` names the checkpoint in errors.
    pub fn parse(bytes: &[u8], dir: &Path) -> Result<StateFile, CheckpointError> {
        let sf: StateFile = serde_json::from_slice(bytes)
            .map_err(|e| invalid(dir, format!("{STATE_FILE} does not parse ({} bytes): {e}", bytes.len())))?;
        if sf.version == 0 || sf.version > FORMAT_VERSION {
            return Err(invalid(
                dir,
                format!(
                    "{STATE_FILE} has format version {}, this build reads version {FORMAT_VERSION}; \
                     HINT: use a newer moeba",
                    sf.version
                ),
            ));
        }
        Ok(sf)
    }
}

/// The contents of one checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The run config as TOML.
    pub config_toml: String,
    /// The weights, safetensors bytes.
    pub model: Vec<u8>,
    /// The optimizer state, safetensors bytes.
    pub optimizer: Vec<u8>,
    /// The training state.
    pub state: TrainState,
}

/// Saves and finds checkpoints under `<run>/checkpoints/`: `step-000500/`, … (the last `keep_last`
/// kept) and `best/` (the lowest validation loss so far).
#[derive(Debug, Clone)]
pub struct Checkpointer {
    dir: PathBuf,
    keep_last: usize,
}

/// The directory name of the checkpoint at `step`.
pub fn step_dir_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// The step of a `step-NNNNNN` directory name.
fn parse_step_name(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Writes `bytes` to `path` and fsyncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = std::fs::File::create(path).map_err(|e| io_err(path, e))?;
    f.write_all(bytes).map_err(|e| io_err(path, e))?;
    f.sync_all().map_err(|e| io_err(path, e))
}

/// Makes directory entries (creations, renames) durable. Best effort: not every platform can
/// open a directory for syncing.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

fn remove_dir(path: &Path) -> Result<(), CheckpointError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, e)),
    }
}

/// Moves the complete directory `tmp` to `target`, replacing any `target`: the old one is
/// renamed away first and deleted after, so at every instant one complete copy exists.
fn replace_dir(tmp: &Path, target: &Path) -> Result<(), CheckpointError> {
    let parent = target.parent().unwrap_or(Path::new("."));
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
    let old = parent.join(format!(".old-{name}-{}", std::process::id()));
    let had_old = target.exists();
    if had_old {
        remove_dir(&old)?;
        std::fs::rename(target, &old).map_err(|e| io_err(target, format!("cannot move aside: {e}")))?;
    }
    if let Err(e) = std::fs::rename(tmp, target) {
        if had_old {
            let _ = std::fs::rename(&old, target);
        }
        return Err(io_err(target, format!("cannot rename {} into place: {e}", tmp.display())));
    }
    sync_dir(parent);
    if had_old {
        remove_dir(&old)?;
    }
    Ok(())
}

impl Checkpointer {
    /// Checkpoints of the run in `run_dir`, keeping the last `keep_last` (at least 1). Removes
    /// temporary directories a crash may have left.
    pub fn new(run_dir: &Path, keep_last: usize) -> Result<Self, CheckpointError> {
        let ck = Checkpointer::open(run_dir, keep_last);
        std::fs::create_dir_all(&ck.dir).map_err(|e| io_err(&ck.dir, e))?;
        ck.clean_up()?;
        Ok(ck)
    }

    /// The checkpoints of `run_dir` for reading only: creates and removes nothing.
    fn open(run_dir: &Path, keep_last: usize) -> Self {
        Checkpointer { dir: run_dir.join("checkpoints"), keep_last: keep_last.max(1) }
    }

    /// The `checkpoints/` directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many `step-*` checkpoints are kept.
    pub fn keep_last(&self) -> usize {
        self.keep_last
    }

    /// Removes `.tmp-*` directories (interrupted saves), and `.old-*` ones (a checkpoint moved
    /// aside while being replaced): an `.old-X-pid` whose `X` is missing is moved back.
    fn clean_up(&self) -> Result<(), CheckpointError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(".tmp-") {
                remove_dir(&path)?;
            } else if let Some(rest) = name.strip_prefix(".old-") {
                // `.old-<name>-<pid>`
                let original = rest.rsplit_once('-').map(|(n, _)| n).unwrap_or(rest);
                let target = self.dir.join(original);
                if !original.is_empty() && !target.exists() && path.join(STATE_FILE).is_file() {
                    std::fs::rename(&path, &target).map_err(|e| io_err(&path, e))?;
                } else {
                    remove_dir(&path)?;
                }
            }
        }
        Ok(())
    }

    /// Writes the four files of `ckpt` into a new temporary directory `.tmp-<name>-<pid>` and
    /// fsyncs them; `state.json` last.
    fn write_tmp(&self, name: &str, ckpt: &Checkpoint) -> Result<PathBuf, CheckpointError> {
        let tmp = self.dir.join(format!(".tmp-{name}-{}", std::process::id()));
        remove_dir(&tmp)?;
        std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        let contents: [&[u8]; 3] = [&ckpt.model, &ckpt.optimizer, ckpt.config_toml.as_bytes()];
        let mut manifest = BTreeMap::new();
        for (file, bytes) in DATA_FILES.iter().zip(contents) {
            write_synced(&tmp.join(file), bytes)?;
            manifest.insert(file.to_string(), ManifestEntry::of(bytes));
        }
        let sf = StateFile { version: FORMAT_VERSION, state: ckpt.state.clone(), manifest };
        let json = serde_json::to_vec_pretty(&sf).map_err(|e| io_err(&tmp.join(STATE_FILE), e))?;
        write_synced(&tmp.join(STATE_FILE), &json)?;
        sync_dir(&tmp);
        Ok(tmp)
    }

    /// A temporary copy of the complete checkpoint `src` (hard links where the file system
    /// allows, copies otherwise), for `best/`.
    fn link_tmp(&self, name: &str, src: &Path) -> Result<PathBuf, CheckpointError> {
        let tmp = self.dir.join(format!(".tmp-{name}-{}", std::process::id()));
        remove_dir(&tmp)?;
        std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        for file in DATA_FILES.iter().chain(&[STATE_FILE]) {
            let (from, to) = (src.join(file), tmp.join(file));
            if std::fs::hard_link(&from, &to).is_err() {
                let bytes = std::fs::read(&from).map_err(|e| io_err(&from, e))?;
                write_synced(&to, &bytes)?;
            }
        }
        sync_dir(&tmp);
        Ok(tmp)
    }

    /// Writes `ckpt` as `step-{step:06}` (atomically), updates `best/` when `is_best`, deletes
    /// the oldest beyond `keep_last`; returns the new directory.
    pub fn save(&self, ckpt: &Checkpoint, is_best: bool) -> Result<PathBuf, CheckpointError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        let name = step_dir_name(ckpt.state.step);
        let target = self.dir.join(&name);
        let tmp = self.write_tmp(&name, ckpt)?;
        replace_dir(&tmp, &target).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&tmp);
        })?;
        if is_best {
            let tmp = self.link_tmp("best", &target)?;
            replace_dir(&tmp, &self.dir.join("best")).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&tmp);
            })?;
        }
        self.prune(ckpt.state.step)?;
        Ok(target)
    }

    /// Deletes the oldest complete `step-*` checkpoints beyond `keep_last`, never the one of
    /// `keep_step`. Directories without a valid `state.json` are not counted and left alone.
    fn prune(&self, keep_step: usize) -> Result<(), CheckpointError> {
        let steps = self.list()?;
        let excess = steps.len().saturating_sub(self.keep_last);
        for (_, path) in steps.into_iter().filter(|(s, _)| *s != keep_step).take(excess) {
            remove_dir(&path)?;
        }
        Ok(())
    }

    /// Every `step-*` directory (complete or not), sorted by step.
    fn step_dirs(&self) -> Result<Vec<(usize, PathBuf)>, CheckpointError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.dir, e))?;
            let Some(step) = entry.file_name().to_str().and_then(parse_step_name) else { continue };
            if entry.path().is_dir() {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The complete `step-*` checkpoints (those with a `state.json` that parses), oldest first,
    /// with their steps.
    pub fn list(&self) -> Result<Vec<(usize, PathBuf)>, CheckpointError> {
        Ok(self.step_dirs()?.into_iter().filter(|(_, p)| has_valid_state(p)).collect())
    }

    /// The newest complete `step-*` checkpoint, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>, CheckpointError> {
        Ok(self.list()?.pop().map(|(_, p)| p))
    }

    /// The `best/` checkpoint, if any.
    pub fn best(&self) -> Option<PathBuf> {
        let p = self.dir.join("best");
        has_valid_state(&p).then_some(p)
    }
}

/// Whether `dir` holds a `state.json` that parses (the files themselves are not checked).
fn has_valid_state(dir: &Path) -> bool {
    std::fs::read(dir.join(STATE_FILE)).is_ok_and(|b| StateFile::parse(&b, dir).is_ok())
}

/// Reads one file of the checkpoint and checks it against its manifest entry.
fn read_verified(
    dir: &Path,
    file: &str,
    manifest: &BTreeMap<String, ManifestEntry>,
) -> Result<Vec<u8>, CheckpointError> {
    let entry = manifest
        .get(file)
        .ok_or_else(|| invalid(dir, format!("the manifest in {STATE_FILE} has no entry for {file}")))?;
    let path = dir.join(file);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(dir, format!("{file} is missing (the manifest lists {} bytes)", entry.bytes)))
        }
        Err(e) => return Err(io_err(&path, e)),
    };
    let len = bytes.len() as u64;
    if len != entry.bytes {
        let what = if len < entry.bytes { "truncated" } else { "longer than written: corrupt" };
        return Err(invalid(
            dir,
            format!("{file} is {len} bytes, the manifest says {}: {what}", entry.bytes),
        ));
    }
    let crc = crc32(&bytes);
    if crc != entry.crc32 {
        return Err(invalid(
            dir,
            format!("{file}: CRC32 is {crc:#010x}, the manifest says {:#010x}: corrupt", entry.crc32),
        ));
    }
    Ok(bytes)
}

/// Reads and verifies a checkpoint directory (every file present, sizes and CRC32s as in the
/// manifest, `state.json` parses); errors name the file and what is wrong.
pub fn load_checkpoint(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    if !dir.is_dir() {
        return Err(io_err(dir, "no such checkpoint directory"));
    }
    let state_path = dir.join(STATE_FILE);
    let state_bytes = match std::fs::read(&state_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(dir, format!("{STATE_FILE} is missing: not a complete checkpoint")))
        }
        Err(e) => return Err(io_err(&state_path, e)),
    };
    let sf = StateFile::parse(&state_bytes, dir)?;
    let model = read_verified(dir, MODEL_FILE, &sf.manifest)?;
    let optimizer = read_verified(dir, OPTIMIZER_FILE, &sf.manifest)?;
    let config = read_verified(dir, CONFIG_FILE, &sf.manifest)?;
    let config_toml =
        String::from_utf8(config).map_err(|e| invalid(dir, format!("{CONFIG_FILE} is not UTF-8: {e}")))?;
    Ok(Checkpoint { config_toml, model, optimizer, state: sf.state })
}

/// Finds the checkpoint to load from `path`: a checkpoint directory itself, or a run directory
/// (its newest `step-*`, or `best/` when `prefer_best`).
///
/// A directory holding `state.json` is a checkpoint. Otherwise `path` is taken as a run directory
/// (with `checkpoints/` inside), or as the `checkpoints/` directory itself. With `prefer_best` and
/// no `best/` yet (no evaluation ran), the newest `step-*` is used.
pub fn resolve_checkpoint(path: &Path, prefer_best: bool) -> Result<PathBuf, CheckpointError> {
    if !path.exists() {
        return Err(io_err(path, "does not exist"));
    }
    if !path.is_dir() {
        return Err(invalid(path, "is a file; expected a checkpoint directory or a run directory"));
    }
    if path.join(STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    let ck = if path.join("checkpoints").is_dir() {
        Checkpointer::open(path, 1)
    } else {
        Checkpointer { dir: path.to_path_buf(), keep_last: 1 }
    };
    if prefer_best {
        if let Some(best) = ck.best() {
            return Ok(best);
        }
    }
    ck.latest()?.ok_or_else(|| {
        invalid(
            path,
            format!(
                "no checkpoint found (looked for {STATE_FILE} here and for step-*/ under {}); \
                 HINT: pass a run directory written by `moeba train`, or one of its checkpoints/step-*/",
                ck.dir.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_file() {
        let dir = std::env::temp_dir().join(format!("moeba-ckpt-test-{}", std::process::id()));
        let p = dir.join("a.bin");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).collect();
        assert_eq!(leftovers.len(), 1, "temporary files left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn crc32_known_vectors() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"The quick brown fox jumps over the lazy dog"), 0x414F_A339);
        // Every length through the slice-by-8 body and its tail agrees with a bitwise CRC.
        let data: Vec<u8> = (0..300u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for n in 0..data.len() {
            let mut c = !0u32;
            for &b in &data[..n] {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
                }
            }
            assert_eq!(crc32(&data[..n]), !c, "length {n}");
        }
    }

    #[test]
    fn step_names() {
        assert_eq!(step_dir_name(500), "step-000500");
        assert_eq!(step_dir_name(12_345_678), "step-12345678");
        assert_eq!(parse_step_name("step-000500"), Some(500));
        assert_eq!(parse_step_name("step-12345678"), Some(12_345_678));
        assert_eq!(parse_step_name("step-"), None);
        assert_eq!(parse_step_name("step-12a"), None);
        assert_eq!(parse_step_name("best"), None);
    }
}
