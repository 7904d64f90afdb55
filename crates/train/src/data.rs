//! Data: datasets as token streams split into training and validation, the embedded tiny
//! Shakespeare corpus (the default), text files and folders, the synthetic multi-task arithmetic
//! set, a seeded and resumable batch sampler, and fixed evaluation batches.

use std::path::{Path, PathBuf};

use moeba_tensor::{Device, Rng, Tensor};
use serde::{Deserialize, Serialize};

use crate::tokenizer::Tokenizer;

/// The tiny Shakespeare corpus (public domain), embedded in the binary: the default dataset.
pub const TINY_SHAKESPEARE: &str = include_str!("../tinyshakespeare.txt");

/// Something wrong with data or a tokenizer, naming the file or key.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read.
    #[error("{path}: {msg}")]
    Io {
        /// The path.
        path: String,
        /// What went wrong.
        msg: String,
    },
    /// A tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A bad value (too little data for the sequence length, an unknown dataset name...).
    #[error("`{key}`: {msg}")]
    Invalid {
        /// The config key or argument.
        key: String,
        /// What was wrong.
        msg: String,
    },
    /// A tensor op failed.
    #[error(transparent)]
    Tensor(#[from] moeba_tensor::Error),
}

/// Byte-level tokenization: every byte is a token, vocabulary 256.
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// The vocabulary size.
    pub const VOCAB: usize = 256;

    /// Text → token ids.
    pub fn encode(text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// Token ids → text (invalid UTF-8 replaced with U+FFFD).
    pub fn decode(ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().map(|&i| i.min(255) as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// A tokenized dataset split into a training stream and a held-out validation stream.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// `tinyshakespeare`, `arithmetic`, or the path it came from.
    pub name: String,
    /// Training tokens.
    pub train: Vec<u32>,
    /// Validation tokens.
    pub val: Vec<u32>,
    /// Per training token, its task id (arithmetic: 0 for `+` problems, 1 for `-`); `None` for text.
    pub train_tasks: Option<Vec<u8>>,
    /// Per validation token, its task id.
    pub val_tasks: Option<Vec<u8>>,
    /// UTF-8 bytes per token of the validation text (1 for the byte tokenizer): turns nats per
    /// token into bits per byte.
    pub bytes_per_token: f64,
}

impl Dataset {
    /// Loads `spec` with `tokenizer`, holding out the last `val_fraction` for validation:
    /// `tinyshakespeare` (embedded), `arithmetic` (synthetic, seeded by `seed`), a text file, or
    /// a folder (every `*.txt` file under it, sorted by path, concatenated).
    ///
    /// The arithmetic set is [`arithmetic_text`] with [`ARITHMETIC_LINES`] lines; with a
    /// HuggingFace tokenizer each token takes the task of the byte its span starts at (from the
    /// tokenizer's offsets). `bytes_per_token` is the validation text's UTF-8 bytes over its
    /// token count. Errors: `val_fraction` outside `[0, 1)`, a path that does not exist, a folder
    /// without `*.txt` files, a file that is not UTF-8, empty data (each naming the path).
    /// The built-in names take precedence over files of the same name.
    pub fn load(spec: &str, tokenizer: &Tokenizer, val_fraction: f64, seed: u64) -> Result<Self, DataError> {
        if !(0.0..1.0).contains(&val_fraction) {
            return Err(DataError::Invalid {
                key: "val_fraction".into(),
                msg: format!("{val_fraction} is not in [0, 1)"),
            });
        }
        let (name, text, byte_tasks): (String, String, Option<Vec<u8>>) = match spec {
            "tinyshakespeare" | "tiny_shakespeare" | "tiny-shakespeare" => {
                ("tinyshakespeare".into(), TINY_SHAKESPEARE.to_string(), None)
            }
            "arithmetic" => {
                let (text, tasks) = arithmetic_text(ARITHMETIC_LINES, seed);
                ("arithmetic".into(), text, Some(tasks))
            }
            path => (path.to_string(), read_text(Path::new(path))?, None),
        };
        if text.is_empty() {
            return Err(DataError::Io { path: name, msg: "the dataset is empty (no text)".into() });
        }
        let (tokens, starts) = tokenizer.encode_with_offsets(&text)?;
        if tokens.is_empty() {
            return Err(DataError::Io { path: name, msg: "the text encodes to no tokens".into() });
        }
        let tasks = byte_tasks.map(|bt| {
            starts.iter().map(|&s| bt.get(s).or(bt.last()).copied().unwrap_or(0)).collect::<Vec<u8>>()
        });
        let mut ds = Dataset::from_tokens(&name, tokens, val_fraction);
        let n_train = ds.train.len();
        if n_train == 0 {
            return Err(DataError::Io { path: name, msg: "too little data: no training tokens".into() });
        }
        if let Some(mut tasks) = tasks {
            let val_tasks = tasks.split_off(n_train);
            ds.train_tasks = Some(tasks);
            ds.val_tasks = Some(val_tasks);
        }
        ds.bytes_per_token = match starts.get(n_train) {
            Some(&start) if !ds.val.is_empty() => {
                (text.len() - start.min(text.len())) as f64 / ds.val.len() as f64
            }
            // No validation split: the whole text's ratio.
            _ => text.len() as f64 / (n_train as f64),
        };
        Ok(ds)
    }

    /// Splits a token stream keeping the last `val_fraction` (0..1) for validation: the
    /// validation part is `ceil(len · val_fraction)` tokens, at least 2 (one window of length 1)
    /// when `val_fraction > 0`, but never the whole stream (at least one training token stays).
    /// No tasks; `bytes_per_token` is 1.
    pub fn from_tokens(name: &str, tokens: Vec<u32>, val_fraction: f64) -> Self {
        let len = tokens.len();
        let f = if val_fraction.is_nan() { 0.0 } else { val_fraction.clamp(0.0, 1.0) };
        let mut n_val = ((len as f64) * f).ceil() as usize;
        if f > 0.0 {
            n_val = n_val.max(2);
        }
        n_val = n_val.min(len.saturating_sub(1));
        if len < 2 {
            n_val = 0;
        }
        let mut train = tokens;
        let val = train.split_off(len - n_val);
        Dataset {
            name: name.to_string(),
            train,
            val,
            train_tasks: None,
            val_tasks: None,
            bytes_per_token: 1.0,
        }
    }
}

/// Lines of the synthetic arithmetic set that [`Dataset::load`] generates (about 500 kB).
pub const ARITHMETIC_LINES: usize = 60_000;

/// Reads a text file, or every `*.txt` file under a folder (recursively, sorted by path, joined
/// with `"\n"`); errors name the path.
fn read_text(path: &Path) -> Result<String, DataError> {
    let io = |p: &Path, msg: String| DataError::Io { path: p.display().to_string(), msg };
    let meta = std::fs::metadata(path).map_err(|e| {
        io(path, format!("no such dataset file or folder ({e}); the built-in datasets are `tinyshakespeare` and `arithmetic`"))
    })?;
    if meta.is_dir() {
        let mut files = Vec::new();
        collect_txt(path, &mut files)?;
        if files.is_empty() {
            return Err(io(path, "the folder holds no *.txt files".into()));
        }
        files.sort();
        let mut parts = Vec::with_capacity(files.len());
        for f in &files {
            parts.push(read_utf8(f)?);
        }
        Ok(parts.join("\n"))
    } else {
        read_utf8(path)
    }
}

/// One UTF-8 text file; errors name it.
fn read_utf8(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path)
        .map_err(|e| DataError::Io { path: path.display().to_string(), msg: format!("cannot read: {e}") })?;
    String::from_utf8(bytes).map_err(|e| DataError::Io {
        path: path.display().to_string(),
        msg: format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
    })
}

/// Appends every `*.txt` file under `dir` (recursively, following the directory entries) to `out`.
fn collect_txt(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let io =
        |p: &Path, e: std::io::Error| DataError::Io { path: p.display().to_string(), msg: e.to_string() };
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let p = entry.path();
        let ft = std::fs::metadata(&p).map_err(|e| io(&p, e))?;
        if ft.is_dir() {
            collect_txt(&p, out)?;
        } else if ft.is_file() && p.extension().is_some_and(|x| x == "txt") {
            out.push(p);
        }
    }
    Ok(())
}

/// The synthetic multi-task arithmetic text: lines like `37+45=82` and `91-26=65`, operands
/// uniform in `0..100`, `+` and `-` problems equally likely; returns the text and, per byte, its
/// task (0 for the bytes of a `+` line, 1 for a `-` line, the newline included).
///
/// Results of `-` problems may be negative (`3-45=-42`); every line ends with `\n`.
pub fn arithmetic_text(lines: usize, seed: u64) -> (String, Vec<u8>) {
    use std::fmt::Write;
    let mut rng = Rng::new(seed);
    let mut text = String::with_capacity(lines * 10);
    let mut tasks = Vec::with_capacity(lines * 10);
    for _ in 0..lines {
        let task = rng.below(2) as u8;
        let a = rng.below(100) as i64;
        let b = rng.below(100) as i64;
        let before = text.len();
        // Writing to a String cannot fail.
        let _ =
            if task == 0 { writeln!(text, "{a}+{b}={}", a + b) } else { writeln!(text, "{a}-{b}={}", a - b) };
        tasks.resize(tasks.len() + (text.len() - before), task);
    }
    (text, tasks)
}

/// One training batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Inputs `(b, l)` U32.
    pub ids: Tensor,
    /// Next-token targets `(b, l)` U32.
    pub targets: Tensor,
    /// Per input token, its task id `(b, l)` U32 (task datasets only).
    pub tasks: Option<Tensor>,
}

/// The sampler's position, saved in checkpoints so a resumed run sees the same batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatcherState {
    /// The sampling RNG.
    pub rng: [u64; 4],
    /// Batches drawn so far.
    pub batches: u64,
}

/// Draws random windows of `seq_len + 1` tokens from a stream (seeded, resumable).
#[derive(Debug, Clone)]
pub struct Batcher {
    rng: Rng,
    batches: u64,
}

impl Batcher {
    /// A sampler seeded by `seed`.
    pub fn new(seed: u64) -> Self {
        Batcher { rng: Rng::new(seed), batches: 0 }
    }

    /// Resumes from a saved state.
    pub fn from_state(state: BatcherState) -> Self {
        Batcher { rng: Rng::from_state(state.rng), batches: state.batches }
    }

    /// The state to save.
    pub fn state(&self) -> BatcherState {
        BatcherState { rng: self.rng.state(), batches: self.batches }
    }

    /// The next `batch` windows of `seq_len` from `tokens` (and `tasks`, when given). Errors
    /// name `seq_len` when the stream is too short.
    pub fn next_batch(
        &mut self,
        tokens: &[u32],
        tasks: Option<&[u8]>,
        batch: usize,
        seq_len: usize,
        device: &Device,
    ) -> Result<Batch, DataError> {
        check_stream(tokens, tasks, batch, seq_len, "")?;
        let n_starts = (tokens.len() - seq_len) as u64;
        let mut starts = Vec::with_capacity(batch);
        for _ in 0..batch {
            starts.push(self.rng.below(n_starts) as usize);
        }
        let b = make_batch(tokens, tasks, &starts, seq_len, device)?;
        self.batches += 1;
        Ok(b)
    }
}

/// Checks the arguments of a batch draw: positive sizes, tasks as long as tokens, and a stream
/// holding at least one window of `seq_len + 1` tokens (`hint` ends that message).
fn check_stream(
    tokens: &[u32],
    tasks: Option<&[u8]>,
    batch: usize,
    seq_len: usize,
    hint: &str,
) -> Result<(), DataError> {
    if batch == 0 {
        return Err(DataError::Invalid { key: "batch_size".into(), msg: "must be at least 1".into() });
    }
    if seq_len == 0 {
        return Err(DataError::Invalid { key: "seq_len".into(), msg: "must be at least 1".into() });
    }
    if let Some(t) = tasks {
        if t.len() != tokens.len() {
            return Err(DataError::Invalid {
                key: "tasks".into(),
                msg: format!("{} task ids for {} tokens", t.len(), tokens.len()),
            });
        }
    }
    if tokens.len() <= seq_len {
        return Err(DataError::Invalid {
            key: "seq_len".into(),
            msg: format!(
                "{seq_len} needs a stream of at least {} tokens (a window plus its next token), this one has \
                 {}{hint}",
                seq_len + 1,
                tokens.len()
            ),
        });
    }
    Ok(())
}

/// Builds one batch from windows starting at `starts` (each `start + seq_len < tokens.len()`).
fn make_batch(
    tokens: &[u32],
    tasks: Option<&[u8]>,
    starts: &[usize],
    seq_len: usize,
    device: &Device,
) -> Result<Batch, DataError> {
    let b = starts.len();
    let mut ids = Vec::with_capacity(b * seq_len);
    let mut targets = Vec::with_capacity(b * seq_len);
    for &s in starts {
        ids.extend_from_slice(&tokens[s..s + seq_len]);
        targets.extend_from_slice(&tokens[s + 1..s + seq_len + 1]);
    }
    let tasks = match tasks {
        Some(t) => {
            let mut v = Vec::with_capacity(b * seq_len);
            for &s in starts {
                v.extend(t[s..s + seq_len].iter().map(|&x| u32::from(x)));
            }
            Some(Tensor::from_vec(v, (b, seq_len), device)?)
        }
        None => None,
    };
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, seq_len), device)?,
        targets: Tensor::from_vec(targets, (b, seq_len), device)?,
        tasks,
    })
}

/// `n` fixed evaluation batches of `batch × seq_len` from `tokens` (windows spread evenly over the
/// stream, the same every call), with tasks when given. Fewer when the stream is short; at least one
/// when it holds `seq_len + 1` tokens, else an error naming `seq_len`.
pub fn eval_batches(
    tokens: &[u32],
    tasks: Option<&[u8]>,
    batch: usize,
    seq_len: usize,
    n: usize,
    device: &Device,
) -> Result<Vec<Batch>, DataError> {
    check_stream(tokens, tasks, batch, seq_len, " (for validation: raise val_fraction or use more data)")?;
    if n == 0 {
        return Ok(Vec::new());
    }
    // Windows whose targets do not overlap: at most (len - 1) / seq_len of them.
    let fit = (tokens.len() - 1) / seq_len;
    let (n_batches, rows) = if fit >= batch { ((fit / batch).min(n), batch) } else { (1, fit) };
    let windows = n_batches * rows;
    let max_start = tokens.len() - seq_len - 1;
    // Evenly spread from the first window to the last; the spacing is at least seq_len.
    let spread = |j: usize| (j as u128 * max_start as u128 / (windows.max(2) - 1) as u128) as usize;
    let starts: Vec<usize> = (0..windows).map(spread).collect();
    starts.chunks(rows).map(|c| make_batch(tokens, tasks, c, seq_len, device)).collect()
}
