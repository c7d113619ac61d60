//! Random-weight models with the exact shapes of the public BitNet b1.58 checkpoints, so that
//! speed and memory can be measured at full size without downloading anything.
//!
//! A synthetic model has everything a real one has: ternary linears with one step per tensor,
//! an f16 token embedding (and an untied head where the real model has one), RMSNorm weights
//! near 1, and a byte-level BPE tokenizer (Llama-3 pre-tokenizer) of exactly the model's
//! vocabulary size with the special tokens at the ids the real model uses. Its output is
//! meaningless text, but every tensor has the size, type and layout of the real thing, so
//! timings, memory use and file sizes are those of the real model.
//!
//! Everything is a pure function of the shape and a `u64` seed (a SplitMix64 stream per tensor
//! row, so the result does not depend on the thread count): the same seed gives the same model
//! and the same file bytes. The tokenizer depends on the shape only.
//!
//! Values are chosen to be exact in every format we write, so that a synthetic model gives
//! the same logits from every file written from it:
//! - weight steps are powers of two (1/16, 1/32 or 1/64, drawn per tensor): exact as an f16
//!   TQ block scale, as the f32 I2_S scale and as the bf16 `weight_scale = 1/step` of the
//!   Hugging Face packed format, and `1/(1/step) == step`;
//! - embedding values are `k / 4096` with `|k| <= 204` (8 significant bits, about +-0.05,
//!   triangular, standard deviation about 0.02): exact in f16 and bf16;
//! - norm weights are `1 + k / 128` with `|k| <= 8`: exact in bf16.
//!
//! [`write_synth`] writes a synthetic model as GGUF (through [`crate::convert`]) or as a
//! Hugging Face packed folder ([`write_hf_packed`]).

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use bitnet_core::{AlignedBuffer, Storage};
use bitnet_quant::i2s::I2sLayout;
use bitnet_quant::tq::TQ_BLOCK;
use bitnet_quant::{hf_packed, BitLinear, TernaryMatrix, WeightScale, BLOCK_BYTES, BLOCK_ELEMS};
use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::config::{Activation, ModelConfig, WeightFormat};
use crate::convert::{convert_to_gguf, ConvertOptions, EmbeddingType, LinearType};
use crate::formats::gguf_tokenizer::{added_token_json, llama3_bpe_tokenizer_json};
use crate::loader::LoadedModel;
use crate::model::{DenseFormat, DenseMatrix, Layer, Model};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The named shapes `bitnet synth --shape` knows.
///
/// Sizes are those of the public `config.json` of each checkpoint, none of which could be
/// opened from here: 2B-4T's are the copy in FORMATS.md (itself marked unverified), the others
/// are from the public configs as remembered, with the details least certain marked on each
/// variant. The layer structure is always this
/// crate's b1.58 transformer (sub-norms before `o_proj` and `down_proj`), which is what the
/// 2B-4T and 1bitLLM checkpoints have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthShape {
    /// The test fixture's shape (`testdata/tiny-bitnet`): hidden 256, 2 layers, 4 heads,
    /// 2 KV heads, FFN 512, vocabulary 512 (BOS 510, EOS 511), relu2, tied, theta 500000.
    Tiny,
    /// `1bitLLM/bitnet_b1_58-large` (0.7B): hidden 1536, 24 layers, 16 heads (no GQA),
    /// FFN 4096, vocabulary 32002, SiLU, untied head, theta 10000, eps 1e-5, 2048 positions,
    /// BOS 1, EOS 2. Not verified here: eps, the untied head, BOS/EOS ids.
    Large0_7b,
    /// `microsoft/bitnet-b1.58-2B-4T`: hidden 2560, 30 layers, 20 heads, 5 KV heads
    /// (head_dim 128), FFN 6912, vocabulary 128256, relu2, tied embeddings, theta 500000,
    /// eps 1e-5, 4096 positions, BOS 128000, EOS 128001 (Llama-3 special-token layout).
    B2b4t,
    /// `1bitLLM/bitnet_b1_58-3B`: hidden 3200, 26 layers, 32 heads (head_dim 100, no GQA),
    /// FFN 8640, vocabulary 32002, SiLU, untied head, theta 10000, eps 1e-5, 2048 positions,
    /// BOS 1, EOS 2. Not verified here: eps, the untied head, BOS/EOS ids. Its widths are not
    /// multiples of 256, so it cannot be written as TQ1_0/TQ2_0 (llama.cpp cannot either).
    B3b,
    /// `HF1BitLLM/Llama3-8B-1.58-100B-tokens` (Llama-3 8B): hidden 4096, 32 layers, 32 heads,
    /// 8 KV heads, FFN 14336, vocabulary 128256, SiLU, untied head, theta 500000, eps 1e-5,
    /// 8192 positions, BOS 128000, EOS 128001. Not verified here: whether the checkpoint has
    /// the b1.58 sub-norms (the synthetic model has them).
    Llama3_8b,
}

impl SynthShape {
    /// Every named shape, smallest first.
    pub const ALL: [SynthShape; 5] = [
        SynthShape::Tiny,
        SynthShape::Large0_7b,
        SynthShape::B2b4t,
        SynthShape::B3b,
        SynthShape::Llama3_8b,
    ];

    /// Parses a shape name: `tiny`, `0.7b` (or `large`), `2b4t` (or `2b`), `3b`, `8b`.
    pub fn parse(name: &str) -> Result<SynthShape> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "tiny" => SynthShape::Tiny,
            "0.7b" | "700m" | "large" => SynthShape::Large0_7b,
            "2b4t" | "2b-4t" | "2b" => SynthShape::B2b4t,
            "3b" => SynthShape::B3b,
            "8b" | "llama3-8b" => SynthShape::Llama3_8b,
            _ => {
                return Err(Error::InvalidInput(format!(
                    "unknown shape `{name}` (expected one of {})",
                    Self::ALL.map(SynthShape::name).join(", ")
                )))
            }
        })
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            SynthShape::Tiny => "tiny",
            SynthShape::Large0_7b => "0.7b",
            SynthShape::B2b4t => "2b4t",
            SynthShape::B3b => "3b",
            SynthShape::Llama3_8b => "8b",
        }
    }

    /// The public checkpoint this shape copies.
    pub fn source(self) -> &'static str {
        match self {
            SynthShape::Tiny => "testdata/tiny-bitnet",
            SynthShape::Large0_7b => "1bitLLM/bitnet_b1_58-large",
            SynthShape::B2b4t => "microsoft/bitnet-b1.58-2B-4T",
            SynthShape::B3b => "1bitLLM/bitnet_b1_58-3B",
            SynthShape::Llama3_8b => "HF1BitLLM/Llama3-8B-1.58-100B-tokens",
        }
    }

    /// The full description: configuration and special tokens.
    pub fn spec(self) -> SynthSpec {
        // (hidden, layers, heads, kv heads, ffn, vocab, theta, positions, tied, activation)
        let (h, l, nh, nkv, f, v, theta, pos, tied, act) = match self {
            SynthShape::Tiny => (
                256,
                2,
                4,
                2,
                512,
                512,
                500000.0,
                128,
                true,
                Activation::Relu2,
            ),
            SynthShape::Large0_7b => (
                1536,
                24,
                16,
                16,
                4096,
                32002,
                10000.0,
                2048,
                false,
                Activation::Silu,
            ),
            SynthShape::B2b4t => (
                2560,
                30,
                20,
                5,
                6912,
                128256,
                500000.0,
                4096,
                true,
                Activation::Relu2,
            ),
            SynthShape::B3b => (
                3200,
                26,
                32,
                32,
                8640,
                32002,
                10000.0,
                2048,
                false,
                Activation::Silu,
            ),
            SynthShape::Llama3_8b => (
                4096,
                32,
                32,
                8,
                14336,
                128256,
                500000.0,
                8192,
                false,
                Activation::Silu,
            ),
        };
        let special_tokens = match self {
            SynthShape::Tiny => vec![
                (510, "<|begin_of_text|>".to_string()),
                (511, "<|end_of_text|>".to_string()),
            ],
            SynthShape::B2b4t | SynthShape::Llama3_8b => llama3_special_tokens(),
            SynthShape::Large0_7b | SynthShape::B3b => llama2_special_tokens(),
        };
        let (bos, eos) = match self {
            SynthShape::Tiny => (510, 511),
            SynthShape::B2b4t | SynthShape::Llama3_8b => (128000, 128001),
            SynthShape::Large0_7b | SynthShape::B3b => (1, 2),
        };
        SynthSpec {
            name: self.name().to_string(),
            source: self.source().to_string(),
            config: ModelConfig {
                hidden_size: h,
                intermediate_size: f,
                num_layers: l,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: h / nh,
                vocab_size: v,
                rms_norm_eps: 1e-5,
                rope_theta: theta,
                max_position_embeddings: pos,
                tie_word_embeddings: tied,
                activation: act,
                weight_format: WeightFormat::PackedInverseScale,
                bos_token_id: Some(bos),
                eos_token_ids: vec![eos],
            },
            special_tokens,
        }
    }
}

/// Llama 3's 256 special tokens at ids 128000..=128255: BOS, EOS, the chat header and
/// end-of-turn markers, and `<|reserved_special_token_N|>` for the rest, as in its
/// `tokenizer.json`.
fn llama3_special_tokens() -> Vec<(u32, String)> {
    let mut reserved = 0..;
    (128000u32..128256)
        .map(|id| {
            let name = match id {
                128000 => "<|begin_of_text|>".to_string(),
                128001 => "<|end_of_text|>".to_string(),
                128006 => "<|start_header_id|>".to_string(),
                128007 => "<|end_header_id|>".to_string(),
                128009 => "<|eot_id|>".to_string(),
                _ => format!(
                    "<|reserved_special_token_{}|>",
                    reserved.next().unwrap_or(0)
                ),
            };
            (id, name)
        })
        .collect()
}

/// Special tokens for the 32002-token (Llama-2 sized) vocabularies: `<unk>`, `<s>` (BOS) and
/// `</s>` (EOS) at ids 0, 1, 2 as in Llama 2, and two padding tokens at 32000 and 32001.
/// The real 1bitLLM tokenizers are SentencePiece; these names are stand-ins.
fn llama2_special_tokens() -> Vec<(u32, String)> {
    vec![
        (0, "<unk>".to_string()),
        (1, "<s>".to_string()),
        (2, "</s>".to_string()),
        (32000, "<pad>".to_string()),
        (32001, "<pad_1>".to_string()),
    ]
}

/// What to synthesize: a configuration and the special tokens of its vocabulary.
///
/// Usually from [`SynthShape::spec`]; any other shape can be described by filling in the
/// fields (or with [`SynthSpec::from_hf_config`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    /// Short name (used as `general.name` in GGUF, with `synth-` in front).
    pub name: String,
    /// Where the shape comes from.
    pub source: String,
    /// The model's configuration (`weight_format` is ignored).
    pub config: ModelConfig,
    /// Special tokens `(id, content)`; BOS and EOS must be among them. All other ids get
    /// ordinary byte-level BPE tokens.
    pub special_tokens: Vec<(u32, String)>,
}

impl SynthSpec {
    /// A named shape ([`SynthShape::parse`]), or the shape of a Hugging Face `config.json`
    /// (a path to the file or to a folder holding it).
    pub fn parse(name_or_config: &str) -> Result<SynthSpec> {
        match SynthShape::parse(name_or_config) {
            Ok(shape) => Ok(shape.spec()),
            Err(e) => {
                let p = Path::new(name_or_config);
                if p.is_file() {
                    Self::from_hf_config(p)
                } else if p.join("config.json").is_file() {
                    Self::from_hf_config(&p.join("config.json"))
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The shape of a Hugging Face `config.json`. A 128256-token vocabulary with BOS 128000
    /// gets Llama 3's special tokens; otherwise BOS and EOS are the only special tokens.
    pub fn from_hf_config(path: &Path) -> Result<SynthSpec> {
        let config = ModelConfig::from_hf_file(path)?;
        let special_tokens = if config.vocab_size == 128256 && config.bos_token_id == Some(128000) {
            llama3_special_tokens()
        } else {
            let mut s = Vec::new();
            if let Some(b) = config.bos_token_id {
                s.push((b, "<|begin_of_text|>".to_string()));
            }
            for (i, &e) in config.eos_token_ids.iter().enumerate() {
                if Some(e) != config.bos_token_id && s.iter().all(|(id, _)| *id != e) {
                    let name = if i == 0 {
                        "<|end_of_text|>".to_string()
                    } else {
                        format!("<|end_of_text_{i}|>")
                    };
                    s.push((e, name));
                }
            }
            s
        };
        let name = path
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .unwrap_or("custom")
            .to_string();
        Ok(SynthSpec {
            name,
            source: path.display().to_string(),
            config,
            special_tokens,
        })
    }

    /// The parameter counts a model of this shape has.
    pub fn param_counts(&self) -> ParamCounts {
        let c = &self.config;
        let (h, qd, kvd, f, v) = (
            c.hidden_size,
            c.q_dim(),
            c.kv_dim(),
            c.intermediate_size,
            c.vocab_size,
        );
        ParamCounts {
            embedding: v * h,
            head: if c.tie_word_embeddings { 0 } else { v * h },
            ternary: c.num_layers * (2 * qd * h + 2 * kvd * h + 3 * f * h),
            norms: c.num_layers * (2 * h + qd + f) + h,
        }
    }

    /// Checks that the configuration and special tokens are consistent.
    fn validate(&self) -> Result<()> {
        self.config.validate()?;
        let v = self.config.vocab_size;
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        for (id, name) in &self.special_tokens {
            if *id as usize >= v {
                return Err(Error::Config(format!(
                    "special token {name:?} has id {id}, outside the vocabulary of {v}"
                )));
            }
            if name.chars().count() < 2 {
                return Err(Error::Config(format!(
                    "special token {name:?} must be at least two characters long"
                )));
            }
            if !ids.insert(*id) || !names.insert(name.as_str()) {
                return Err(Error::Config(format!(
                    "special token {name:?} (id {id}) is given twice"
                )));
            }
        }
        for id in self
            .config
            .bos_token_id
            .iter()
            .chain(&self.config.eos_token_ids)
        {
            if !ids.contains(id) {
                return Err(Error::Config(format!(
                    "BOS/EOS id {id} is not among the special tokens"
                )));
            }
        }
        if v < 256 + self.special_tokens.len() {
            return Err(Error::Config(format!(
                "a vocabulary of {v} cannot hold the 256 byte tokens and {} special tokens",
                self.special_tokens.len()
            )));
        }
        Ok(())
    }
}

/// Parameter counts of a model, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// The token embedding, `vocab * hidden`.
    pub embedding: usize,
    /// The untied output head (0 when tied).
    pub head: usize,
    /// All ternary weights.
    pub ternary: usize,
    /// All RMSNorm weights.
    pub norms: usize,
}

impl ParamCounts {
    /// The sum.
    pub fn total(&self) -> usize {
        self.embedding + self.head + self.ternary + self.norms
    }

    /// Counts the parameters of a built model.
    pub fn of_model(m: &Model) -> ParamCounts {
        let emb = m.embedding();
        let cfg = m.config();
        ParamCounts {
            embedding: emb.rows() * emb.cols(),
            head: if cfg.tie_word_embeddings {
                0
            } else {
                m.head().rows() * m.head().cols()
            },
            ternary: m
                .layers()
                .iter()
                .flat_map(|l| l.linears())
                .map(|(_, lin)| lin.out_features() * lin.in_features())
                .sum(),
            norms: m
                .layers()
                .iter()
                .map(|l| {
                    l.attn_norm.len()
                        + l.attn_sub_norm.len()
                        + l.ffn_norm.len()
                        + l.ffn_sub_norm.len()
                })
                .sum::<usize>()
                + m.final_norm().len(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Random numbers.

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for random weights.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A generator for stream `b` of seed `a` (a tensor of a model, a row of a tensor).
fn stream(a: u64, b: u64) -> SplitMix64 {
    let mut m = SplitMix64(b ^ 0x5851_F42D_4C95_7F2D);
    let mixed = SplitMix64(a ^ m.next()).next();
    SplitMix64(mixed)
}

/// Seed of tensor `index` of the model made from `seed`.
fn tensor_seed(seed: u64, index: u64) -> u64 {
    stream(seed, index).next()
}

/// Tensor indices: the embedding, the head, the final norm, then 16 per layer.
const T_EMBED: u64 = 0;
const T_HEAD: u64 = 1;
const T_NORM: u64 = 2;
fn t_layer(layer: usize, part: u64) -> u64 {
    3 + 16 * layer as u64 + part
}

/// The 81 bytes whose four 2-bit fields are all valid codes (0, 1 or 2).
fn valid_code_bytes() -> [u8; 81] {
    let mut out = [0u8; 81];
    for (i, b) in out.iter_mut().enumerate() {
        let (a, c, d, e) = (i % 3, (i / 3) % 3, (i / 9) % 3, i / 27);
        *b = (a | c << 2 | d << 4 | e << 6) as u8;
    }
    out
}

/// A `[rows, cols]` ternary matrix with codes -1, 0, 1 equally likely, drawn as layout bytes
/// (4 weights per random byte; no intermediate code array), one row after the other from the
/// row's own random stream, then regrouped into the runtime layout.
fn random_ternary(seed: u64, rows: usize, cols: usize) -> Result<TernaryMatrix> {
    let blocks = TernaryMatrix::blocks_per_row(cols);
    let row_bytes = blocks * BLOCK_BYTES;
    let valid = valid_code_bytes();
    let mut bytes = vec![0u8; rows * row_bytes];
    let tail = cols % BLOCK_ELEMS;
    bytes
        .par_chunks_mut(row_bytes.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let mut rng = stream(seed, r as u64);
            let mut word = 0u64;
            let mut left = 0;
            for byte in row.iter_mut() {
                // Rejection sampling: a byte below 243 = 3 * 81 picks one of the 81 valid bytes
                // uniformly.
                *byte = loop {
                    if left == 0 {
                        word = rng.next();
                        left = 8;
                    }
                    let b = (word & 0xff) as usize;
                    word >>= 8;
                    left -= 1;
                    if b < 243 {
                        break valid[b % 81];
                    }
                };
            }
            if tail != 0 {
                // Elements past `cols` in the last block are padding: weight 0 (bits 01).
                let last = &mut row[(blocks - 1) * BLOCK_BYTES..];
                for (j, byte) in last.iter_mut().enumerate() {
                    for lane in 0..4 {
                        if lane * 32 + j >= tail {
                            let shift = 6 - 2 * lane;
                            *byte = (*byte & !(3 << shift)) | (1 << shift);
                        }
                    }
                }
            }
        });
    TernaryMatrix::from_row_major(&bytes, rows, cols)
}

/// Largest `|k|` of the embedding values `k / 4096`.
const EMBED_K_MAX: i32 = 204;

/// A `[rows, cols]` f16 matrix of values `k / 4096`, `k = a + b - 204` with `a`, `b` uniform
/// in `0..=204` (triangular on +-0.0498, standard deviation about 0.02).
fn random_embedding(name: &str, seed: u64, rows: usize, cols: usize) -> Result<DenseMatrix> {
    let table: Vec<[u8; 2]> = (-EMBED_K_MAX..=EMBED_K_MAX)
        .map(|k| f16::from_f32(k as f32 / 4096.0).to_le_bytes())
        .collect();
    let mut buf = AlignedBuffer::zeroed(rows * cols * 2);
    buf.as_mut_bytes()
        .par_chunks_mut((cols * 2).max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let mut rng = stream(seed, r as u64);
            for chunk in row.chunks_mut(8) {
                let w = rng.next();
                for (i, v) in chunk.chunks_exact_mut(2).enumerate() {
                    let bits = w >> (16 * i);
                    let a = ((bits & 0xff) * 205) >> 8;
                    let b = (((bits >> 8) & 0xff) * 205) >> 8;
                    v.copy_from_slice(&table[(a + b) as usize]);
                }
            }
        });
    DenseMatrix::new(name, DenseFormat::F16, rows, cols, Storage::heap(buf))
}

/// `len` RMSNorm weights `1 + k / 128`, `k` uniform in `-8..=8`.
fn random_norm(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = stream(seed, 0);
    (0..len)
        .map(|_| 1.0 + ((rng.next() % 17) as i32 - 8) as f32 / 128.0)
        .collect()
}

/// The weight steps a synthetic linear can have.
pub const SYNTH_STEPS: [f32; 3] = [1.0 / 16.0, 1.0 / 32.0, 1.0 / 64.0];

fn random_linear(seed: u64, step_draw: u64, rows: usize, cols: usize) -> Result<BitLinear> {
    let step = SYNTH_STEPS[(step_draw % SYNTH_STEPS.len() as u64) as usize];
    Ok(BitLinear::new(
        random_ternary(seed, rows, cols)?,
        WeightScale::Direct(step),
    ))
}

// ---------------------------------------------------------------------------------------------
// The model.

/// Builds a random-weight model of shape `spec` in memory, with its tokenizer.
///
/// The same `spec` and `seed` always give the same model. For 2B-4T this takes about
/// 1.2 GB (0.66 GB f16 embedding, 0.52 GB of 2-bit weights).
pub fn synth_model(spec: &SynthSpec, seed: u64) -> Result<LoadedModel> {
    spec.validate()?;
    let tokenizer = synth_tokenizer(spec)?;
    let cfg = spec.config.clone();
    let (h, qd, kvd, f, v) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let embed = random_embedding("token embedding", tensor_seed(seed, T_EMBED), v, h)?;
    let head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(random_embedding(
            "output head",
            tensor_seed(seed, T_HEAD),
            v,
            h,
        )?)
    };
    let norm = random_norm(tensor_seed(seed, T_NORM), h);
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let s = |part: u64| tensor_seed(seed, t_layer(i, part));
        let mut steps = stream(s(15), 0);
        let mut lin =
            |part: u64, rows: usize, cols: usize| random_linear(s(part), steps.next(), rows, cols);
        let q = lin(4, qd, h)?;
        let k = lin(5, kvd, h)?;
        let vv = lin(6, kvd, h)?;
        let o = lin(7, h, qd)?;
        let gate = lin(8, f, h)?;
        let up = lin(9, f, h)?;
        let down = lin(10, h, f)?;
        layers.push(Layer {
            attn_norm: random_norm(s(0), h),
            q,
            k,
            v: vv,
            attn_sub_norm: random_norm(s(1), qd),
            o,
            ffn_norm: random_norm(s(2), h),
            gate,
            up,
            ffn_sub_norm: random_norm(s(3), f),
            down,
        });
    }
    let model = Model::new(cfg, embed, head, norm, layers)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template: None,
        // `convert` takes `general.name` from the file stem: no dots.
        source: PathBuf::from(format!("synth-{}", spec.name.replace('.', "_"))),
    })
}

// ---------------------------------------------------------------------------------------------
// The tokenizer.

/// GPT-2's byte-to-character mapping, in its vocabulary order: the 188 printable bytes
/// (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) as themselves, then the other 68 bytes as U+0100 onwards.
/// Entry `i` is the character of byte token id `i`.
fn byte_tokens() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut chars: Vec<char> = (0u32..256)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    let mut n = 0;
    for b in 0u32..256 {
        if !printable(b) {
            chars.extend(char::from_u32(256 + n));
            n += 1;
        }
    }
    chars
}

/// English letter frequencies (percent), most frequent first.
const LETTER_FREQ: [(char, f64); 26] = [
    ('e', 12.7),
    ('t', 9.1),
    ('a', 8.2),
    ('o', 7.5),
    ('i', 7.0),
    ('n', 6.7),
    ('s', 6.3),
    ('h', 6.1),
    ('r', 6.0),
    ('d', 4.3),
    ('l', 4.0),
    ('c', 2.8),
    ('u', 2.8),
    ('m', 2.4),
    ('w', 2.4),
    ('f', 2.2),
    ('g', 2.0),
    ('y', 2.0),
    ('p', 1.9),
    ('b', 1.5),
    ('v', 0.98),
    ('k', 0.77),
    ('j', 0.15),
    ('x', 0.15),
    ('q', 0.095),
    ('z', 0.074),
];

/// The byte-level form of a space and of a newline.
const SPACE: char = '\u{120}';
const NEWLINE: char = '\u{10a}';

/// What a merged token can grow into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A run of spaces of this length.
    Spaces(usize),
    /// Letters, optionally after one space.
    Word,
    /// Digits (Llama 3 splits numbers into groups of at most three).
    Digits(usize),
    /// A run of newlines.
    Newlines(usize),
    /// Anything else: never extended.
    Other,
}

impl Kind {
    fn of_byte(c: char) -> Kind {
        match c {
            SPACE => Kind::Spaces(1),
            NEWLINE => Kind::Newlines(1),
            c if c.is_ascii_alphabetic() => Kind::Word,
            c if c.is_ascii_digit() => Kind::Digits(1),
            _ => Kind::Other,
        }
    }

    /// The score of the single byte as the root of a family of tokens.
    fn root_score(c: char) -> f64 {
        let freq = |c: char| {
            LETTER_FREQ
                .iter()
                .find(|(l, _)| *l == c.to_ascii_lowercase())
                .map_or(0.0, |(_, f)| f / 100.0)
        };
        match c {
            SPACE => 0.5,
            NEWLINE => 0.01,
            c if c.is_ascii_lowercase() => 0.3 * freq(c),
            c if c.is_ascii_uppercase() => 0.05 * freq(c),
            c if c.is_ascii_digit() => 0.005,
            _ => 0.0,
        }
    }

    fn after(self, c: char) -> Kind {
        match (self, c) {
            (Kind::Spaces(n), SPACE) => Kind::Spaces(n + 1),
            (Kind::Newlines(n), NEWLINE) => Kind::Newlines(n + 1),
            (Kind::Digits(n), c) if c.is_ascii_digit() => Kind::Digits(n + 1),
            (_, c) if c.is_ascii_alphabetic() => Kind::Word,
            _ => Kind::Other,
        }
    }
}

/// The extensions of each kind, each with its weight, highest weight first.
struct Extensions {
    first_space: Vec<(char, f64)>,
    spaces: Vec<(char, f64)>,
    word: Vec<(char, f64)>,
    digits: Vec<(char, f64)>,
    newlines: Vec<(char, f64)>,
}

impl Extensions {
    fn new() -> Extensions {
        let lower: Vec<(char, f64)> = LETTER_FREQ.iter().map(|&(c, f)| (c, f / 100.0)).collect();
        let mut first_space = lower.clone();
        first_space.extend(
            LETTER_FREQ
                .iter()
                .map(|&(c, f)| (c.to_ascii_uppercase(), 0.15 * f / 100.0)),
        );
        first_space.push((SPACE, 0.02));
        first_space.sort_by(|a, b| b.1.total_cmp(&a.1));
        Extensions {
            first_space,
            spaces: vec![(SPACE, 0.3)],
            word: lower,
            digits: ('0'..='9').map(|c| (c, 0.1)).collect(),
            newlines: vec![(NEWLINE, 0.3)],
        }
    }

    fn of(&self, kind: Kind) -> &[(char, f64)] {
        match kind {
            Kind::Spaces(1) => &self.first_space,
            Kind::Spaces(n) if n < 16 => &self.spaces,
            Kind::Word => &self.word,
            Kind::Digits(n) if n < 3 => &self.digits,
            Kind::Newlines(n) if n < 4 => &self.newlines,
            _ => &[],
        }
    }
}

/// A candidate token: extension `ext` of token `parent`.
#[derive(Debug, PartialEq)]
struct Candidate {
    score: f64,
    order: u64,
    parent: usize,
    ext: usize,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        // Highest score first; among equal scores, the earliest pushed.
        self.score
            .total_cmp(&other.score)
            .then(other.order.cmp(&self.order))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// How byte-level BPE splits a string, given as byte token ids, with the merges so far:
/// the adjacent pair with the best-ranked merge is merged first, leftmost on ties, until no
/// pair has a merge (the `tokenizers` library's rule without dropout).
fn bpe_segments(mut parts: Vec<u32>, merges: &HashMap<(u32, u32), u32>) -> Vec<u32> {
    loop {
        let best = parts
            .windows(2)
            .enumerate()
            .filter_map(|(i, w)| merges.get(&(w[0], w[1])).map(|&id| (id, i)))
            .min();
        let Some((id, i)) = best else {
            return parts;
        };
        parts[i] = id;
        parts.remove(i + 1);
    }
}

/// `n` ordinary tokens (`n >= 256`): the 256 byte tokens, then merged tokens with their
/// merges `(left, right)`, in rank order (the merge of token `256 + i` is merge `i`).
///
/// The merged tokens are the most likely strings under a toy model of English text (letter
/// frequencies, words after a space, digit groups of up to three, runs of spaces and
/// newlines), so that text encodes to a few bytes per token as with a real vocabulary. Each
/// is a shorter token plus one byte and comes after it. Its merge joins the two pieces that
/// BPE with the earlier merges leaves when it encodes the new string, so that BPE reaches the
/// token; when BPE leaves more than two pieces (rare), the merge is the shorter token plus
/// the byte, which is well formed but only used when the whole word is looked up.
fn ordinary_tokens(n: usize) -> (Vec<String>, Vec<(String, String)>) {
    let bytes = byte_tokens();
    let byte_id: HashMap<char, u32> = (0u32..)
        .zip(bytes.iter().copied())
        .map(|(i, c)| (c, i))
        .collect();
    let ext = Extensions::new();
    let mut tokens: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    let mut kinds: Vec<Kind> = bytes.iter().map(|&c| Kind::of_byte(c)).collect();
    let mut scores: Vec<f64> = bytes.iter().map(|&c| Kind::root_score(c)).collect();
    let mut merges = Vec::with_capacity(n.saturating_sub(256));
    let mut merge_ids: HashMap<(u32, u32), u32> = HashMap::with_capacity(n);
    let mut heap = BinaryHeap::new();
    let mut order = 0u64;
    let mut push = |heap: &mut BinaryHeap<Candidate>, score: f64, parent: usize, e: usize| {
        heap.push(Candidate {
            score,
            order,
            parent,
            ext: e,
        });
        order += 1;
    };
    for (id, kind) in kinds.iter().enumerate() {
        if let Some(&(_, w)) = ext.of(*kind).first() {
            if scores[id] > 0.0 {
                push(&mut heap, scores[id] * w, id, 0);
            }
        }
    }
    while tokens.len() < n {
        let Some(c) = heap.pop() else { break };
        let list = ext.of(kinds[c.parent]);
        let (ch, _) = list[c.ext];
        if let Some(&(_, w)) = list.get(c.ext + 1) {
            push(&mut heap, scores[c.parent] * w, c.parent, c.ext + 1);
        }
        let id = tokens.len();
        let token = format!("{}{ch}", tokens[c.parent]);
        let chars: Vec<u32> = token.chars().map(|c| byte_id[&c]).collect();
        let (left, right) = match bpe_segments(chars, &merge_ids)[..] {
            [l, r] => (l, r),
            _ => (c.parent as u32, byte_id[&ch]),
        };
        merge_ids.insert((left, right), id as u32);
        merges.push((
            tokens[left as usize].clone(),
            tokens[right as usize].clone(),
        ));
        tokens.push(token);
        let kind = kinds[c.parent].after(ch);
        kinds.push(kind);
        scores.push(c.score);
        if let Some(&(_, w)) = ext.of(kind).first() {
            push(&mut heap, c.score * w, id, 0);
        }
    }
    (tokens, merges)
}

/// The `tokenizer.json` of a synthetic model: byte-level BPE with Llama 3's pre-tokenizer,
/// post-processor (BOS in front) and decoder, exactly `vocab_size` tokens with ids
/// `0..vocab_size` and no holes, the special tokens at their ids and ordinary tokens (bytes
/// first, then merged tokens by rank) at all other ids in order.
///
/// Special tokens are in the BPE vocabulary too (as in tokenizers rebuilt from GGUF), so the
/// `tokenizers` library keeps their ids wherever they sit.
pub fn synth_tokenizer_json(spec: &SynthSpec) -> Result<Value> {
    spec.validate()?;
    let v = spec.config.vocab_size;
    let special: HashMap<u32, &str> = spec
        .special_tokens
        .iter()
        .map(|(id, s)| (*id, s.as_str()))
        .collect();
    let (tokens, merges) = ordinary_tokens(v - special.len());
    if tokens.len() != v - special.len() {
        return Err(Error::Config(format!(
            "could not make {} distinct tokens",
            v - special.len()
        )));
    }
    let mut vocab = Map::new();
    let mut ordinary = tokens.iter();
    for id in 0..v as u32 {
        let token = match special.get(&id) {
            Some(s) => s.to_string(),
            None => ordinary.next().cloned().unwrap_or_default(),
        };
        if vocab.insert(token.clone(), json!(id)).is_some() {
            return Err(Error::Config(format!("token {token:?} appears twice")));
        }
    }
    let mut specials: Vec<&(u32, String)> = spec.special_tokens.iter().collect();
    specials.sort();
    let added_tokens: Vec<Value> = specials
        .iter()
        .map(|(id, content)| added_token_json(*id, content, true))
        .collect();
    let bos = spec
        .config
        .bos_token_id
        .and_then(|b| special.get(&b).map(|s| (b, *s)));
    let merges: Vec<Value> = merges.into_iter().map(|(l, r)| json!([l, r])).collect();
    Ok(llama3_bpe_tokenizer_json(vocab, merges, added_tokens, bos))
}

/// The tokenizer of [`synth_tokenizer_json`], loaded.
pub fn synth_tokenizer(spec: &SynthSpec) -> Result<Tokenizer> {
    let json = synth_tokenizer_json(spec)?;
    let inner: tokenizers::Tokenizer = serde_json::from_value(json)
        .map_err(|e| Error::Tokenizer(format!("the synthetic tokenizer does not load: {e}")))?;
    Ok(Tokenizer::from_tokenizers(inner))
}

// ---------------------------------------------------------------------------------------------
// Writing.

/// The file a synthetic model is written as.
#[derive(Debug, Clone, Copy)]
pub enum SynthOutput {
    /// One GGUF file (see [`convert_to_gguf`]).
    Gguf(ConvertOptions),
    /// A Hugging Face folder in the packed `bitlinear` / offline format of the 2B-4T release
    /// (see [`write_hf_packed`]).
    HfPacked,
}

impl SynthOutput {
    /// Parses `tq2_0`, `tq1_0`, `i2_s`, `f16` (GGUF with an f16 embedding and x86 I2_S
    /// blocks) or `hf-packed`.
    pub fn parse(s: &str) -> Result<SynthOutput> {
        match s {
            "hf-packed" | "hf_packed" | "hf" => Ok(SynthOutput::HfPacked),
            other => Ok(SynthOutput::Gguf(ConvertOptions {
                linear: LinearType::parse(other).map_err(|_| {
                    Error::InvalidInput(format!(
                        "unknown type `{other}` (expected tq2_0, tq1_0, i2_s, f16 or hf-packed)"
                    ))
                })?,
                embedding: EmbeddingType::F16,
                i2s_layout: I2sLayout::X86,
            })),
        }
    }

    /// Fails early (before any weight is generated) when `spec` cannot be written this way.
    pub fn check(&self, spec: &SynthSpec) -> Result<()> {
        let c = &spec.config;
        match self {
            SynthOutput::Gguf(o) if matches!(o.linear, LinearType::Tq1_0 | LinearType::Tq2_0) => {
                for (what, n) in [
                    ("hidden_size", c.hidden_size),
                    ("heads * head_dim", c.q_dim()),
                    ("intermediate_size", c.intermediate_size),
                ] {
                    if n % TQ_BLOCK != 0 {
                        return Err(Error::InvalidInput(format!(
                            "shape `{}` has {what} {n}, not a multiple of {TQ_BLOCK}: TQ types \
                             cannot hold it (use i2_s or hf-packed)",
                            spec.name
                        )));
                    }
                }
                Ok(())
            }
            SynthOutput::Gguf(o) if o.linear == LinearType::I2S => {
                let c = &spec.config;
                let block = match o.i2s_layout {
                    I2sLayout::X86 => 128,
                    I2sLayout::Arm => 64,
                };
                let h = c.hidden_size;
                for n in [c.q_dim() * h, c.kv_dim() * h, c.intermediate_size * h] {
                    if n % block != 0 {
                        return Err(Error::InvalidInput(format!(
                            "shape `{}` has a linear of {n} weights, not a multiple of the \
                             I2_S block of {block}",
                            spec.name
                        )));
                    }
                }
                Ok(())
            }
            SynthOutput::Gguf(_) => Ok(()),
            SynthOutput::HfPacked => {
                for (what, n) in [
                    ("hidden_size", c.hidden_size),
                    ("heads * head_dim", c.q_dim()),
                    ("kv_heads * head_dim", c.kv_dim()),
                    ("intermediate_size", c.intermediate_size),
                ] {
                    if n % 4 != 0 {
                        return Err(Error::InvalidInput(format!(
                            "shape `{}` has {what} {n}; the HF packed format needs a multiple of 4",
                            spec.name
                        )));
                    }
                }
                Ok(())
            }
        }
    }
}

/// Builds the model of `spec` and `seed` ([`synth_model`]) and writes it to `out`: a GGUF
/// file, or a Hugging Face packed folder (created if needed).
///
/// The same arguments give the same bytes. GGUF output holds the whole file in memory
/// while writing (for 2B-4T as TQ2_0, a peak of about 3.5 GB in all); the HF folder is
/// written one tensor at a time.
///
/// llama.cpp's `bitnet` architecture reads no `output.weight` (it always uses the embedding
/// as the head), so the GGUF files of the untied shapes (0.7b, 3b, 8b) load in this crate but
/// not in llama.cpp; and the 3b shape cannot be written as TQ (see [`SynthShape::B3b`]).
pub fn write_synth(spec: &SynthSpec, seed: u64, out: &Path, kind: SynthOutput) -> Result<()> {
    kind.check(spec)?;
    let m = synth_model(spec, seed)?;
    match kind {
        SynthOutput::Gguf(opts) => convert_to_gguf(&m, &opts, out),
        SynthOutput::HfPacked => write_hf_packed(&m, out),
    }
}

/// A safetensors tensor whose bytes are made only when the file is written, so that at most
/// one converted tensor is in memory at a time.
enum LazyTensor<'a> {
    /// A dense matrix as bf16.
    Dense(&'a DenseMatrix, [usize; 2]),
    /// A vector as bf16.
    Vector(&'a [f32], [usize; 1]),
    /// One bf16 value, shape `[1]`.
    Scalar(f32, [usize; 1]),
    /// A ternary linear in the HF packed layout, uint8 `[out / 4, in]`.
    Packed(&'a BitLinear, [usize; 2]),
}

impl LazyTensor<'_> {
    fn dense(m: &DenseMatrix) -> LazyTensor<'_> {
        LazyTensor::Dense(m, [m.rows(), m.cols()])
    }
    fn vector(v: &[f32]) -> LazyTensor<'_> {
        LazyTensor::Vector(v, [v.len()])
    }
    fn packed(l: &BitLinear) -> LazyTensor<'_> {
        LazyTensor::Packed(l, [l.out_features() / 4, l.in_features()])
    }
}

fn bf16_bytes(v: &[f32], out: &mut [u8]) {
    for (o, &x) in out.chunks_exact_mut(2).zip(v) {
        o.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
    }
}

impl safetensors::View for LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            LazyTensor::Packed(..) => safetensors::Dtype::U8,
            _ => safetensors::Dtype::BF16,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            LazyTensor::Dense(_, s) | LazyTensor::Packed(_, s) => s,
            LazyTensor::Vector(_, s) | LazyTensor::Scalar(_, s) => s,
        }
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let mut out = vec![0u8; self.data_len()];
        match self {
            LazyTensor::Dense(m, [_, cols]) => {
                out.par_chunks_mut((cols * 2).max(1))
                    .enumerate()
                    .for_each(|(r, o)| {
                        let mut row = vec![0f32; *cols];
                        m.row_to_f32(r, &mut row);
                        bf16_bytes(&row, o);
                    });
            }
            LazyTensor::Vector(v, _) => bf16_bytes(v, &mut out),
            LazyTensor::Scalar(x, _) => bf16_bytes(&[*x], &mut out),
            LazyTensor::Packed(l, [quarter, cols]) => {
                // Packed row r holds rows r, R + r, 2R + r, 3R + r: pack those four as a
                // [4, cols] matrix, whose single packed row is exactly that row.
                let w = l.weight();
                out.par_chunks_mut((*cols).max(1))
                    .enumerate()
                    .for_each(|(r, o)| {
                        let mut codes = vec![0i8; 4 * cols];
                        for (i, dst) in codes.chunks_exact_mut((*cols).max(1)).enumerate() {
                            w.row_codes(i * quarter + r, dst);
                        }
                        // Codes read from a ternary matrix are always valid.
                        if let Ok(p) = hf_packed::pack(&codes, 4, *cols) {
                            o.copy_from_slice(&p);
                        }
                    });
            }
        }
        Cow::Owned(out)
    }

    fn data_len(&self) -> usize {
        let n: usize = self.shape().iter().product();
        match self {
            LazyTensor::Packed(..) => n,
            _ => 2 * n,
        }
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v)
        .map_err(|e| Error::InvalidInput(format!("cannot serialise {}: {e}", path.display())))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes any loaded model as a Hugging Face folder in the packed format of the 2B-4T
/// release: `config.json` (`quantization_config` `bitlinear` / `offline`), `model.safetensors`
/// (uint8 `[out / 4, in]` packed linears with a bf16 `weight_scale = 1 / step` of shape
/// `[1]`, bf16 norms, embedding and untied head), `tokenizer.json`, `tokenizer_config.json`
/// and `generation_config.json`. [`Model::from_hf_folder`] reads it back.
///
/// bf16 holds 8 significant bits: values and inverse steps that need more are rounded
/// (synthetic models need none). Linears with per-block scales and widths that are not
/// multiples of 4 cannot be written.
pub fn write_hf_packed(m: &LoadedModel, dir: &Path) -> Result<()> {
    let model = &m.model;
    let cfg = model.config();
    for (i, l) in model.layers().iter().enumerate() {
        for (name, lin) in l.linears() {
            if lin.block_scales().is_some() {
                return Err(Error::InvalidInput(format!(
                    "layer {i} {name} has per-block scales, which the HF packed format cannot hold"
                )));
            }
            if lin.out_features() % 4 != 0 {
                return Err(Error::InvalidInput(format!(
                    "layer {i} {name} has {} outputs; the HF packed format needs a multiple of 4",
                    lin.out_features()
                )));
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;

    let mut tensors: Vec<(String, LazyTensor<'_>)> = vec![
        (
            "model.embed_tokens.weight".into(),
            LazyTensor::dense(model.embedding()),
        ),
        (
            "model.norm.weight".into(),
            LazyTensor::vector(model.final_norm()),
        ),
    ];
    if !cfg.tie_word_embeddings {
        tensors.push(("lm_head.weight".into(), LazyTensor::dense(model.head())));
    }
    for (i, l) in model.layers().iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (name, v) in [
            ("input_layernorm", &l.attn_norm),
            ("self_attn.attn_sub_norm", &l.attn_sub_norm),
            ("post_attention_layernorm", &l.ffn_norm),
            ("mlp.ffn_sub_norm", &l.ffn_sub_norm),
        ] {
            tensors.push((format!("{p}.{name}.weight"), LazyTensor::vector(v)));
        }
        for (name, lin) in l.linears() {
            let group = if matches!(name, "gate_proj" | "up_proj" | "down_proj") {
                "mlp"
            } else {
                "self_attn"
            };
            let inverse = match lin.scale() {
                WeightScale::Inverse(s) => s,
                WeightScale::Direct(a) => 1.0 / a,
            };
            tensors.push((
                format!("{p}.{group}.{name}.weight"),
                LazyTensor::packed(lin),
            ));
            tensors.push((
                format!("{p}.{group}.{name}.weight_scale"),
                LazyTensor::Scalar(inverse, [1]),
            ));
        }
    }
    let st_path = dir.join("model.safetensors");
    let info = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(info), &st_path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(err) => Error::io(&st_path, err),
        other => Error::InvalidInput(format!("cannot write {}: {other}", st_path.display())),
    })?;

    let eos: Value = match cfg.eos_token_ids.as_slice() {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    let bos = cfg.bos_token_id.map_or(Value::Null, |b| json!(b));
    let config = json!({
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "hidden_act": cfg.activation.name(),
        "hidden_size": cfg.hidden_size,
        "head_dim": cfg.head_dim,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        "vocab_size": cfg.vocab_size,
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "bitlinear",
            "quantization_mode": "offline"
        }
    });
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({ "bos_token_id": bos, "eos_token_id": eos }),
    )?;

    let tok_path = dir.join("tokenizer.json");
    let tok_text = m
        .tokenizer
        .inner()
        .to_string(true)
        .map_err(|e| Error::Tokenizer(format!("cannot serialise the tokenizer: {e}")))?;
    std::fs::write(&tok_path, tok_text).map_err(|e| Error::io(&tok_path, e))?;
    let token = |id: Option<u32>| {
        id.and_then(|i| m.tokenizer.id_to_token(i))
            .map_or(Value::Null, Value::String)
    };
    let mut tok_config = json!({
        "bos_token": token(cfg.bos_token_id),
        "eos_token": token(cfg.eos_token_ids.first().copied()),
        "clean_up_tokenization_spaces": false,
        "model_max_length": cfg.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    if let Some(t) = &m.chat_template {
        tok_config["chat_template"] = json!(t);
    }
    write_json(&dir.join("tokenizer_config.json"), &tok_config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ternary_is_a_valid_runtime_matrix() {
        for cols in [1, 127, 128, 200, 320, 8640 % 1000] {
            let m = random_ternary(9, 5, cols).unwrap();
            let codes = m.to_codes();
            // Re-packing the codes gives the same bytes: the padding is weight 0 and no field
            // holds the unused code.
            let again = TernaryMatrix::from_codes(&codes, 5, cols).unwrap();
            assert_eq!(again.bytes(), m.bytes(), "cols {cols}");
            let mut row = vec![0i8; cols];
            for r in 0..5 {
                m.row_codes(r, &mut row);
                assert_eq!(row, codes[r * cols..(r + 1) * cols], "cols {cols}");
            }
        }
        let m = random_ternary(1, 64, 1024).unwrap();
        let zeros = m.to_codes().iter().filter(|&&c| c == 0).count();
        assert!((20000..23700).contains(&zeros), "{zeros}");
    }

    #[test]
    fn bpe_segments_merges_best_rank_first() {
        // Ids: a=0, b=1, c=2, ab=3 (rank 3), bc=4 (rank 4).
        let merges = HashMap::from([((0, 1), 3), ((1, 2), 4)]);
        assert_eq!(bpe_segments(vec![0, 1, 2], &merges), vec![3, 2]);
        let merges = HashMap::from([((0, 1), 4), ((1, 2), 3)]);
        assert_eq!(bpe_segments(vec![0, 1, 2], &merges), vec![0, 3]);
        assert_eq!(bpe_segments(vec![2, 0], &merges), vec![2, 0]);
    }

    #[test]
    fn ordinary_tokens_are_distinct_and_merges_well_formed() {
        let (tokens, merges) = ordinary_tokens(5000);
        assert_eq!(tokens.len(), 5000);
        assert_eq!(merges.len(), 5000 - 256);
        let mut seen = HashSet::new();
        for t in &tokens {
            assert!(seen.insert(t.as_str()), "{t} twice");
        }
        let rank: HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        for (i, (l, r)) in merges.iter().enumerate() {
            // Both parts come before the token they make.
            assert!(rank[l.as_str()] < 256 + i && rank[r.as_str()] < 256 + i);
            assert_eq!(format!("{l}{r}"), tokens[256 + i]);
        }
    }
}
