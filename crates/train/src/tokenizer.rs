//! [`Tokenizer`]: text ↔ token ids. The byte-level tokenizer (vocabulary 256, the default) or a
//! HuggingFace `tokenizer.json` through the `tokenizers` crate; [`StreamDecoder`] turns ids into
//! text one token at a time for streaming output.

use std::path::Path;

use crate::data::{ByteTokenizer, DataError};

/// A tokenizer.
pub enum Tokenizer {
    /// Every byte is a token (vocabulary 256).
    Byte,
    /// A HuggingFace `tokenizer.json`.
    Hf(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({})", self.name())
    }
}

impl Tokenizer {
    /// `"byte"` → [`Tokenizer::Byte`]; anything else is a path to a `tokenizer.json`.
    pub fn from_spec(spec: &str) -> Result<Self, DataError> {
        let spec = spec.trim();
        if spec.eq_ignore_ascii_case("byte") {
            return Ok(Tokenizer::Byte);
        }
        if spec.is_empty() {
            return Err(DataError::Invalid {
                key: "tokenizer".into(),
                msg: "empty: use \"byte\" or the path of a tokenizer.json".into(),
            });
        }
        Self::from_file(Path::new(spec))
    }

    /// Loads a HuggingFace `tokenizer.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let io = |msg: String| DataError::Io { path: path.display().to_string(), msg };
        let bytes = std::fs::read(path).map_err(|e| io(format!("cannot read the tokenizer file: {e}")))?;
        let tok = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| io(format!("not a valid HuggingFace tokenizer.json: {e}")))?;
        if tok.get_vocab_size(true) == 0 {
            return Err(io("the tokenizer has an empty vocabulary".into()));
        }
        Ok(Tokenizer::Hf(Box::new(tok)))
    }

    /// `"byte"` or the file's description.
    pub fn name(&self) -> String {
        match self {
            Tokenizer::Byte => "byte".into(),
            Tokenizer::Hf(t) => {
                let model = match t.get_model() {
                    tokenizers::ModelWrapper::BPE(_) => "BPE",
                    tokenizers::ModelWrapper::WordPiece(_) => "WordPiece",
                    tokenizers::ModelWrapper::WordLevel(_) => "WordLevel",
                    tokenizers::ModelWrapper::Unigram(_) => "Unigram",
                };
                format!("tokenizer.json ({model}, vocab {})", self.vocab_size())
            }
        }
    }

    /// Vocabulary size (including added tokens).
    ///
    /// For a `tokenizer.json` this is `get_vocab_size(true)`, raised to the largest id + 1 when
    /// the ids have gaps, so an embedding of this size covers every id the tokenizer produces.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte => ByteTokenizer::VOCAB,
            Tokenizer::Hf(t) => {
                let max_id = t.get_vocab(true).values().copied().max().map_or(0, |m| m as usize + 1);
                t.get_vocab_size(true).max(max_id)
            }
        }
    }

    /// Text → ids (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        match self {
            Tokenizer::Byte => Ok(ByteTokenizer::encode(text)),
            Tokenizer::Hf(t) => {
                let enc = t.encode_fast(text, false).map_err(|e| DataError::Tokenizer(e.to_string()))?;
                Ok(enc.get_ids().to_vec())
            }
        }
    }

    /// Text → ids (no special tokens added) and, per id, the byte offset in `text` where its
    /// span starts (tokens that cover no text, such as special tokens, get the start of the
    /// next token's span, or `text.len()` at the end).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<usize>), DataError> {
        match self {
            Tokenizer::Byte => Ok((ByteTokenizer::encode(text), (0..text.len()).collect())),
            Tokenizer::Hf(t) => {
                let enc = t.encode(text, false).map_err(|e| DataError::Tokenizer(e.to_string()))?;
                let ids = enc.get_ids().to_vec();
                let mut starts = vec![0usize; ids.len()];
                let mut next = text.len();
                for (i, &(s, e)) in enc.get_offsets().iter().enumerate().rev() {
                    if e > s {
                        next = s.min(text.len());
                    }
                    starts[i] = next;
                }
                Ok((ids, starts))
            }
        }
    }

    /// Ids → text (invalid UTF-8 replaced by U+FFFD).
    ///
    /// Byte tokenizer: ids above 255 are not bytes and decode to U+FFFD. HF: ids outside the
    /// vocabulary are skipped (the `tokenizers` crate's behaviour); special tokens are kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        match self {
            Tokenizer::Byte => Ok(ByteTokenizer::decode(ids)),
            Tokenizer::Hf(t) => t.decode(ids, false).map_err(|e| DataError::Tokenizer(e.to_string())),
        }
    }

    /// A decoder for streaming: push ids one at a time, get the text that became complete.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder { tok: self, pending: Vec::new(), ids: Vec::new(), read_offset: 0 }
    }
}

/// Incremental decoding: holds back bytes of an unfinished UTF-8 character (byte tokenizer) or
/// tokens that do not yet decode to whole characters (HF), so printed text is never garbled.
///
/// HF: the ids since the last emitted piece are decoded together with the piece before them (so
/// decoders that drop a leading space or merge pieces see their context), and the new suffix is
/// emitted once it does not end in U+FFFD.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    /// Byte tokenizer: bytes of an unfinished UTF-8 sequence.
    pending: Vec<u8>,
    /// HF: the last emitted piece's ids (context) followed by the ids not yet emitted.
    ids: Vec<u32>,
    /// HF: `ids[..read_offset]` (relative to `ids`) have been emitted.
    read_offset: usize,
}

impl StreamDecoder<'_> {
    /// Feeds one id; returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, DataError> {
        match self.tok {
            Tokenizer::Byte => {
                match u8::try_from(id) {
                    Ok(b) => self.pending.push(b),
                    Err(_) => {
                        // Not a byte: whatever was pending can never complete.
                        let mut out = String::from_utf8_lossy(&self.pending).into_owned();
                        self.pending.clear();
                        out.push(char::REPLACEMENT_CHARACTER);
                        return Ok(out);
                    }
                }
                Ok(self.drain_complete_bytes())
            }
            Tokenizer::Hf(_) => {
                self.ids.push(id);
                let prefix = self.tok.decode(&self.ids[..self.read_offset])?;
                let full = self.tok.decode(&self.ids)?;
                if full.len() > prefix.len() && !full.ends_with(char::REPLACEMENT_CHARACTER) {
                    if let Some(new) = full.get(prefix.len()..).filter(|_| full.starts_with(&prefix)) {
                        let new = new.to_string();
                        // Keep the last emitted piece as context for the next decode.
                        let drop = self.read_offset;
                        self.ids.drain(..drop);
                        self.read_offset = self.ids.len();
                        return Ok(new);
                    }
                    // The decoder rewrote earlier text (rare): emit nothing and keep waiting
                    // until the end, where `finish` flushes the difference as well as it can.
                }
                Ok(String::new())
            }
        }
    }

    /// The text still held back (at the end of generation).
    pub fn finish(&mut self) -> Result<String, DataError> {
        match self.tok {
            Tokenizer::Byte => {
                let out = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                Ok(out)
            }
            Tokenizer::Hf(_) => {
                let prefix = self.tok.decode(&self.ids[..self.read_offset])?;
                let full = self.tok.decode(&self.ids)?;
                let out = if full.starts_with(&prefix) {
                    full[prefix.len()..].to_string()
                } else {
                    let common = common_prefix_len(&prefix, &full);
                    full[common..].to_string()
                };
                self.ids.clear();
                self.read_offset = 0;
                Ok(out)
            }
        }
    }

    /// Byte tokenizer: emits every complete character in `pending` (invalid bytes as U+FFFD) and
    /// keeps an unfinished trailing sequence.
    fn drain_complete_bytes(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safe: from_utf8 checked these bytes.
                    out.push_str(std::str::from_utf8(&rest[..valid]).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &rest[valid + bad..];
                        }
                        None => {
                            // An unfinished character at the end: hold it back.
                            rest = &rest[valid..];
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let n = self.pending.len();
        self.pending.drain(..n - keep);
        out
    }
}

/// Length in bytes of the longest common prefix of `a` and `b` that ends on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Pushes every id through a stream decoder; returns the pieces (the last from `finish`).
    fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
        let mut d = tok.stream_decoder();
        let mut out: Vec<String> = ids.iter().map(|&i| d.push(i).unwrap()).collect();
        out.push(d.finish().unwrap());
        out
    }

    #[test]
    fn byte_spec_round_trip_and_vocab() {
        let t = Tokenizer::from_spec("byte").unwrap();
        assert!(matches!(t, Tokenizer::Byte));
        assert_eq!(t.vocab_size(), 256);
        assert_eq!(t.name(), "byte");
        let text = "To be, or not — héllo 日本 🎉\n";
        let ids = t.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert_eq!(t.decode(&ids).unwrap(), text);
        let (ids2, starts) = t.encode_with_offsets(text).unwrap();
        assert_eq!(ids2, ids);
        assert_eq!(starts, (0..text.len()).collect::<Vec<_>>());
        // Out-of-range ids are not bytes.
        assert_eq!(t.decode(&[104, 300, 105]).unwrap(), "h\u{FFFD}i");
    }

    #[test]
    fn byte_stream_holds_back_split_characters() {
        let t = Tokenizer::Byte;
        let text = "a日🎉b";
        let pieces = stream(&t, &t.encode(text).unwrap());
        // 'a', then 3 bytes of 日 (two held back), 4 bytes of 🎉 (three held back), 'b', finish.
        let expect = ["a", "", "", "日", "", "", "", "🎉", "b", ""];
        assert_eq!(pieces, expect);
    }

    #[test]
    fn byte_stream_invalid_and_truncated_bytes() {
        let t = Tokenizer::Byte;
        // A lone continuation byte, a truncated 3-byte sequence interrupted by 'a', then a
        // truncated sequence at the end.
        let ids = [0x80, b'x' as u32, 0xE6, 0x97, b'a' as u32, 0xF0, 0x9F];
        let pieces = stream(&t, &ids);
        assert_eq!(pieces, ["\u{FFFD}", "x", "", "", "\u{FFFD}a", "", "", "\u{FFFD}"]);
        // An id that is not a byte flushes what was pending.
        let pieces = stream(&t, &[0xE6, 999, b'z' as u32]);
        assert_eq!(pieces, ["", "\u{FFFD}\u{FFFD}", "z", ""]);
    }

    #[test]
    fn errors_name_the_file() {
        let missing = std::env::temp_dir().join("moeba-h3-no-such-tokenizer.json");
        let e = Tokenizer::from_spec(missing.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("moeba-h3-no-such-tokenizer.json"), "{e}");
        let bad = std::env::temp_dir().join(format!("moeba-h3-bad-tokenizer-{}.json", std::process::id()));
        std::fs::write(&bad, "{ not json").unwrap();
        let e = Tokenizer::from_file(&bad).unwrap_err().to_string();
        std::fs::remove_file(&bad).unwrap();
        assert!(e.contains(&*bad.display().to_string()) && e.contains("tokenizer.json"), "{e}");
        assert!(Tokenizer::from_spec("  ").unwrap_err().to_string().contains("tokenizer"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Streaming valid text gives back the text, and no piece holds a replacement character.
        #[test]
        fn byte_stream_of_text_is_exact(text in any::<String>()) {
            let t = Tokenizer::Byte;
            let pieces = stream(&t, &t.encode(&text).unwrap());
            prop_assert_eq!(pieces.concat(), text.clone());
            if !text.contains('\u{FFFD}') {
                prop_assert!(pieces.iter().all(|p| !p.contains(char::REPLACEMENT_CHARACTER)), "{:?}", pieces);
            }
        }

        /// Streaming arbitrary bytes equals decoding them at once (lossy UTF-8).
        #[test]
        fn byte_stream_of_bytes_matches_lossy(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let t = Tokenizer::Byte;
            let ids: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
            prop_assert_eq!(stream(&t, &ids).concat(), String::from_utf8_lossy(&bytes).into_owned());
            prop_assert_eq!(t.decode(&ids).unwrap(), String::from_utf8_lossy(&bytes).into_owned());
        }
    }
}
