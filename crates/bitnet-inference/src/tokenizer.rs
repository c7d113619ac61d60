//! Text to token ids and back, over Hugging Face's `tokenizers`.
//!
//! The wrapper exists to give the rest of the crate one error type, to check ids before they
//! reach the library (which silently drops ids it does not know), and to provide
//! [`StreamDecoder`], which turns a token stream into text without ever emitting half a UTF-8
//! character.

use crate::{Error, Result};
use std::path::Path;

/// A loaded tokenizer: normaliser, pre-tokenizer, model, post-processor and decoder as
/// described by a `tokenizer.json`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Cached because the library rebuilds the whole vocabulary map to count it.
    vocab_size: usize,
    /// One past the largest id with a token; ids at or above it are rejected by `decode`.
    id_limit: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The inner tokenizer's Debug prints the whole vocabulary.
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

/// The beginning- and end-of-sequence token ids named by a `tokenizer_config.json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialIds {
    /// The id of `bos_token`, if the config names one.
    pub bos: Option<u32>,
    /// The id of `eos_token`, if the config names one.
    pub eos: Option<u32>,
}

impl Tokenizer {
    /// Loads a `tokenizer.json`.
    ///
    /// A missing or unreadable file gives [`Error::Io`]; a file the library cannot parse gives
    /// [`Error::Tokenizer`] with the path and the parser's reason.
    pub fn from_file(tokenizer_json: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(tokenizer_json).map_err(|e| Error::io(tokenizer_json, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            Error::Tokenizer(format!("cannot load {}: {e}", tokenizer_json.display()))
        })?;
        Ok(Tokenizer::from_tokenizers(inner))
    }

    /// Wraps a tokenizer built elsewhere, for instance from GGUF metadata.
    pub fn from_tokenizers(inner: tokenizers::Tokenizer) -> Tokenizer {
        let vocab = inner.get_vocab(true);
        let vocab_size = vocab.len();
        let id_limit = vocab.values().max().map_or(0, |&max| max.saturating_add(1));
        Tokenizer {
            inner,
            vocab_size,
            id_limit,
        }
    }

    /// Encodes `text` into token ids.
    ///
    /// With `add_special_tokens`, the tokenizer's post-processor adds what its template says;
    /// for Llama-3-style tokenizers (and the test fixture) that is the BOS token in front.
    /// Without it, the ids are the text alone.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes token ids into text.
    ///
    /// Byte-level tokens that end in the middle of a multi-byte character decode to U+FFFD;
    /// use [`StreamDecoder`] to print text as it is generated. An id at or above the largest
    /// id in the vocabulary gives [`Error::InvalidInput`] (the library would silently drop
    /// it, hiding a mismatch between model and tokenizer).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id >= self.id_limit) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the tokenizer's vocabulary (ids 0..{})",
                self.id_limit
            )));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot decode ids: {e}")))
    }

    /// The number of distinct tokens, added tokens (BOS, EOS, ...) included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token string (not text: the token as it appears in the vocabulary).
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// The token string of an id, as it appears in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The underlying `tokenizers` tokenizer, for what this wrapper does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Reads `bos_token` and `eos_token` from a `tokenizer_config.json` and maps them to ids.
    ///
    /// The file is optional: when it does not exist, both ids are `None`. Each entry may be a
    /// string, an object with a `content` field (as `AddedToken` is serialised), or null. A
    /// file that cannot be read or parsed gives an error, and so does a token the tokenizer
    /// does not know, because a wrong EOS would let generation run on forever.
    pub fn special_ids_from_config(&self, tokenizer_config_json: &Path) -> Result<SpecialIds> {
        let path = tokenizer_config_json;
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SpecialIds::default()),
            Err(e) => return Err(Error::io(path, e)),
        };
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let lookup = |key: &str| -> Result<Option<u32>> {
            let content = match json.get(key) {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(serde_json::Value::String(s)) => s.as_str(),
                Some(serde_json::Value::Object(o)) => match o.get("content") {
                    Some(serde_json::Value::String(s)) => s.as_str(),
                    _ => {
                        return Err(Error::format(
                            path,
                            format!("`{key}` is an object without a string `content`"),
                        ))
                    }
                },
                Some(other) => {
                    return Err(Error::format(
                        path,
                        format!("`{key}` should be a string, found {other}"),
                    ))
                }
            };
            self.token_to_id(content).map(Some).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{} names {key} {content:?}, which the tokenizer does not know",
                    path.display()
                ))
            })
        };
        Ok(SpecialIds {
            bos: lookup("bos_token")?,
            eos: lookup("eos_token")?,
        })
    }
}

/// Turns a stream of token ids into text pieces that are safe to print as they come.
///
/// A byte-level BPE token can hold part of a multi-byte character, which decodes to U+FFFD on
/// its own; and some decoders treat the first token of a sequence specially (leading spaces).
/// So each step decodes a short window of recent ids twice, with and without the newest ones,
/// and emits the difference only once it no longer ends in U+FFFD.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    skip_special_tokens: bool,
    /// The ids from the start of the current window; older ones are dropped once emitted.
    ids: Vec<u32>,
    /// `ids[..read]` have been emitted as text; `ids[read..]` are pending.
    read: usize,
}

impl StreamDecoder {
    /// A decoder for a fresh sequence; `skip_special_tokens` is passed on to
    /// [`Tokenizer::decode`].
    pub fn new(skip_special_tokens: bool) -> StreamDecoder {
        StreamDecoder {
            skip_special_tokens,
            ids: Vec::new(),
            read: 0,
        }
    }

    /// Adds one generated id and returns the text it completes, if any.
    ///
    /// `None` means "nothing new to show yet" (an incomplete character, or a skipped special
    /// token). The pieces returned over a whole sequence, followed by [`StreamDecoder::finish`],
    /// concatenate to the decode of all ids. Errors are those of [`Tokenizer::decode`]; after
    /// an error the offending id has been discarded, so the stream can go on.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let (prefix_text, new_text) = match self.decode_window(tok) {
            Ok(texts) => texts,
            Err(e) => {
                self.ids.pop();
                return Err(e);
            }
        };
        if new_text.len() <= prefix_text.len() || new_text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(piece) = new_piece(&prefix_text, &new_text) else {
            return Ok(None);
        };
        let piece = piece.to_string();
        // The ids just emitted become the context of the next window; older ones are no
        // longer needed.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(Some(piece))
    }

    /// Returns whatever text is still pending (possibly ending in U+FFFD if the sequence
    /// stopped inside a character) and resets the decoder for a new sequence.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let texts = self.decode_window(tok);
        self.ids.clear();
        self.read = 0;
        let (prefix_text, new_text) = texts?;
        Ok(new_piece(&prefix_text, &new_text)
            .filter(|piece| !piece.is_empty())
            .map(str::to_string))
    }

    /// Decodes the context ids alone and the context plus pending ids.
    fn decode_window(&self, tok: &Tokenizer) -> Result<(String, String)> {
        let prefix_text = tok.decode(&self.ids[..self.read], self.skip_special_tokens)?;
        let new_text = tok.decode(&self.ids, self.skip_special_tokens)?;
        Ok((prefix_text, new_text))
    }
}

/// The part of `new_text` after the context's text.
///
/// Decoding more ids normally only appends, but a decoder is free to rewrite the tail of the
/// context (cleanup rules); then the best available is the text past the same byte offset,
/// and nothing if that offset is not a character boundary.
fn new_piece<'a>(prefix_text: &str, new_text: &'a str) -> Option<&'a str> {
    new_text
        .strip_prefix(prefix_text)
        .or_else(|| new_text.get(prefix_text.len()..))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(rel: &str) -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../testdata/tiny-bitnet/"
        ))
        .join(rel)
    }

    fn tok() -> Tokenizer {
        Tokenizer::from_file(&fixture("tokenizer/tokenizer.json")).unwrap()
    }

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("bitnet-tok-{}-{name}", std::process::id()))
    }

    fn prompt() -> (String, Vec<u32>) {
        let text = std::fs::read_to_string(fixture("ref/prompt.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ids = v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        (v["text"].as_str().unwrap().to_string(), ids)
    }

    #[test]
    fn encodes_prompt_like_reference() {
        let t = tok();
        let (text, expected) = prompt();
        let ids = t.encode(&text, true).unwrap();
        assert_eq!(ids, expected);
        assert_eq!(ids[0], 510);

        let npy: Vec<u32> = crate::npy::read(&fixture("ref/prompt_ids.npy"))
            .unwrap()
            .into_i64()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        assert_eq!(ids, npy);

        // Without special tokens the template adds nothing: the same ids minus BOS.
        assert_eq!(t.encode(&text, false).unwrap(), expected[1..]);
    }

    #[test]
    fn decode_round_trips_prompt() {
        let t = tok();
        let (text, ids) = prompt();
        assert_eq!(t.decode(&ids, true).unwrap(), text);
        assert_eq!(
            t.decode(&ids, false).unwrap(),
            format!("<|begin_of_text|>{text}")
        );
    }

    #[test]
    fn vocabulary_queries() {
        let t = tok();
        assert_eq!(t.vocab_size(), 512);
        assert_eq!(t.token_to_id("<|begin_of_text|>"), Some(510));
        assert_eq!(t.token_to_id("<|end_of_text|>"), Some(511));
        assert_eq!(t.id_to_token(511).as_deref(), Some("<|end_of_text|>"));
        // The fixture's byte alphabet starts at '!' (0x21) with id 0, so 'A' (0x41) is id 32.
        assert_eq!(t.id_to_token(32).as_deref(), Some("A"));
        assert_eq!(t.id_to_token(512), None);
        assert_eq!(t.token_to_id("no such token"), None);
        assert_eq!(t.inner().get_vocab_size(true), 512);
    }

    #[test]
    fn decode_rejects_out_of_range_ids() {
        let t = tok();
        let err = t.decode(&[265, 512], false).unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput(ref m) if m.contains("512")),
            "{err}"
        );
        assert!(t.decode(&[u32::MAX], true).is_err());
        assert_eq!(t.decode(&[], false).unwrap(), "");
    }

    #[test]
    fn load_errors_name_the_file() {
        let missing = scratch("missing-tokenizer.json");
        match Tokenizer::from_file(&missing) {
            Err(Error::Io { path, .. }) => assert_eq!(path, missing),
            other => panic!("expected an io error, got {other:?}"),
        }
        // A directory cannot be read as a file.
        assert!(Tokenizer::from_file(&fixture("tokenizer")).is_err());

        for (i, body) in ["not json", "{}", "{\"model\": 3}"].iter().enumerate() {
            let bad = scratch(&format!("bad-tokenizer-{i}.json"));
            std::fs::write(&bad, body).unwrap();
            let err = Tokenizer::from_file(&bad).unwrap_err();
            std::fs::remove_file(&bad).ok();
            match err {
                Error::Tokenizer(m) => assert!(m.contains(&*bad.to_string_lossy()), "{m}"),
                other => panic!("expected a tokenizer error, got {other}"),
            }
        }
    }

    #[test]
    fn special_ids_from_fixture_config() {
        let t = tok();
        let ids = t
            .special_ids_from_config(&fixture("tokenizer/tokenizer_config.json"))
            .unwrap();
        assert_eq!(
            ids,
            SpecialIds {
                bos: Some(510),
                eos: Some(511)
            }
        );
        let absent = t
            .special_ids_from_config(&scratch("no-config.json"))
            .unwrap();
        assert_eq!(absent, SpecialIds::default());
    }

    #[test]
    fn special_ids_accept_object_and_null_forms() {
        let t = tok();
        let cases = [
            (
                r#"{"bos_token": {"content": "<|begin_of_text|>", "special": true},
                   "eos_token": null}"#,
                Ok(SpecialIds {
                    bos: Some(510),
                    eos: None,
                }),
            ),
            (
                r#"{"eos_token": "<|end_of_text|>"}"#,
                Ok(SpecialIds {
                    bos: None,
                    eos: Some(511),
                }),
            ),
            (r#"{"eos_token": "</s>"}"#, Err("does not know")),
            (r#"{"eos_token": 5}"#, Err("should be a string")),
            (r#"{"bos_token": {"id": 5}}"#, Err("content")),
            ("{", Err("JSON")),
        ];
        for (i, (body, expected)) in cases.into_iter().enumerate() {
            let path = scratch(&format!("config-{i}.json"));
            std::fs::write(&path, body).unwrap();
            let got = t.special_ids_from_config(&path);
            std::fs::remove_file(&path).ok();
            match (got, expected) {
                (Ok(g), Ok(e)) => assert_eq!(g, e, "{body}"),
                (Err(g), Err(needle)) => assert!(g.to_string().contains(needle), "{body}: {g}"),
                (g, e) => panic!("{body}: got {g:?}, expected {e:?}"),
            }
        }
    }

    /// Feeds `ids` one at a time and returns the emitted pieces, the finish piece last.
    fn stream(t: &Tokenizer, ids: &[u32], skip: bool) -> Vec<String> {
        let mut d = StreamDecoder::new(skip);
        let mut pieces: Vec<String> = ids
            .iter()
            .filter_map(|&id| d.push(t, id).unwrap())
            .collect();
        pieces.extend(d.finish(t).unwrap());
        pieces
    }

    #[test]
    fn stream_decoder_never_splits_characters() {
        let t = tok();
        let text = "héllo wörld ✓ 日本";
        let ids = t.encode(text, true).unwrap();
        // The fixture has few merges, so some multi-byte characters must span tokens;
        // otherwise this test would not exercise the waiting path.
        let fragments = ids
            .iter()
            .filter(|&&id| t.decode(&[id], false).unwrap().contains('\u{FFFD}'))
            .count();
        assert!(fragments > 0);

        for skip in [false, true] {
            let pieces = stream(&t, &ids, skip);
            assert_eq!(pieces.concat(), t.decode(&ids, skip).unwrap());
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
            // Fewer pieces than ids: the fragments were held back and merged.
            assert!(pieces.len() < ids.len());
        }
        assert_eq!(stream(&t, &ids, true).concat(), text);
    }

    #[test]
    fn stream_decoder_matches_on_prompt() {
        let t = tok();
        let (text, ids) = prompt();
        let pieces = stream(&t, &ids, true);
        assert_eq!(pieces.concat(), text);
        // Pure ASCII: every id completes text at once, except BOS which is skipped.
        assert_eq!(pieces.len(), ids.len() - 1);
    }

    #[test]
    fn stream_decoder_finish_flushes_incomplete_character() {
        let t = tok();
        let ids = t.encode("日", false).unwrap();
        assert!(ids.len() > 1, "{ids:?}");
        let partial = &ids[..ids.len() - 1];
        let mut d = StreamDecoder::new(false);
        for &id in partial {
            assert_eq!(d.push(&t, id).unwrap(), None);
        }
        let rest = d.finish(&t).unwrap();
        assert_eq!(rest, Some(t.decode(partial, false).unwrap()));
        assert!(rest.unwrap().ends_with('\u{FFFD}'));
        // finish resets: the decoder starts over cleanly.
        assert_eq!(d.finish(&t).unwrap(), None);
        assert_eq!(stream(&t, &ids, false).concat(), "日");
    }

    #[test]
    fn stream_decoder_recovers_from_bad_id() {
        let t = tok();
        let ids = t.encode("ok ✓", false).unwrap();
        let mut d = StreamDecoder::new(false);
        let mut out = String::new();
        for (i, &id) in ids.iter().enumerate() {
            if i == 1 {
                assert!(d.push(&t, 9999).is_err());
            }
            out.extend(d.push(&t, id).unwrap());
        }
        out.extend(d.finish(&t).unwrap());
        assert_eq!(out, "ok ✓");
    }
}
