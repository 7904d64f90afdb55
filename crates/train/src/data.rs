//! Data: the byte-level tokenizer and the embedded tiny Shakespeare corpus, split into training
//! and validation bytes, and a seeded sampler of (input, target) windows.

use moeba_tensor::{Device, Result, Rng, Tensor};

/// The tiny Shakespeare corpus (public domain), embedded in the binary: the default dataset.
pub const TINY_SHAKESPEARE: &str = include_str!("../tinyshakespeare.txt");

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

/// A token stream split into a training part and a held-out validation tail.
pub struct TokenDataset {
    /// Training tokens.
    pub train: Vec<u32>,
    /// Validation tokens (the last `val_fraction` of the stream).
    pub val: Vec<u32>,
}

impl TokenDataset {
    /// Splits `tokens` keeping the last `val_fraction` (0..1) for validation.
    pub fn split(tokens: Vec<u32>, val_fraction: f64) -> Self {
        let n_val = ((tokens.len() as f64) * val_fraction.clamp(0.0, 1.0)) as usize;
        let mut train = tokens;
        let val = train.split_off(train.len() - n_val);
        TokenDataset { train, val }
    }

    /// The embedded tiny Shakespeare corpus, byte-tokenized, with 10% held out.
    pub fn tiny_shakespeare() -> Self {
        Self::split(ByteTokenizer::encode(TINY_SHAKESPEARE), 0.1)
    }
}

/// Samples `batch` random windows of `len + 1` tokens from `tokens`: returns (inputs, targets) as
/// U32 tensors of shape (batch, len), targets shifted by one. Errors if the stream is too short.
pub fn sample_batch(
    tokens: &[u32],
    batch: usize,
    len: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    if tokens.len() <= len + 1 {
        return Err(moeba_tensor::Error::invalid(
            "sample_batch",
            "seq_len",
            format!("{len} needs more than {} tokens, the dataset has {}", len + 1, tokens.len()),
        ));
    }
    let mut x = Vec::with_capacity(batch * len);
    let mut y = Vec::with_capacity(batch * len);
    for _ in 0..batch {
        let start = rng.below((tokens.len() - len - 1) as u64) as usize;
        x.extend_from_slice(&tokens[start..start + len]);
        y.extend_from_slice(&tokens[start + 1..start + len + 1]);
    }
    Ok((Tensor::from_vec(x, (batch, len), device)?, Tensor::from_vec(y, (batch, len), device)?))
}

/// Samples `batch` random windows of `context` tokens and the token after each: returns
/// (windows (batch, context), next (batch)) as U32 tensors.
pub fn sample_windows(
    tokens: &[u32],
    batch: usize,
    context: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (x, y) = sample_batch(tokens, batch, context, rng, device)?;
    let next = y.narrow(1, context - 1, 1)?.reshape(batch)?;
    Ok((x, next.contiguous()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_windows() {
        let ids = ByteTokenizer::encode("To be, or not");
        assert_eq!(ByteTokenizer::decode(&ids), "To be, or not");
        let ds = TokenDataset::tiny_shakespeare();
        assert!(ds.train.len() > 900_000 && ds.val.len() > 100_000);
        let mut rng = Rng::new(0);
        let (x, y) = sample_batch(&ds.train, 3, 8, &mut rng, &Device::Cpu).unwrap();
        let (x, y) = (x.to_vec::<u32>().unwrap(), y.to_vec::<u32>().unwrap());
        assert_eq!(&x[1..8], &y[0..7]);
        assert!(sample_batch(&ds.train[..5], 1, 8, &mut rng, &Device::Cpu).is_err());
    }
}
