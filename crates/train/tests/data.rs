//! Tokenizers (byte and a HuggingFace tokenizer.json built in the test), datasets (embedded,
//! arithmetic, file, folder), the resumable batcher and the evaluation batches.

use std::path::{Path, PathBuf};

use moeba_tensor::{Device, Tensor};
use moeba_train::data::{arithmetic_text, eval_batches, Batch, Batcher, BatcherState, DataError, Dataset};
use moeba_train::Tokenizer;
use proptest::prelude::*;

/// A fresh, empty temporary folder for one test (removed by [`TempDir`]'s drop).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("moeba-h3-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn u32s(t: &Tensor) -> Vec<u32> {
    t.to_vec::<u32>().unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    let (b, l) = (t.dims()[0], t.dims()[1]);
    let v = u32s(t);
    (0..b).map(|i| v[i * l..(i + 1) * l].to_vec()).collect()
}

const CORPUS: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\
All:\nSpeak, speak.\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\
héllo wörld, naïve café — 日本語のテキスト.\n12+34=46\n90-15=75\n";

/// Trains a small byte-level BPE (every byte in the alphabet, so any text encodes) with one
/// special token, saves it as tokenizer.json under `dir` and returns the path.
fn build_bpe(dir: &Path) -> PathBuf {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::normalizers::NormalizerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::PostProcessorWrapper;
    use tokenizers::{AddedToken, TokenizerBuilder};

    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(400)
        .min_frequency(1)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from("<|eot|>", true)])
        .build();
    let mut tk =
        TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, PostProcessorWrapper, ByteLevel>::new()
            .with_model(BPE::default())
            .with_pre_tokenizer(Some(ByteLevel::new(false, false, true)))
            .with_decoder(Some(ByteLevel::new(false, false, true)))
            .build()
            .unwrap();
    let arith = arithmetic_text(200, 3).0;
    let lines: Vec<&str> = CORPUS.lines().chain(arith.lines()).collect();
    tk.train(&mut trainer, lines.iter()).unwrap();
    let path = dir.join("tokenizer.json");
    tk.save(&path, false).unwrap();
    path
}

// ---------------------------------------------------------------- tokenizers

#[test]
fn hf_tokenizer_round_trip_vocab_and_name() {
    let dir = TempDir::new("hf-rt");
    let path = build_bpe(dir.path());
    let tok = Tokenizer::from_spec(path.to_str().unwrap()).unwrap();
    let raw = tokenizers::Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.vocab_size(), raw.get_vocab_size(true));
    assert!(tok.vocab_size() > 256, "the alphabet plus merges plus the special token");
    assert!(tok.name().contains("BPE"), "{}", tok.name());
    for text in [CORPUS, "unseen ✨ emoji 🎉 and 漢字", "", "a"] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
    }
    // Merges were learnt: fewer tokens than bytes.
    assert!(tok.encode(CORPUS).unwrap().len() < CORPUS.len());
    // The special token is a single id (added tokens are in the vocabulary).
    let eot = raw.token_to_id("<|eot|>").unwrap();
    assert_eq!(tok.encode("<|eot|>").unwrap(), vec![eot]);
}

#[test]
fn hf_stream_decoder_never_splits_characters() {
    let dir = TempDir::new("hf-stream");
    let tok = Tokenizer::from_file(&build_bpe(dir.path())).unwrap();
    // 🎉 and ✨ never occur in training: they are split into several byte tokens.
    let text = "Speak, 🎉 speak ✨ café 日本語!";
    let ids = tok.encode(text).unwrap();
    let mut d = tok.stream_decoder();
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.push(d.push(id).unwrap());
    }
    pieces.push(d.finish().unwrap());
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert!(pieces[..ids.len()].iter().any(|p| p.is_empty()), "a split character is held back: {pieces:?}");
    // Prefixes of the emitted text are prefixes of the text, at every step.
    let mut acc = String::new();
    for p in &pieces {
        acc.push_str(p);
        assert!(text.starts_with(&acc));
    }
}

#[test]
fn hf_stream_decoder_flushes_an_unfinished_character() {
    let dir = TempDir::new("hf-flush");
    let tok = Tokenizer::from_file(&build_bpe(dir.path())).unwrap();
    let ids = tok.encode("ok🎉").unwrap();
    // Drop the last byte token of 🎉: the stream holds it back, finish prints the replacement.
    let mut d = tok.stream_decoder();
    let mut out = String::new();
    for &id in &ids[..ids.len() - 1] {
        out.push_str(&d.push(id).unwrap());
    }
    assert_eq!(out, "ok");
    assert_eq!(d.finish().unwrap(), tok.decode(&ids[..ids.len() - 1]).unwrap()[2..].to_string());
    assert!(tok.decode(&ids[..ids.len() - 1]).unwrap().ends_with('\u{FFFD}'));
}

#[test]
fn hf_tokenizer_errors_name_the_file() {
    let dir = TempDir::new("hf-err");
    let bad = dir.path().join("broken.json");
    std::fs::write(&bad, r#"{"model": 3}"#).unwrap();
    let e = Tokenizer::from_spec(bad.to_str().unwrap()).unwrap_err();
    assert!(matches!(e, DataError::Io { .. }));
    assert!(e.to_string().contains("broken.json"), "{e}");
    let e = Tokenizer::from_spec(dir.path().join("nope.json").to_str().unwrap()).unwrap_err();
    assert!(e.to_string().contains("nope.json"), "{e}");
}

// ---------------------------------------------------------------- datasets

/// Parses `a+b=c` / `a-b=c`; returns (operator, a, b, c).
fn parse_line(line: &str) -> (char, i64, i64, i64) {
    let (lhs, c) = line.split_once('=').unwrap();
    let op_at = lhs.find(['+', '-']).unwrap();
    let op = lhs.as_bytes()[op_at] as char;
    (op, lhs[..op_at].parse().unwrap(), lhs[op_at + 1..].parse().unwrap(), c.parse().unwrap())
}

#[test]
fn arithmetic_lines_are_correct_and_tasks_match_the_operator() {
    let (text, tasks) = arithmetic_text(2000, 11);
    assert_eq!(tasks.len(), text.len());
    assert!(text.ends_with('\n'));
    let mut at = 0;
    let (mut plus, mut minus) = (0, 0);
    let mut seen_a = [false; 100];
    for line in text.lines() {
        let (op, a, b, c) = parse_line(line);
        assert!((0..100).contains(&a) && (0..100).contains(&b), "{line}");
        seen_a[a as usize] = true;
        let want_task = match op {
            '+' => {
                plus += 1;
                assert_eq!(a + b, c, "{line}");
                0
            }
            _ => {
                minus += 1;
                assert_eq!(a - b, c, "{line}");
                1
            }
        };
        // Every byte of the line and its newline carries the line's task.
        assert!(tasks[at..at + line.len() + 1].iter().all(|&t| t == want_task), "{line}");
        at += line.len() + 1;
    }
    assert_eq!(at, text.len());
    assert_eq!(plus + minus, 2000);
    assert!((800..1200).contains(&plus), "+ and - about equally likely: {plus} / {minus}");
    assert!(seen_a.iter().all(|&s| s), "operands cover 0..100");
    // Seeded: the same text for the same seed, another for another seed.
    assert_eq!(arithmetic_text(2000, 11), (text.clone(), tasks));
    assert_ne!(arithmetic_text(2000, 12).0, text);
}

#[test]
fn arithmetic_dataset_byte_tasks_map_one_to_one() {
    let ds = Dataset::load("arithmetic", &Tokenizer::Byte, 0.1, 5).unwrap();
    assert_eq!(ds.name, "arithmetic");
    let (text, tasks) = arithmetic_text(moeba_train::data::ARITHMETIC_LINES, 5);
    assert!(text.lines().count() > 50_000);
    let all: Vec<u32> = ds.train.iter().chain(&ds.val).copied().collect();
    assert_eq!(all, Tokenizer::Byte.encode(&text).unwrap());
    let (tt, vt) = (ds.train_tasks.as_ref().unwrap(), ds.val_tasks.as_ref().unwrap());
    assert_eq!((tt.len(), vt.len()), (ds.train.len(), ds.val.len()));
    assert_eq!(tt.iter().chain(vt).copied().collect::<Vec<u8>>(), tasks);
    assert_eq!(ds.bytes_per_token, 1.0);
    let frac = ds.val.len() as f64 / all.len() as f64;
    assert!((frac - 0.1).abs() < 1e-3, "{frac}");
}

#[test]
fn arithmetic_dataset_hf_tasks_follow_offsets() {
    let dir = TempDir::new("hf-arith");
    let tok = Tokenizer::from_file(&build_bpe(dir.path())).unwrap();
    let ds = Dataset::load("arithmetic", &tok, 0.05, 2).unwrap();
    let tasks: Vec<u8> = ds.train_tasks.unwrap().into_iter().chain(ds.val_tasks.unwrap()).collect();
    let ids: Vec<u32> = ds.train.iter().chain(&ds.val).copied().collect();
    assert_eq!(tasks.len(), ids.len());
    let (mut n_plus, mut n_minus) = (0, 0);
    for (&id, &task) in ids.iter().zip(&tasks) {
        let piece = tok.decode(&[id]).unwrap();
        // An operator token starts inside its own line, so it carries that line's task.
        if piece.contains('+') {
            assert_eq!(task, 0, "{piece:?}");
            n_plus += 1;
        }
        if piece.contains('-') {
            assert_eq!(task, 1, "{piece:?}");
            n_minus += 1;
        }
    }
    assert!(n_plus > 1000 && n_minus > 1000);
    assert!(ds.bytes_per_token > 1.0);
}

#[test]
fn tiny_shakespeare_is_the_embedded_corpus() {
    let ds = Dataset::load("tinyshakespeare", &Tokenizer::Byte, 0.1, 0).unwrap();
    assert_eq!(ds.name, "tinyshakespeare");
    assert!(ds.train.len() > 900_000 && ds.val.len() > 100_000);
    assert!(ds.train_tasks.is_none() && ds.val_tasks.is_none());
    assert_eq!(ds.bytes_per_token, 1.0);
    let n = ds.train.len() + ds.val.len();
    assert_eq!(n, moeba_train::data::TINY_SHAKESPEARE.len());
    assert_eq!(ds.val.len(), (n as f64 * 0.1).ceil() as usize);
    assert_eq!(&ds.train[..14], &Tokenizer::Byte.encode("First Citizen:").unwrap()[..]);
}

#[test]
fn file_with_hf_tokenizer_bytes_per_token() {
    let dir = TempDir::new("hf-file");
    let tok = Tokenizer::from_file(&build_bpe(dir.path())).unwrap();
    let file = dir.path().join("corpus.txt");
    let text = CORPUS.repeat(20);
    std::fs::write(&file, &text).unwrap();
    let ds = Dataset::load(file.to_str().unwrap(), &tok, 0.25, 0).unwrap();
    assert_eq!(ds.name, file.to_str().unwrap());
    let all: Vec<u32> = ds.train.iter().chain(&ds.val).copied().collect();
    assert_eq!(all, tok.encode(&text).unwrap());
    // This byte-level BPE is lossless, so the validation text is the decoded validation ids.
    let val_text = tok.decode(&ds.val).unwrap();
    assert!(text.ends_with(&val_text));
    let want = val_text.len() as f64 / ds.val.len() as f64;
    assert!((ds.bytes_per_token - want).abs() < 1e-12, "{} vs {want}", ds.bytes_per_token);
    assert!(ds.bytes_per_token > 1.5);
}

#[test]
fn folder_loads_every_txt_sorted_and_joined() {
    let dir = TempDir::new("folder");
    std::fs::create_dir_all(dir.path().join("sub/deeper")).unwrap();
    std::fs::write(dir.path().join("b.txt"), "bravo").unwrap();
    std::fs::write(dir.path().join("a.txt"), "alpha").unwrap();
    std::fs::write(dir.path().join("sub/deeper/c.txt"), "charlie").unwrap();
    std::fs::write(dir.path().join("notes.md"), "ignored").unwrap();
    std::fs::write(dir.path().join("sub/data.bin"), [0xFFu8, 0xFE]).unwrap();
    let ds = Dataset::load(dir.path().to_str().unwrap(), &Tokenizer::Byte, 0.0, 0).unwrap();
    assert!(ds.val.is_empty());
    assert_eq!(Tokenizer::Byte.decode(&ds.train).unwrap(), "alpha\nbravo\ncharlie");
    let ds = Dataset::load(dir.path().to_str().unwrap(), &Tokenizer::Byte, 0.45, 0).unwrap();
    // 19 tokens, ceil(19 · 0.45) = 9 held out.
    assert_eq!(Tokenizer::Byte.decode(&ds.val).unwrap(), "o\ncharlie");
}

#[test]
fn dataset_errors_name_the_path_or_key() {
    let dir = TempDir::new("errors");
    let tok = Tokenizer::Byte;
    let err =
        |spec: &Path, f: f64| Dataset::load(spec.to_str().unwrap(), &tok, f, 0).unwrap_err().to_string();

    let missing = dir.path().join("missing.txt");
    let e = err(&missing, 0.1);
    assert!(e.contains("missing.txt") && e.contains("tinyshakespeare"), "{e}");

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = err(&empty, 0.1);
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");

    let binary = dir.path().join("binary.txt");
    std::fs::write(&binary, [b'a', 0xFF, 0xFE]).unwrap();
    let e = err(&binary, 0.1);
    assert!(e.contains("binary.txt") && e.contains("UTF-8"), "{e}");

    let no_txt = dir.path().join("no_txt");
    std::fs::create_dir_all(&no_txt).unwrap();
    std::fs::write(no_txt.join("x.md"), "text").unwrap();
    let e = err(&no_txt, 0.1);
    assert!(e.contains("no_txt") && e.contains("*.txt"), "{e}");

    for f in [1.0, -0.1, f64::NAN] {
        let e = Dataset::load("tinyshakespeare", &tok, f, 0).unwrap_err();
        assert!(matches!(&e, DataError::Invalid { key, .. } if key == "val_fraction"), "{e}");
    }
}

#[test]
fn from_tokens_split() {
    let ds = Dataset::from_tokens("t", (0..100).collect(), 0.1);
    assert_eq!((ds.train.len(), ds.val.len()), (90, 10));
    assert_eq!(ds.val[0], 90);
    // A tiny positive fraction still holds out one window of length 1.
    let ds = Dataset::from_tokens("t", (0..100).collect(), 1e-6);
    assert_eq!(ds.val, vec![98, 99]);
    let ds = Dataset::from_tokens("t", (0..100).collect(), 0.0);
    assert!(ds.val.is_empty() && ds.train.len() == 100);
    // Never everything.
    let ds = Dataset::from_tokens("t", (0..5).collect(), 1.0);
    assert_eq!(ds.train, vec![0]);
    let ds = Dataset::from_tokens("t", vec![], 0.5);
    assert!(ds.train.is_empty() && ds.val.is_empty());
}

// ---------------------------------------------------------------- batches

fn draw(b: &mut Batcher, tokens: &[u32], tasks: Option<&[u8]>, n: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    (0..n)
        .map(|_| {
            let x = b.next_batch(tokens, tasks, 3, 8, &Device::Cpu).unwrap();
            (u32s(&x.ids), u32s(&x.targets))
        })
        .collect()
}

#[test]
fn batcher_resumes_from_its_state() {
    let tokens: Vec<u32> = (0..1000).map(|i| (i * 7919 % 256) as u32).collect();
    let mut b = Batcher::new(42);
    let first = draw(&mut b, &tokens, None, 3);
    let state = b.state();
    assert_eq!(state.batches, 3);
    // The state survives a checkpoint round trip.
    let json = serde_json::to_string(&state).unwrap();
    let restored: BatcherState = serde_json::from_str(&json).unwrap();
    assert_eq!(restored, state);
    let straight = draw(&mut b, &tokens, None, 4);
    assert_eq!(b.state().batches, 7);
    let mut resumed = Batcher::from_state(restored);
    assert_eq!(draw(&mut resumed, &tokens, None, 4), straight);
    assert_eq!(resumed.state(), b.state());
    // Seeded: the same seed repeats, another seed differs.
    assert_eq!(draw(&mut Batcher::new(42), &tokens, None, 3), first);
    assert_ne!(draw(&mut Batcher::new(43), &tokens, None, 3), first);
}

#[test]
fn batcher_reaches_every_window_including_the_last() {
    // seq_len 4 over 7 tokens: starts 0, 1, 2.
    let tokens: Vec<u32> = (0..7).collect();
    let mut b = Batcher::new(1);
    let mut seen = [false; 3];
    for _ in 0..30 {
        let x = b.next_batch(&tokens, None, 2, 4, &Device::Cpu).unwrap();
        for r in rows(&x.ids) {
            seen[r[0] as usize] = true;
        }
    }
    assert_eq!(seen, [true; 3]);
    // Exactly one window fits.
    let x = b.next_batch(&tokens[..5], None, 2, 4, &Device::Cpu).unwrap();
    assert_eq!(u32s(&x.ids), vec![0, 1, 2, 3, 0, 1, 2, 3]);
    assert_eq!(u32s(&x.targets), vec![1, 2, 3, 4, 1, 2, 3, 4]);
}

#[test]
fn batch_errors_name_the_argument() {
    let tokens: Vec<u32> = (0..10).collect();
    let tasks = vec![0u8; 9];
    let mut b = Batcher::new(0);
    let key = |e: DataError| match e {
        DataError::Invalid { key, msg } => format!("{key}: {msg}"),
        other => panic!("unexpected {other}"),
    };
    let e = key(b.next_batch(&tokens, None, 2, 10, &Device::Cpu).unwrap_err());
    assert!(e.starts_with("seq_len") && e.contains("11") && e.contains("10"), "{e}");
    assert!(key(b.next_batch(&tokens, None, 0, 4, &Device::Cpu).unwrap_err()).starts_with("batch_size"));
    assert!(key(b.next_batch(&tokens, None, 2, 0, &Device::Cpu).unwrap_err()).starts_with("seq_len"));
    assert!(key(b.next_batch(&tokens, Some(&tasks), 2, 4, &Device::Cpu).unwrap_err()).starts_with("tasks"));
    assert_eq!(b.state().batches, 0, "failed draws do not count");
    let e = key(eval_batches(&tokens, None, 2, 10, 4, &Device::Cpu).unwrap_err());
    assert!(e.starts_with("seq_len") && e.contains("val_fraction"), "{e}");
    assert!(eval_batches(&tokens, Some(&tasks), 2, 4, 4, &Device::Cpu).is_err());
}

/// Checks one batch over the identity stream `tokens[i] = i`: each row is a window, targets are
/// the inputs shifted by one, tasks (`i % 3`) belong to the inputs. Returns the row starts.
fn check_identity_batch(x: &Batch, len: usize, b: usize, l: usize, with_tasks: bool) -> Vec<usize> {
    assert_eq!(x.ids.dims(), &[b, l]);
    assert_eq!(x.targets.dims(), &[b, l]);
    assert_eq!(x.ids.dtype(), moeba_tensor::DType::U32);
    let ids = rows(&x.ids);
    let tg = rows(&x.targets);
    for (r, t) in ids.iter().zip(&tg) {
        for j in 0..l {
            assert_eq!(r[j], r[0] + j as u32);
            assert_eq!(t[j], r[j] + 1);
        }
        assert!((t[l - 1] as usize) < len);
    }
    match (&x.tasks, with_tasks) {
        (Some(t), true) => {
            assert_eq!(t.dims(), &[b, l]);
            assert_eq!(t.dtype(), moeba_tensor::DType::U32);
            let t = u32s(t);
            let i = u32s(&x.ids);
            assert!(t.iter().zip(&i).all(|(&t, &i)| t == i % 3));
        }
        (None, false) => {}
        _ => panic!("tasks present iff given"),
    }
    ids.iter().map(|r| r[0] as usize).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn batches_are_shifted_windows(len in 2usize..300, l in 1usize..40, b in 1usize..6, seed in any::<u64>(),
                                   with_tasks in any::<bool>()) {
        prop_assume!(len > l);
        let tokens: Vec<u32> = (0..len as u32).collect();
        let tasks: Vec<u8> = (0..len).map(|i| (i % 3) as u8).collect();
        let tasks = with_tasks.then_some(&tasks[..]);
        let mut bt = Batcher::new(seed);
        for k in 0..3 {
            let x = bt.next_batch(&tokens, tasks, b, l, &Device::Cpu).unwrap();
            check_identity_batch(&x, len, b, l, with_tasks);
            prop_assert_eq!(bt.state().batches, k + 1);
        }
    }

    #[test]
    fn eval_windows_are_fixed_spread_and_disjoint(len in 2usize..400, l in 1usize..40, b in 1usize..6,
                                                  n in 1usize..6, with_tasks in any::<bool>()) {
        prop_assume!(len > l);
        let tokens: Vec<u32> = (0..len as u32).collect();
        let tasks: Vec<u8> = (0..len).map(|i| (i % 3) as u8).collect();
        let tasks = with_tasks.then_some(&tasks[..]);
        let ev = eval_batches(&tokens, tasks, b, l, n, &Device::Cpu).unwrap();
        let fit = (len - 1) / l;
        prop_assert!(!ev.is_empty() && ev.len() <= n);
        if fit >= b * n {
            prop_assert_eq!(ev.len(), n);
        }
        let rows_per = if fit >= b { b } else { fit };
        let mut starts = Vec::new();
        for x in &ev {
            starts.extend(check_identity_batch(x, len, rows_per, l, with_tasks));
        }
        // Spread over the whole stream: from its start to its end, targets never overlapping.
        prop_assert_eq!(starts[0], 0);
        if starts.len() > 1 {
            prop_assert_eq!(*starts.last().unwrap(), len - l - 1);
        }
        prop_assert!(starts.windows(2).all(|w| w[1] >= w[0] + l));
        // Deterministic.
        let again = eval_batches(&tokens, tasks, b, l, n, &Device::Cpu).unwrap();
        for (x, y) in ev.iter().zip(&again) {
            prop_assert_eq!(u32s(&x.ids), u32s(&y.ids));
            prop_assert_eq!(u32s(&x.targets), u32s(&y.targets));
        }
    }
}

#[test]
fn eval_batches_on_the_validation_split() {
    let ds = Dataset::load("arithmetic", &Tokenizer::Byte, 0.1, 9).unwrap();
    let val_tasks = ds.val_tasks.as_deref();
    let ev = eval_batches(&ds.val, val_tasks, 4, 32, 5, &Device::Cpu).unwrap();
    assert_eq!(ev.len(), 5);
    for x in &ev {
        let ids = u32s(&x.ids);
        let tasks = u32s(x.tasks.as_ref().unwrap());
        // The task of each input byte is the task of its line: '+' bytes 0, '-' bytes 1.
        for (&i, &t) in ids.iter().zip(&tasks) {
            if i == u32::from(b'+') {
                assert_eq!(t, 0);
            }
            if i == u32::from(b'-') {
                assert_eq!(t, 1);
            }
        }
        let tg = rows(&x.targets);
        for (r, t) in rows(&x.ids).iter().zip(&tg) {
            assert_eq!(&r[1..], &t[..31]);
        }
    }
    // Zero batches asked, zero given.
    assert!(eval_batches(&ds.val, None, 4, 32, 0, &Device::Cpu).unwrap().is_empty());
}
