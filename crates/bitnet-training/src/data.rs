//! Text -> tokenizer -> token streams -> shuffled training windows, and the held-out split.
//!
//! The tokenizer is byte-level BPE trained on the training files: every byte sequence encodes
//! (no unknown token), and each token carries a few bytes, so a fixed compute budget sees
//! several times more text than a byte model would. Models with different tokenizers are
//! compared in nats per byte.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::rng::SplitMix64;
use crate::{Result, TrainError};

/// The separator between documents, token id 0.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// A text file of the corpus with its SHA-256, recorded so that a split can be checked later.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CorpusFile {
    /// Path as given.
    pub path: PathBuf,
    /// Size in bytes.
    pub bytes: u64,
    /// Hex SHA-256 of the contents.
    pub sha256: String,
}

impl CorpusFile {
    /// Whether two lists name the same texts in the same order, by size and hash: the folder
    /// they are read from may move between a run and its resumption.
    pub fn same_texts(a: &[CorpusFile], b: &[CorpusFile]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.bytes == y.bytes && x.sha256 == y.sha256)
    }

    /// Reads `path` and records its size and hash; returns the record and the text.
    pub fn read(path: &Path) -> Result<(CorpusFile, String)> {
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let text = String::from_utf8(bytes).map_err(|_| {
            TrainError::Invalid(format!("{}: the text is not valid UTF-8", path.display()))
        })?;
        Ok((
            CorpusFile {
                path: path.to_path_buf(),
                bytes: text.len() as u64,
                sha256,
            },
            text,
        ))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Trains a byte-level BPE tokenizer of `vocab_size` entries (256 bytes, [`EOS_TOKEN`], merges)
/// on `files`.
pub fn train_tokenizer(files: &[PathBuf], vocab_size: usize) -> Result<Tokenizer> {
    if vocab_size < 257 {
        return Err(TrainError::Invalid(format!(
            "a byte-level tokenizer needs at least 257 entries (256 bytes and {EOS_TOKEN}), got {vocab_size}"
        )));
    }
    let terr = |e: tokenizers::Error| TrainError::Tokenizer(e.to_string());
    let byte_level = ByteLevel::new(false, true, true);
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(byte_level));
    tok.with_decoder(Some(byte_level));
    tok.with_post_processor(Some(byte_level));
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    tok.train_from_files(&mut trainer, names).map_err(terr)?;
    if tok.token_to_id(EOS_TOKEN) != Some(0) {
        return Err(TrainError::Tokenizer(format!(
            "{EOS_TOKEN} did not get id 0"
        )));
    }
    if tok.get_vocab_size(true) > vocab_size {
        return Err(TrainError::Tokenizer(format!(
            "trained {} entries, more than the {vocab_size} asked",
            tok.get_vocab_size(true)
        )));
    }
    Ok(tok)
}

/// Token ids of `text` (no special tokens added).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tok
        .encode(text, false)
        .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
    Ok(enc.get_ids().to_vec())
}

/// Documents as one stream: `EOS doc1 EOS doc2 ...`, so every document starts after the
/// separator just as generation starts after BOS (the same id).
pub fn token_stream(tok: &Tokenizer, texts: &[String]) -> Result<Vec<u32>> {
    let encoded: Vec<Vec<u32>> = texts
        .par_iter()
        .map(|t| encode(tok, t))
        .collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(encoded.iter().map(|e| e.len() + 1).sum());
    for e in encoded {
        out.push(0);
        out.extend(e);
    }
    Ok(out)
}

/// Where the window sampler stands: the epoch and the next window within its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataCursor {
    /// Epoch (each has its own window offset and order).
    pub epoch: u64,
    /// Next position in the epoch's order.
    pub index: usize,
}

/// Shuffled windows of `seq_len + 1` tokens over a token stream.
///
/// Each epoch draws an offset in `0..seq_len` (so window boundaries move between epochs) and a
/// permutation of the windows, both from `seed` and the epoch number alone: the cursor is the
/// whole state, and a resumed run draws the same batches.
#[derive(Debug)]
pub struct WindowSampler {
    stream: Vec<u32>,
    seq_len: usize,
    seed: u64,
    /// Current position.
    pub cursor: DataCursor,
    order: Vec<usize>,
    offset: usize,
}

impl WindowSampler {
    /// A sampler at `cursor`.
    pub fn new(stream: Vec<u32>, seq_len: usize, seed: u64, cursor: DataCursor) -> Result<Self> {
        if stream.len() < 2 * (seq_len + 1) {
            return Err(TrainError::Invalid(format!(
                "the training text has {} tokens: too few for windows of {} tokens",
                stream.len(),
                seq_len + 1
            )));
        }
        let mut s = WindowSampler {
            stream,
            seq_len,
            seed,
            cursor,
            order: Vec::new(),
            offset: 0,
        };
        s.plan_epoch();
        if s.cursor.index > s.order.len() {
            return Err(TrainError::Invalid(format!(
                "data cursor {} is past the {} windows of an epoch",
                s.cursor.index,
                s.order.len()
            )));
        }
        Ok(s)
    }

    fn plan_epoch(&mut self) {
        let mut rng = SplitMix64::new(self.seed ^ 0xD1B5_4A32_D192_ED03 ^ self.cursor.epoch);
        self.offset = rng.below(self.seq_len);
        let n = (self.stream.len() - self.offset - 1) / self.seq_len;
        self.order = (0..n).collect();
        rng.shuffle(&mut self.order);
    }

    /// Windows per epoch.
    pub fn windows_per_epoch(&self) -> usize {
        self.order.len()
    }

    /// The next `batch` windows, row-major `[batch, seq_len + 1]`.
    pub fn next_batch(&mut self, batch: usize) -> Vec<u32> {
        let w = self.seq_len + 1;
        let mut out = Vec::with_capacity(batch * w);
        for _ in 0..batch {
            if self.cursor.index >= self.order.len() {
                self.cursor = DataCursor {
                    epoch: self.cursor.epoch + 1,
                    index: 0,
                };
                self.plan_epoch();
            }
            let start = self.offset + self.order[self.cursor.index] * self.seq_len;
            out.extend_from_slice(&self.stream[start..start + w]);
            self.cursor.index += 1;
        }
        out
    }
}

/// Up to `count` evenly spaced, non-overlapping windows of `seq_len + 1` tokens of `stream`,
/// row-major.
pub fn eval_windows(stream: &[u32], seq_len: usize, count: usize) -> Vec<u32> {
    let w = seq_len + 1;
    let n = if stream.len() >= w {
        (stream.len() - 1) / seq_len
    } else {
        0
    };
    let take = count.min(n);
    let mut out = Vec::with_capacity(take * w);
    for i in 0..take {
        let k = i * n / take;
        out.extend_from_slice(&stream[k * seq_len..k * seq_len + w]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_is_deterministic_and_resumable() {
        let stream: Vec<u32> = (0..1000).collect();
        let start = DataCursor { epoch: 0, index: 0 };
        let mut a = WindowSampler::new(stream.clone(), 16, 9, start).unwrap();
        let per_epoch = a.windows_per_epoch();
        let first: Vec<Vec<u32>> = (0..10).map(|_| a.next_batch(7)).collect();
        // Windows are consecutive runs of the stream.
        for w in first[0].chunks(17) {
            assert!(w.windows(2).all(|p| p[1] == p[0] + 1));
        }
        // Resume from the cursor after 4 batches: the same batches follow (across an epoch).
        let mut b = WindowSampler::new(stream.clone(), 16, 9, start).unwrap();
        for _ in 0..4 {
            b.next_batch(7);
        }
        let mut c = WindowSampler::new(stream, 16, 9, b.cursor).unwrap();
        for batch in &first[4..] {
            assert_eq!(&c.next_batch(7), batch);
        }
        assert!(10 * 7 > per_epoch, "the test must cross an epoch boundary");
    }

    #[test]
    fn tokenizer_round_trips_and_reserves_eos() {
        let dir = std::env::temp_dir().join(format!("bitnet-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.txt");
        let text = "To be, or not to be, that is the question.\n".repeat(50) + "Ünïcødé ✓\n";
        std::fs::write(&f, &text).unwrap();
        let tok = train_tokenizer(&[f], 300).unwrap();
        assert_eq!(tok.token_to_id(EOS_TOKEN), Some(0));
        let ids = encode(&tok, &text).unwrap();
        assert!(
            ids.len() < text.len() / 2,
            "merges shorten the text: {}",
            ids.len()
        );
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
