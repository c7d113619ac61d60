//! Tokenizers stored in GGUF metadata (`tokenizer.ggml.*`), in both directions.
//!
//! llama.cpp's converter flattens a Hugging Face tokenizer into a few arrays: tokens by id,
//! BPE merges as `"left right"` strings, a type per token, and a handful of scalars. The
//! regular expression that splits text before BPE is not stored; only a name for it is
//! (`tokenizer.ggml.pre`). To give the rest of the crate a single tokenizer type, this module
//! rebuilds the `tokenizer.json` that such a file came from and loads it through the
//! `tokenizers` library, and it does the reverse for the GGUF writer.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`), as used by Llama 3 and by BitNet
//! b1.58 2B-4T, is supported. Everything read from the file is checked first, so hostile
//! metadata gives an error naming the key instead of a panic or a silently different
//! tokenizer.

use crate::formats::gguf::{GgufArray, GgufFile, GgufValue, GgufValueType};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// Metadata key naming the tokenizer model (`"gpt2"` for byte-level BPE).
pub const KEY_MODEL: &str = "tokenizer.ggml.model";
/// Metadata key naming the pre-tokenizer (the text-splitting regex) by llama.cpp's names.
pub const KEY_PRE: &str = "tokenizer.ggml.pre";
/// Metadata key of the token strings, indexed by id.
pub const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
/// Metadata key of the per-token types (see [`TokenType`]).
pub const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
/// Metadata key of the BPE merges, highest priority first, each `"left right"`.
pub const KEY_MERGES: &str = "tokenizer.ggml.merges";
/// Metadata key of the beginning-of-sequence token id.
pub const KEY_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
/// Metadata key of the end-of-sequence token id.
pub const KEY_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
/// Metadata key of the padding token id.
pub const KEY_PADDING_ID: &str = "tokenizer.ggml.padding_token_id";
/// Metadata key saying whether encoding puts BOS in front of the text.
pub const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
/// Metadata key saying whether encoding puts EOS after the text.
pub const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
/// Metadata key of the Jinja chat template.
pub const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// The regex that Llama 3 (and BitNet b1.58 2B-4T) split text with before byte-level BPE.
///
/// Spelled exactly as in their `tokenizer.json`, since the `tokenizers` library, not
/// llama.cpp, runs it here.
pub const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.token_type` codes, as llama.cpp defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// 0: no type recorded; treated like [`TokenType::Normal`].
    Undefined,
    /// 1: an ordinary vocabulary entry.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: a control token (BOS, EOS, chat markers): matched whole in text, skipped when
    /// decoding with `skip_special_tokens`.
    Control,
    /// 4: a user-defined token: matched whole in text, decoded as itself.
    UserDefined,
    /// 5: an unused slot that never occurs in text.
    Unused,
    /// 6: a raw byte (SentencePiece's `<0xAB>` tokens).
    Byte,
}

impl TokenType {
    /// The type with code `code`, or `None` for a code llama.cpp does not define.
    pub fn from_code(code: i64) -> Option<TokenType> {
        Some(match code {
            0 => TokenType::Undefined,
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return None,
        })
    }

    /// The code stored in `tokenizer.ggml.token_type`.
    pub fn code(self) -> i32 {
        match self {
            TokenType::Undefined => 0,
            TokenType::Normal => 1,
            TokenType::Unknown => 2,
            TokenType::Control => 3,
            TokenType::UserDefined => 4,
            TokenType::Unused => 5,
            TokenType::Byte => 6,
        }
    }
}

/// The pre-tokenizers this module can rebuild, by their `tokenizer.ggml.pre` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreTokenizer {
    /// Llama 3's split regex followed by the byte-level mapping without its own regex.
    Llama3,
    /// The byte-level pre-tokenizer with GPT-2's built-in regex.
    Gpt2,
}

impl PreTokenizer {
    /// The name written to `tokenizer.ggml.pre`.
    fn gguf_name(self) -> &'static str {
        match self {
            PreTokenizer::Llama3 => "llama-bpe",
            PreTokenizer::Gpt2 => "gpt2",
        }
    }

    /// Maps a `tokenizer.ggml.pre` value to a pre-tokenizer.
    ///
    /// A missing key means Llama 3, because Microsoft's bitnet-b1.58-2B-4T GGUF, the model
    /// this crate is for, has no such key and uses the Llama 3 tokenizer. The aliases are the
    /// names llama.cpp treats as the same regex.
    fn from_gguf_name(name: Option<&str>) -> std::result::Result<PreTokenizer, String> {
        match name {
            None | Some("llama-bpe" | "llama3" | "llama-v3") => Ok(PreTokenizer::Llama3),
            Some("gpt2") => Ok(PreTokenizer::Gpt2),
            Some(other) => Err(format!(
                "`{KEY_PRE}` is {}, a pre-tokenizer this crate does not know \
                 (supported: \"llama-bpe\", \"gpt2\")",
                quoted(other)
            )),
        }
    }

    /// The `pre_tokenizer` section of a `tokenizer.json`, as Hugging Face writes it for the
    /// model family, so that loading and serialising give the same structure as theirs.
    fn to_json(self) -> Value {
        match self {
            PreTokenizer::Llama3 => json!({
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split",
                        "pattern": { "Regex": LLAMA3_SPLIT_REGEX },
                        "behavior": "Isolated",
                        "invert": false
                    },
                    {
                        "type": "ByteLevel",
                        "add_prefix_space": false,
                        "trim_offsets": true,
                        "use_regex": false
                    }
                ]
            }),
            PreTokenizer::Gpt2 => json!({
                "type": "ByteLevel",
                "add_prefix_space": false,
                "trim_offsets": true,
                "use_regex": true
            }),
        }
    }

    /// Whether BPE first looks a whole pre-tokenized word up in the vocabulary and only
    /// merges when it is absent.
    ///
    /// GGUF has no key for this; llama.cpp ties it to the pre-tokenizer, switching it on for
    /// Llama 3, whose Hugging Face `tokenizer.json` does the same. It only matters for a
    /// word that is in the vocabulary but that the merges would split differently.
    fn ignore_merges(self) -> bool {
        match self {
            PreTokenizer::Llama3 => true,
            PreTokenizer::Gpt2 => false,
        }
    }

    /// Recognises a serialised `pre_tokenizer` section as one of ours.
    ///
    /// Only exact structures are accepted: any other option changes how text is split, and
    /// the GGUF file could not say so.
    fn from_json(pre: &Value) -> Option<PreTokenizer> {
        let byte_level = |v: &Value, use_regex: bool| {
            v.get("type") == Some(&json!("ByteLevel"))
                && v.get("add_prefix_space") == Some(&json!(false))
                && v.get("use_regex") == Some(&json!(use_regex))
        };
        if byte_level(pre, true) {
            return Some(PreTokenizer::Gpt2);
        }
        if pre.get("type") != Some(&json!("Sequence")) {
            return None;
        }
        match pre.get("pretokenizers")?.as_array()?.as_slice() {
            [split, bl] => {
                let split_ok = split.get("type") == Some(&json!("Split"))
                    && split.get("pattern") == Some(&json!({ "Regex": LLAMA3_SPLIT_REGEX }))
                    && split.get("behavior") == Some(&json!("Isolated"))
                    && split.get("invert") == Some(&json!(false));
                (split_ok && byte_level(bl, false)).then_some(PreTokenizer::Llama3)
            }
            _ => None,
        }
    }
}

/// Builds a tokenizer from the `tokenizer.ggml.*` metadata of a GGUF file.
///
/// Supports byte-level BPE (`tokenizer.ggml.model = "gpt2"`) with the Llama 3 pre-tokenizer
/// (`tokenizer.ggml.pre = "llama-bpe"`, or no `pre` key at all) or GPT-2's (`"gpt2"`).
/// Control tokens (type 3) become special tokens: matched whole in text and dropped by
/// `decode(.., true)`. With `tokenizer.ggml.add_bos_token` (default: true when a BOS id is
/// given), `encode(text, true)` puts BOS first, as the Hugging Face tokenizer does.
///
/// Metadata that is missing, of the wrong type, out of range or inconsistent (a merge naming
/// a token the vocabulary lacks, a duplicate token) gives [`Error::Format`] naming the file
/// and the key. SentencePiece (`"llama"`) and other tokenizer models are reported as
/// unsupported.
pub fn tokenizer_from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
    build_tokenizer(|key| gguf.get(key)).map_err(|reason| Error::format(gguf.path(), reason))
}

/// Builds a tokenizer from GGUF metadata entries, as [`tokenizer_from_gguf`] does.
///
/// This takes the entries rather than a file so that metadata about to be written (for
/// instance by [`gguf_tokenizer_metadata`]) can be checked before a file exists. When a key
/// appears more than once the first entry counts. Errors are [`Error::Tokenizer`], since
/// there is no file to name.
pub fn tokenizer_from_metadata(metadata: &[(String, GgufValue)]) -> Result<Tokenizer> {
    build_tokenizer(|key| metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v))
        .map_err(|reason| Error::Tokenizer(format!("invalid GGUF tokenizer metadata: {reason}")))
}

/// The chat template (`tokenizer.chat_template`), if the file has one as a string.
pub fn chat_template(gguf: &GgufFile) -> Option<String> {
    gguf.get(KEY_CHAT_TEMPLATE)
        .and_then(GgufValue::as_str)
        .map(str::to_string)
}

/// The shared builder: reads and checks every key through `get`, then loads the equivalent
/// `tokenizer.json`. Errors are bare reasons; the callers add the file or context.
fn build_tokenizer<'a>(
    get: impl Fn(&str) -> Option<&'a GgufValue>,
) -> std::result::Result<Tokenizer, String> {
    let model = match get(KEY_MODEL) {
        None => {
            return Err(format!(
                "metadata key `{KEY_MODEL}` is missing, so the file carries no tokenizer"
            ))
        }
        Some(v) => v
            .as_str()
            .ok_or_else(|| wrong_type(KEY_MODEL, v, "a string"))?,
    };
    match model {
        "gpt2" => {}
        "llama" => {
            return Err(format!(
                "`{KEY_MODEL}` is \"llama\" (SentencePiece), which is not supported; \
                 only byte-level BPE (\"gpt2\") tokenizers are"
            ))
        }
        other => {
            return Err(format!(
                "`{KEY_MODEL}` is {}, which is not supported; only byte-level BPE (\"gpt2\") \
                 tokenizers are",
                quoted(other)
            ))
        }
    }

    let pre = match get(KEY_PRE) {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| wrong_type(KEY_PRE, v, "a string"))?,
        ),
    };
    let pre = PreTokenizer::from_gguf_name(pre)?;

    let tokens = required_strings(&get, KEY_TOKENS)?;
    if tokens.is_empty() {
        return Err(format!("`{KEY_TOKENS}` is empty"));
    }
    let n_tokens = u32::try_from(tokens.len())
        .map_err(|_| format!("`{KEY_TOKENS}` has {} entries, too many", tokens.len()))?;
    let types = token_types(&get, tokens.len())?;

    let mut ids: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    for (id, token) in (0u32..).zip(tokens) {
        if token.is_empty() {
            return Err(format!("`{KEY_TOKENS}`: token {id} is an empty string"));
        }
        // The vocabulary of a `tokenizer.json` is a map from string to id, so a repeated
        // string would leave one of the ids without a token.
        if let Some(first) = ids.insert(token, id) {
            return Err(format!(
                "`{KEY_TOKENS}`: tokens {first} and {id} are both {}",
                quoted(token)
            ));
        }
    }

    let merges = required_strings(&get, KEY_MERGES)?;
    let mut merges_json = Vec::with_capacity(merges.len());
    for (i, merge) in merges.iter().enumerate() {
        let (left, right) = split_merge(merge).ok_or_else(|| {
            format!(
                "`{KEY_MERGES}`: merge {i} ({}) is not two tokens separated by a space",
                quoted(merge)
            )
        })?;
        // The library checks these too, but its message names neither key nor index.
        for part in [left, right] {
            if !ids.contains_key(part) {
                return Err(format!(
                    "`{KEY_MERGES}`: merge {i} ({}) names {}, which is not in `{KEY_TOKENS}`",
                    quoted(merge),
                    quoted(part)
                ));
            }
        }
        let joined = format!("{left}{right}");
        if !ids.contains_key(joined.as_str()) {
            return Err(format!(
                "`{KEY_MERGES}`: merge {i} ({}) makes {}, which is not in `{KEY_TOKENS}`",
                quoted(merge),
                quoted(&joined)
            ));
        }
        merges_json.push(json!([left, right]));
    }

    let bos = optional_id(&get, KEY_BOS_ID, n_tokens)?;
    let eos = optional_id(&get, KEY_EOS_ID, n_tokens)?;
    // Read only to reject a malformed value; padding does not change encoding.
    optional_id(&get, KEY_PADDING_ID, n_tokens)?;
    let add_bos = match (optional_bool(&get, KEY_ADD_BOS)?, bos) {
        (Some(true), None) => {
            return Err(format!(
                "`{KEY_ADD_BOS}` is true but `{KEY_BOS_ID}` is missing"
            ))
        }
        (Some(add), _) => add,
        // llama.cpp adds BOS for byte-level BPE unless told otherwise.
        (None, bos) => bos.is_some(),
    };
    let add_eos = match (optional_bool(&get, KEY_ADD_EOS)?, eos) {
        (Some(true), None) => {
            return Err(format!(
                "`{KEY_ADD_EOS}` is true but `{KEY_EOS_ID}` is missing"
            ))
        }
        (add, _) => add.unwrap_or(false),
    };

    // Every token goes into the BPE vocabulary, added ones included: the library gives an
    // added token the model's id for its string when there is one, and otherwise the next
    // free id past the model vocabulary, which would renumber a control token that sits in
    // the middle of the id range.
    let mut vocab = Map::with_capacity(tokens.len());
    let mut added_tokens = Vec::new();
    for ((id, token), ty) in (0u32..).zip(tokens).zip(&types) {
        vocab.insert(token.clone(), json!(id));
        let special = match ty {
            TokenType::Control => true,
            TokenType::UserDefined => false,
            _ => continue,
        };
        added_tokens.push(added_token_json(id, token, special));
    }

    let with_token = |id: Option<u32>| {
        id.and_then(|id| Some((id, tokens.get(usize::try_from(id).ok()?)?.as_str())))
    };
    let post_processor = post_processor_json(
        with_token(bos.filter(|_| add_bos)),
        with_token(eos.filter(|_| add_eos)),
    );

    let tokenizer_json = bpe_tokenizer_json(pre, vocab, merges_json, added_tokens, post_processor);
    let inner: tokenizers::Tokenizer = serde_json::from_value(tokenizer_json)
        .map_err(|e| format!("the tokenizer library rejected the vocabulary: {e}"))?;
    Ok(Tokenizer::from_tokenizers(inner))
}

/// The `post_processor` section: byte-level offsets, then a template adding BOS and/or EOS.
///
/// This is the structure of Llama 3's `tokenizer.json`; the template for pairs repeats BOS
/// before the second sequence as theirs does.
/// An `added_tokens` entry: matched whole in text, never normalised or stripped.
pub(crate) fn added_token_json(id: u32, content: &str, special: bool) -> Value {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": false,
        "special": special
    })
}

/// A byte-level BPE `tokenizer.json` (no normaliser, byte-level decoder) around its parts.
fn bpe_tokenizer_json(
    pre: PreTokenizer,
    vocab: Map<String, Value>,
    merges: Vec<Value>,
    added_tokens: Vec<Value>,
    post_processor: Value,
) -> Value {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre.to_json(),
        "post_processor": post_processor,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre.ignore_merges(),
            "vocab": vocab,
            "merges": merges
        }
    })
}

/// A Llama-3-style byte-level BPE `tokenizer.json` (the form GGUF can describe) whose
/// post-processor puts `bos` first, for tokenizers built elsewhere in the crate.
pub(crate) fn llama3_bpe_tokenizer_json(
    vocab: Map<String, Value>,
    merges: Vec<Value>,
    added_tokens: Vec<Value>,
    bos: Option<(u32, &str)>,
) -> Value {
    bpe_tokenizer_json(
        PreTokenizer::Llama3,
        vocab,
        merges,
        added_tokens,
        post_processor_json(bos, None),
    )
}

fn post_processor_json(bos: Option<(u32, &str)>, eos: Option<(u32, &str)>) -> Value {
    // One sequence with its BOS and EOS around it, each part tagged with the sequence's type.
    let around = |seq: &str, type_id: u32| -> Vec<Value> {
        let special = |token: Option<(u32, &str)>| {
            token.map(
                |(_, content)| json!({ "SpecialToken": { "id": content, "type_id": type_id } }),
            )
        };
        let sequence = json!({ "Sequence": { "id": seq, "type_id": type_id } });
        special(bos)
            .into_iter()
            .chain([sequence])
            .chain(special(eos))
            .collect()
    };
    let single = around("A", 0);
    let pair: Vec<Value> = around("A", 0).into_iter().chain(around("B", 1)).collect();
    let mut special_tokens = Map::new();
    for (id, content) in bos.into_iter().chain(eos) {
        special_tokens.insert(
            content.to_string(),
            json!({ "id": content, "ids": [id], "tokens": [content] }),
        );
    }
    json!({
        "type": "Sequence",
        "processors": [
            {
                "type": "ByteLevel",
                "add_prefix_space": true,
                "trim_offsets": false,
                "use_regex": true
            },
            {
                "type": "TemplateProcessing",
                "single": single,
                "pair": pair,
                "special_tokens": special_tokens
            }
        ]
    })
}

/// Splits a merge `"left right"` at the first space after the first character, as llama.cpp
/// does, so that a left part that is itself a space still parses.
fn split_merge(merge: &str) -> Option<(&str, &str)> {
    let first_len = merge.chars().next()?.len_utf8();
    let space = first_len + merge[first_len..].find(' ')?;
    let (left, right) = (&merge[..space], &merge[space + 1..]);
    (!right.is_empty()).then_some((left, right))
}

/// The array of strings under `key`, which must exist.
fn required_strings<'a>(
    get: &impl Fn(&str) -> Option<&'a GgufValue>,
    key: &str,
) -> std::result::Result<&'a [String], String> {
    let v = get(key).ok_or_else(|| format!("metadata key `{key}` is missing"))?;
    v.as_array()
        .and_then(GgufArray::as_strings)
        .ok_or_else(|| wrong_type(key, v, "an array of strings"))
}

/// The token types, one per token; all normal when the key is absent, as in llama.cpp.
fn token_types<'a>(
    get: &impl Fn(&str) -> Option<&'a GgufValue>,
    n_tokens: usize,
) -> std::result::Result<Vec<TokenType>, String> {
    let Some(v) = get(KEY_TOKEN_TYPE) else {
        return Ok(vec![TokenType::Normal; n_tokens]);
    };
    let array = v
        .as_array()
        .filter(|a| is_integer_type(a.elem_type()))
        .ok_or_else(|| wrong_type(KEY_TOKEN_TYPE, v, "an array of integers"))?;
    if array.len() != n_tokens {
        return Err(format!(
            "`{KEY_TOKEN_TYPE}` has {} entries but `{KEY_TOKENS}` has {n_tokens}",
            array.len()
        ));
    }
    (0..n_tokens)
        .map(|id| {
            let code = array.get(id).and_then(|c| c.as_i64());
            code.and_then(TokenType::from_code).ok_or_else(|| {
                format!(
                    "`{KEY_TOKEN_TYPE}`: token {id} has type {}, which is not one of 0..=6",
                    code.map_or_else(|| "?".to_string(), |c| c.to_string())
                )
            })
        })
        .collect()
}

/// Whether arrays of `t` hold integers.
fn is_integer_type(t: GgufValueType) -> bool {
    matches!(
        t,
        GgufValueType::U8
            | GgufValueType::I8
            | GgufValueType::U16
            | GgufValueType::I16
            | GgufValueType::U32
            | GgufValueType::I32
            | GgufValueType::U64
            | GgufValueType::I64
    )
}

/// The token id under `key`, if present; it must name one of the `n_tokens` tokens.
fn optional_id<'a>(
    get: &impl Fn(&str) -> Option<&'a GgufValue>,
    key: &str,
    n_tokens: u32,
) -> std::result::Result<Option<u32>, String> {
    let Some(v) = get(key) else {
        return Ok(None);
    };
    let id = v
        .as_u32()
        .ok_or_else(|| wrong_type(key, v, "a non-negative integer"))?;
    if id >= n_tokens {
        return Err(format!(
            "`{key}` is {id}, outside the vocabulary (ids 0..{n_tokens})"
        ));
    }
    Ok(Some(id))
}

/// The bool under `key`, if present.
fn optional_bool<'a>(
    get: &impl Fn(&str) -> Option<&'a GgufValue>,
    key: &str,
) -> std::result::Result<Option<bool>, String> {
    match get(key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| wrong_type(key, v, "a bool")),
    }
}

fn wrong_type(key: &str, v: &GgufValue, expected: &str) -> String {
    let shown = match v {
        // A hostile string can be megabytes long; the start is enough to recognise it.
        GgufValue::String(s) => quoted(s),
        _ => v.to_string(),
    };
    format!(
        "metadata key `{key}` holds a {} ({shown}), expected {expected}",
        v.value_type()
    )
}

/// `s` in quotes, cut short if long, for error messages.
fn quoted(s: &str) -> String {
    const MAX_CHARS: usize = 64;
    match s.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// Produces the `tokenizer.ggml.*` metadata describing `tok`, for writing a GGUF file.
///
/// The result has, in llama.cpp's order: `model` = "gpt2", `pre` ("llama-bpe" for the Llama 3
/// split regex, "gpt2" for GPT-2's), `tokens` for every id from 0 up to the largest,
/// `token_type` (3 for special added tokens, 4 for other added tokens, 1 for the rest),
/// `merges`, `bos_token_id`/`eos_token_id` when known, and `add_bos_token`/`add_eos_token`
/// as the tokenizer's post-processor behaves. `bos` and `eos` are the ids from
/// `tokenizer_config.json`; when one is `None` but the post-processor adds a token in that
/// place, that token's id is used.
///
/// GGUF has no key for BPE's `ignore_merges` option; readers (this module's and llama.cpp's)
/// derive it from `pre`, on for "llama-bpe" and off for "gpt2". A tokenizer whose setting
/// differs is still described, since the two settings only disagree on words that are in
/// the vocabulary yet not reachable through its merges.
///
/// Tokenizers that GGUF cannot describe give [`Error::Tokenizer`]: anything but byte-level
/// BPE without normaliser, another pre-tokenizer, a hole in the ids, added tokens with
/// strip options, or a post-processor adding tokens other than BOS and EOS.
pub fn gguf_tokenizer_metadata(
    tok: &Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<Vec<(String, GgufValue)>> {
    metadata_for(tok, bos, eos).map_err(|reason| {
        Error::Tokenizer(format!("cannot describe the tokenizer in GGUF: {reason}"))
    })
}

fn metadata_for(
    tok: &Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
) -> std::result::Result<Vec<(String, GgufValue)>, String> {
    let inner = tok.inner();
    let vocab = inner.get_vocab(true);
    let Some(&max_id) = vocab.values().max() else {
        return Err("its vocabulary is empty".to_string());
    };
    let n_tokens = usize::try_from(max_id)
        .ok()
        .and_then(|m| m.checked_add(1))
        .ok_or_else(|| format!("its largest id {max_id} is too large"))?;
    // Checked first: serialising walks every id up to the largest (warning about each
    // hole), and the table below has a slot per id, so a stray huge id would take forever.
    if n_tokens != vocab.len() {
        return Err(format!(
            "its {} tokens do not have the ids 0..{n_tokens} without holes",
            vocab.len()
        ));
    }
    // The library exposes the merges and the component options only through
    // serialisation.
    let serialized = inner
        .to_string(false)
        .map_err(|e| format!("cannot serialise it: {e}"))?;
    let json: Value =
        serde_json::from_str(&serialized).map_err(|e| format!("cannot read it back: {e}"))?;

    let model = &json["model"];
    if model["type"] != json!("BPE") {
        return Err(format!("its model is {}, not BPE", model["type"]));
    }
    // Options that change the segmentation but that GGUF has no key for.
    for (option, neutral) in [
        ("dropout", Value::Null),
        ("unk_token", Value::Null),
        ("continuing_subword_prefix", Value::Null),
        ("end_of_word_suffix", Value::Null),
        ("byte_fallback", json!(false)),
    ] {
        let value = model.get(option).unwrap_or(&Value::Null);
        if *value != neutral && !(neutral == json!(false) && value.is_null()) {
            return Err(format!(
                "its BPE model sets `{option}` to {value}, which GGUF cannot record"
            ));
        }
    }
    if !json["normalizer"].is_null() {
        return Err("it has a normaliser, which GGUF cannot record".to_string());
    }
    let pre = PreTokenizer::from_json(&json["pre_tokenizer"]).ok_or_else(|| {
        "its pre-tokenizer is neither Llama 3's split regex with byte-level mapping nor GPT-2's \
         byte-level one"
            .to_string()
    })?;
    if json["decoder"]["type"] != json!("ByteLevel") {
        return Err(format!(
            "its decoder is {}, not byte-level",
            json["decoder"]["type"]
        ));
    }

    let mut tokens: Vec<Option<String>> = vec![None; n_tokens];
    for (token, &id) in &vocab {
        let slot = &mut tokens[id as usize];
        if let Some(other) = slot {
            return Err(format!(
                "id {id} is both {} and {}",
                quoted(other),
                quoted(token)
            ));
        }
        *slot = Some(token.clone());
    }
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| {
            t.ok_or_else(|| {
                format!("id {id} has no token (ids must be 0..{n_tokens} without holes)")
            })
        })
        .collect::<std::result::Result<Vec<String>, String>>()?;

    let mut token_types = vec![TokenType::Normal.code(); n_tokens];
    for (id, added) in inner.get_added_tokens_decoder() {
        if added.lstrip || added.rstrip || added.single_word {
            return Err(format!(
                "added token {} has strip or single-word options, which GGUF cannot record",
                quoted(&added.content)
            ));
        }
        let ty = if added.special {
            TokenType::Control
        } else {
            TokenType::UserDefined
        };
        if let Some(slot) = token_types.get_mut(id as usize) {
            *slot = ty.code();
        }
    }

    let merges = merges_from_json(&model["merges"])?;

    let (bos, eos, add_bos, add_eos) = added_by_post_processor(tok, bos, eos)?;
    for (what, id) in [("BOS", bos), ("EOS", eos)] {
        if let Some(id) = id.filter(|&id| id as usize >= n_tokens) {
            return Err(format!(
                "the {what} id {id} is outside the vocabulary (ids 0..{n_tokens})"
            ));
        }
    }

    let string = |s: &str| GgufValue::String(s.to_string());
    let mut metadata = vec![
        (KEY_MODEL.to_string(), string("gpt2")),
        (KEY_PRE.to_string(), string(pre.gguf_name())),
        (
            KEY_TOKENS.to_string(),
            GgufValue::Array(GgufArray::String(tokens)),
        ),
        (
            KEY_TOKEN_TYPE.to_string(),
            GgufValue::Array(GgufArray::I32(token_types)),
        ),
        (
            KEY_MERGES.to_string(),
            GgufValue::Array(GgufArray::String(merges)),
        ),
    ];
    if let Some(id) = bos {
        metadata.push((KEY_BOS_ID.to_string(), GgufValue::U32(id)));
    }
    if let Some(id) = eos {
        metadata.push((KEY_EOS_ID.to_string(), GgufValue::U32(id)));
    }
    metadata.push((KEY_ADD_BOS.to_string(), GgufValue::Bool(add_bos)));
    metadata.push((KEY_ADD_EOS.to_string(), GgufValue::Bool(add_eos)));
    Ok(metadata)
}

/// Reads `model.merges` of a serialised BPE model into GGUF's `"left right"` form.
///
/// Older `tokenizers` versions serialise merges as such strings, recent ones (0.22 among them)
/// as `[left, right]` pairs; both are accepted.
fn merges_from_json(merges: &Value) -> std::result::Result<Vec<String>, String> {
    let list = merges
        .as_array()
        .ok_or_else(|| "its BPE model has no list of merges".to_string())?;
    list.iter()
        .enumerate()
        .map(|(i, merge)| {
            let (left, right) = match merge {
                Value::String(s) => split_merge(s)
                    .ok_or_else(|| format!("merge {i} ({}) is not two tokens", quoted(s)))?,
                Value::Array(pair) => match pair.as_slice() {
                    [Value::String(l), Value::String(r)] => (l.as_str(), r.as_str()),
                    _ => return Err(format!("merge {i} is not a pair of strings: {merge}")),
                },
                _ => return Err(format!("merge {i} is neither a string nor a pair: {merge}")),
            };
            // GGUF joins the pair with a space, so a space inside a part would be read back
            // as a different split.
            let joined = format!("{left} {right}");
            if split_merge(&joined) != Some((left, right)) {
                return Err(format!(
                    "merge {i} ({} + {}) cannot be written as \"left right\"",
                    quoted(left),
                    quoted(right)
                ));
            }
            Ok(joined)
        })
        .collect()
}

/// Finds out what the post-processor adds around a text, by encoding a probe with and
/// without special tokens: the configuration of a template processor is not public.
///
/// Returns the BOS and EOS ids (filled in from the post-processor where the caller had none)
/// and whether each is added.
fn added_by_post_processor(
    tok: &Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
) -> std::result::Result<(Option<u32>, Option<u32>, bool, bool), String> {
    const PROBE: &str = "probe";
    let encode = |add_special| {
        tok.encode(PROBE, add_special)
            .map_err(|e| format!("cannot encode a probe text: {e}"))
    };
    let plain = encode(false)?;
    let with_special = encode(true)?;
    let start = (0..=with_special.len().saturating_sub(plain.len()))
        .find(|&s| with_special[s..].starts_with(&plain))
        .ok_or_else(|| {
            "its post-processor changes the text's own tokens, which GGUF cannot record".to_string()
        })?;
    let (prefix, rest) = with_special.split_at(start);
    let suffix = &rest[plain.len()..];
    let check = |what: &str, added: &[u32], expected: Option<u32>| match (added, expected) {
        ([], _) => Ok((expected, false)),
        ([id], None) => Ok((Some(*id), true)),
        ([id], Some(e)) if *id == e => Ok((expected, true)),
        _ => Err(format!(
            "its post-processor adds {added:?} {what} the text, but GGUF can only record \
             adding the {} id {}",
            if what == "before" { "BOS" } else { "EOS" },
            expected.map_or_else(|| "(none)".to_string(), |e| e.to_string())
        )),
    };
    let (bos, add_bos) = check("before", prefix, bos)?;
    let (eos, add_eos) = check("after", suffix, eos)?;
    Ok((bos, eos, add_bos, add_eos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_merge_handles_leading_space_and_unicode() {
        assert_eq!(split_merge("a b"), Some(("a", "b")));
        assert_eq!(split_merge("Ġt ern"), Some(("Ġt", "ern")));
        assert_eq!(split_merge("  x"), Some((" ", "x")));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge("a "), None);
        assert_eq!(split_merge(""), None);
        assert_eq!(split_merge("é"), None);
    }

    #[test]
    fn quoted_cuts_long_strings_on_char_boundaries() {
        let long = "é".repeat(100);
        let q = quoted(&long);
        assert!(q.ends_with("..."));
        assert_eq!(q.chars().filter(|&c| c == 'é').count(), 64);
    }

    #[test]
    fn token_type_codes_round_trip() {
        for code in 0..=6 {
            let ty = TokenType::from_code(code).unwrap();
            assert_eq!(i64::from(ty.code()), code);
        }
        assert_eq!(TokenType::from_code(7), None);
        assert_eq!(TokenType::from_code(-1), None);
    }
}
