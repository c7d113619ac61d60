//! The tokenizer rebuilt from GGUF metadata must encode and decode exactly like the
//! `tokenizer.json` the GGUF files were converted from, and hostile metadata must give errors.

use bitnet_inference::formats::gguf::{GgufArray, GgufFile, GgufValue};
use bitnet_inference::formats::gguf_tokenizer::{
    chat_template, gguf_tokenizer_metadata, tokenizer_from_gguf, tokenizer_from_metadata,
    KEY_ADD_BOS, KEY_BOS_ID, KEY_MERGES, KEY_MODEL, KEY_PRE, KEY_TOKENS, KEY_TOKEN_TYPE,
};
use bitnet_inference::tokenizer::Tokenizer;
use bitnet_inference::Error;
use std::path::PathBuf;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

const QUANTS: [&str; 3] = ["TQ1_0", "TQ2_0", "F32"];

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/tiny-bitnet/"
    ))
    .join(rel)
}

fn gguf(quant: &str) -> GgufFile {
    GgufFile::open(fixture(&format!("gguf/tiny-bitnet-{quant}.gguf"))).unwrap()
}

fn json_tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixture("tokenizer/tokenizer.json")).unwrap()
}

/// The reference prompt and its ids.
fn prompt() -> (String, Vec<u32>) {
    let text = std::fs::read_to_string(fixture("ref/prompt.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = json["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
        .collect();
    (json["text"].as_str().unwrap().to_string(), ids)
}

/// A few hundred varied lines, the same on every run.
fn texts() -> Vec<String> {
    const FRAGMENTS: &[&str] = &[
        "The ternary weights of BitNet are -1, 0 and +1",
        "activations use 8 bits.",
        "hello world",
        "Hello World",
        "HELLO",
        "don't",
        "I'LL",
        "you're",
        "we've",
        "she'd",
        "I'm",
        "it's",
        "'s",
        "1234567",
        "3.14159",
        "0",
        "42",
        "2024-06-01",
        "1,000,000",
        "!!!",
        "?!...",
        "---",
        "(a+b)*c=d;",
        "{\"key\": [1, 2]}",
        "#include <stdio.h>",
        "fn main() { println!(\"hi\"); }",
        "café",
        "naïve résumé",
        "Ærøskøbing",
        "Straße",
        "αβγ δέλτα",
        "Привет, мир",
        "日本語のテキスト",
        "中文字符",
        "한국어",
        "😀🚀👍🏽",
        "👨‍👩‍👧",
        "e\u{301}",
        "a\u{308}\u{323}",
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "x<|begin_of_text|>y",
        "<|begin_of_text",
        "tern ternary abs pred ret",
        "   ",
        "\t",
        "\u{a0}",
        "\u{3000}",
        "\u{200b}",
    ];
    const SEPARATORS: &[&str] = &[
        " ", " ", " ", "", "  ", "\t", "\n", "\r\n", "   \n", "\n\n", " \t ", "\r", ". ", ", ",
    ];
    let mut out: Vec<String> = vec![
        String::new(),
        " ".to_string(),
        "\n".to_string(),
        "\r\n".to_string(),
        "    leading spaces".to_string(),
        "trailing spaces    ".to_string(),
        "tabs\t\tand\ttabs".to_string(),
        "line one\nline two\r\nline three\n\n\n".to_string(),
        "don't I'LL WE'VE they'Re".to_string(),
        "12345678901234567890".to_string(),
        "<|begin_of_text|>The start".to_string(),
        "<|begin_of_text|><|end_of_text|>".to_string(),
    ];
    out.extend(FRAGMENTS.iter().map(|f| f.to_string()));
    // A small LCG: deterministic, and no dependency.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize % n
    };
    while out.len() < 400 {
        let parts = 1 + next(6);
        let mut line = String::new();
        for i in 0..parts {
            if i > 0 {
                line.push_str(SEPARATORS[next(SEPARATORS.len())]);
            }
            line.push_str(FRAGMENTS[next(FRAGMENTS.len())]);
        }
        out.push(line);
    }
    out
}

/// Checks that `tok` encodes and decodes every text as `reference` does.
fn assert_same_behaviour(tok: &Tokenizer, reference: &Tokenizer, what: &str) {
    let (prompt_text, prompt_ids) = prompt();
    assert_eq!(prompt_ids[0], 510);
    assert_eq!(
        tok.encode(&prompt_text, true).unwrap(),
        prompt_ids,
        "{what}: prompt"
    );
    for text in texts() {
        for add_special in [true, false] {
            let ids = tok.encode(&text, add_special).unwrap();
            let expected = reference.encode(&text, add_special).unwrap();
            assert_eq!(ids, expected, "{what}: encode({text:?}, {add_special})");
            for skip_special in [true, false] {
                assert_eq!(
                    tok.decode(&ids, skip_special).unwrap(),
                    reference.decode(&ids, skip_special).unwrap(),
                    "{what}: decode of {text:?}, skip_special={skip_special}"
                );
            }
        }
        let ids = tok.encode(&text, true).unwrap();
        assert_eq!(ids.first(), Some(&510), "{what}: BOS first for {text:?}");
    }
    assert_eq!(
        tok.vocab_size(),
        reference.vocab_size(),
        "{what}: vocab size"
    );
    for id in 0..512 {
        assert_eq!(
            tok.id_to_token(id),
            reference.id_to_token(id),
            "{what}: id {id}"
        );
    }
}

#[test]
fn gguf_tokenizer_matches_tokenizer_json() {
    let reference = json_tokenizer();
    for quant in QUANTS {
        let file = gguf(quant);
        let tok = tokenizer_from_gguf(&file).unwrap();
        assert_same_behaviour(&tok, &reference, quant);
    }
}

#[test]
fn gguf_tokenizer_decode_skips_control_tokens() {
    let tok = tokenizer_from_gguf(&gguf("F32")).unwrap();
    let ids = tok
        .encode("<|begin_of_text|>hi<|end_of_text|>", false)
        .unwrap();
    assert_eq!(ids.first(), Some(&510));
    assert_eq!(ids.last(), Some(&511));
    assert_eq!(tok.decode(&ids, true).unwrap(), "hi");
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<|begin_of_text|>hi<|end_of_text|>"
    );
}

#[test]
fn control_token_inside_the_id_range_keeps_its_id() {
    let file = gguf("F32");
    let tokens = tokens_of(&file);
    let mut types = vec![1i32; tokens.len()];
    types[510] = 3;
    types[511] = 3;
    types[300] = 3;
    let metadata = with(
        &file,
        KEY_TOKEN_TYPE,
        GgufValue::Array(GgufArray::I32(types)),
    );
    let tok = tokenizer_from_metadata(&metadata).unwrap();
    assert_eq!(tok.token_to_id(&tokens[300]), Some(300));
    assert_eq!(tok.id_to_token(300).as_deref(), Some(tokens[300].as_str()));
    assert_eq!(tok.vocab_size(), 512);
    assert_eq!(tok.decode(&[300], true).unwrap(), "");
    assert_eq!(tok.encode(&tokens[300], false).unwrap(), [300]);
}

#[test]
fn fixture_has_no_chat_template() {
    assert_eq!(chat_template(&gguf("F32")), None);
}

#[test]
fn metadata_round_trip_matches_tokenizer_json() {
    let reference = json_tokenizer();
    let metadata = gguf_tokenizer_metadata(&reference, Some(510), Some(511)).unwrap();
    let tok = tokenizer_from_metadata(&metadata).unwrap();
    assert_same_behaviour(&tok, &reference, "round trip");
}

#[test]
fn metadata_from_tokenizer_json_equals_fixture_gguf_metadata() {
    let reference = json_tokenizer();
    let produced = gguf_tokenizer_metadata(&reference, Some(510), Some(511)).unwrap();
    let file = gguf("F32");
    for (key, value) in &produced {
        let in_file = file.get(key).unwrap_or_else(|| panic!("{key} not in file"));
        match (value, in_file) {
            // The converter may choose another integer width; the value is what matters.
            (GgufValue::U32(a), b) => assert_eq!(Some(u64::from(*a)), b.as_u64(), "{key}"),
            _ => assert_eq!(value, in_file, "{key}"),
        }
    }
    let keys: Vec<&str> = produced.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_eos_token",
        ]
    );
}

#[test]
fn metadata_infers_bos_from_post_processor() {
    let reference = json_tokenizer();
    let produced = gguf_tokenizer_metadata(&reference, None, None).unwrap();
    let get = |key: &str| produced.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    assert_eq!(get(KEY_BOS_ID), Some(&GgufValue::U32(510)));
    assert_eq!(get(KEY_ADD_BOS), Some(&GgufValue::Bool(true)));
    assert_eq!(get("tokenizer.ggml.eos_token_id"), None);
}

#[test]
fn metadata_rejects_wrong_bos() {
    let reference = json_tokenizer();
    let err = gguf_tokenizer_metadata(&reference, Some(3), Some(511)).unwrap_err();
    assert!(matches!(err, Error::Tokenizer(_)), "{err}");
}

#[test]
fn without_pre_key_the_llama3_pre_tokenizer_is_used() {
    let reference = json_tokenizer();
    let metadata = without(&gguf("F32"), KEY_PRE);
    let tok = tokenizer_from_metadata(&metadata).unwrap();
    assert_same_behaviour(&tok, &reference, "no pre key");
}

#[test]
fn add_bos_false_leaves_bos_out() {
    let metadata = with(&gguf("F32"), KEY_ADD_BOS, GgufValue::Bool(false));
    let tok = tokenizer_from_metadata(&metadata).unwrap();
    let (text, ids) = prompt();
    assert_eq!(tok.encode(&text, true).unwrap(), ids[1..]);
}

#[test]
fn add_eos_true_appends_eos() {
    let metadata = with(
        &gguf("F32"),
        "tokenizer.ggml.add_eos_token",
        GgufValue::Bool(true),
    );
    let tok = tokenizer_from_metadata(&metadata).unwrap();
    let (text, mut ids) = prompt();
    ids.push(511);
    assert_eq!(tok.encode(&text, true).unwrap(), ids);
}

#[test]
fn gpt2_pre_tokenizer_is_supported() {
    let metadata = with(&gguf("F32"), KEY_PRE, GgufValue::String("gpt2".into()));
    let tok = tokenizer_from_metadata(&metadata).unwrap();
    // GPT-2's regex keeps a space in front of a number and any run of digits together;
    // Llama 3's splits digits off alone, in groups of three.
    let words = |tok: &Tokenizer| -> Vec<String> {
        let mut split = PreTokenizedString::from("a 12345");
        tok.inner()
            .get_pre_tokenizer()
            .unwrap()
            .pre_tokenize(&mut split)
            .unwrap();
        split
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(word, _, _)| word.to_string())
            .collect()
    };
    assert_eq!(words(&tok), ["a", "Ġ12345"]);
    assert_eq!(words(&json_tokenizer()), ["a", "Ġ", "123", "45"]);
    let ids = tok.encode("a 12345", false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), "a 12345");
}

/// The F32 fixture's metadata with `key` set to `value` (added if absent).
fn with(file: &GgufFile, key: &str, value: GgufValue) -> Vec<(String, GgufValue)> {
    let mut metadata = file.metadata().to_vec();
    match metadata.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value,
        None => metadata.push((key.to_string(), value)),
    }
    metadata
}

/// The fixture's metadata without `key`.
fn without(file: &GgufFile, key: &str) -> Vec<(String, GgufValue)> {
    let mut metadata = file.metadata().to_vec();
    metadata.retain(|(k, _)| k != key);
    metadata
}

fn tokens_of(file: &GgufFile) -> Vec<String> {
    file.get(KEY_TOKENS)
        .and_then(GgufValue::as_array)
        .and_then(GgufArray::as_strings)
        .unwrap()
        .to_vec()
}

fn assert_rejected(metadata: &[(String, GgufValue)], expect_in_message: &str) {
    match tokenizer_from_metadata(metadata) {
        Ok(_) => panic!("accepted metadata that should fail with {expect_in_message:?}"),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(expect_in_message),
                "error {message:?} does not mention {expect_in_message:?}"
            );
        }
    }
}

#[test]
fn hostile_metadata_is_rejected() {
    let file = gguf("F32");
    let str_array = |v: Vec<String>| GgufValue::Array(GgufArray::String(v));
    let mut merges = file
        .get(KEY_MERGES)
        .and_then(GgufValue::as_array)
        .and_then(GgufArray::as_strings)
        .unwrap()
        .to_vec();

    assert_rejected(&without(&file, KEY_TOKENS), KEY_TOKENS);
    assert_rejected(&without(&file, KEY_MERGES), KEY_MERGES);
    assert_rejected(&without(&file, KEY_MODEL), KEY_MODEL);
    assert_rejected(
        &with(
            &file,
            KEY_TOKENS,
            GgufValue::Array(GgufArray::U32(vec![1, 2, 3])),
        ),
        "array of strings",
    );
    assert_rejected(
        &with(&file, KEY_TOKENS, GgufValue::String("abc".into())),
        "array of strings",
    );
    assert_rejected(&with(&file, KEY_TOKENS, str_array(vec![])), "empty");
    assert_rejected(
        &with(&file, KEY_MERGES, GgufValue::Array(GgufArray::I32(vec![1]))),
        "array of strings",
    );

    merges.push("Ġtern nonexistent".to_string());
    assert_rejected(
        &with(&file, KEY_MERGES, str_array(merges.clone())),
        "nonexistent",
    );
    merges.pop();
    // Both parts exist but their concatenation does not.
    merges.push("! !".to_string());
    assert_rejected(&with(&file, KEY_MERGES, str_array(merges.clone())), "makes");
    merges.pop();
    merges.push("nospace".to_string());
    assert_rejected(
        &with(&file, KEY_MERGES, str_array(merges.clone())),
        "nospace",
    );
    merges.pop();

    assert_rejected(&with(&file, KEY_BOS_ID, GgufValue::U32(512)), "outside");
    assert_rejected(
        &with(&file, KEY_BOS_ID, GgufValue::U32(u32::MAX)),
        "outside",
    );
    assert_rejected(&with(&file, KEY_BOS_ID, GgufValue::I32(-1)), "non-negative");
    assert_rejected(
        &with(&file, KEY_BOS_ID, GgufValue::String("510".into())),
        "non-negative",
    );
    assert_rejected(
        &with(
            &file,
            "tokenizer.ggml.eos_token_id",
            GgufValue::U64(1 << 40),
        ),
        "non-negative",
    );
    assert_rejected(
        &with(
            &file,
            "tokenizer.ggml.padding_token_id",
            GgufValue::U32(9999),
        ),
        "outside",
    );
    assert_rejected(&with(&file, KEY_ADD_BOS, GgufValue::U8(1)), "a bool");
    let mut no_bos = without(&file, KEY_BOS_ID);
    no_bos.retain(|(k, _)| k != KEY_BOS_ID);
    assert_rejected(&no_bos, KEY_BOS_ID);

    assert_rejected(
        &with(&file, KEY_MODEL, GgufValue::String("llama".into())),
        "SentencePiece",
    );
    assert_rejected(
        &with(&file, KEY_MODEL, GgufValue::String("bert".into())),
        "not supported",
    );
    assert_rejected(&with(&file, KEY_MODEL, GgufValue::U32(2)), "a string");
    assert_rejected(
        &with(&file, KEY_PRE, GgufValue::String("qwen2".into())),
        "pre-tokenizer",
    );
    assert_rejected(&with(&file, KEY_PRE, GgufValue::Bool(true)), "a string");

    assert_rejected(
        &with(
            &file,
            KEY_TOKEN_TYPE,
            GgufValue::Array(GgufArray::I32(vec![1; 3])),
        ),
        "entries",
    );
    assert_rejected(
        &with(
            &file,
            KEY_TOKEN_TYPE,
            GgufValue::Array(GgufArray::I32(vec![9; 512])),
        ),
        "type 9",
    );
    assert_rejected(
        &with(
            &file,
            KEY_TOKEN_TYPE,
            GgufValue::Array(GgufArray::String(vec!["1".into(); 512])),
        ),
        "array of integers",
    );

    let mut tokens = tokens_of(&file);
    tokens[5] = tokens[4].clone();
    assert_rejected(&with(&file, KEY_TOKENS, str_array(tokens)), "both");
    let mut tokens = tokens_of(&file);
    tokens[7] = String::new();
    assert_rejected(&with(&file, KEY_TOKENS, str_array(tokens)), "empty");
    // A token list shorter than the token types and the BOS id.
    let tokens = tokens_of(&file)[..100].to_vec();
    assert_rejected(&with(&file, KEY_TOKENS, str_array(tokens)), KEY_TOKEN_TYPE);

    let huge = "x".repeat(1 << 20);
    let message = tokenizer_from_metadata(&with(&file, KEY_MODEL, GgufValue::String(huge)))
        .unwrap_err()
        .to_string();
    assert!(
        message.len() < 1000,
        "error message of {} bytes",
        message.len()
    );
}

#[test]
fn errors_from_a_file_name_the_file() {
    // A minimal GGUF v3 file: no tensors, one string entry naming a SentencePiece tokenizer.
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"GGUF");
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&(KEY_MODEL.len() as u64).to_le_bytes());
    bytes.extend_from_slice(KEY_MODEL.as_bytes());
    bytes.extend_from_slice(&8u32.to_le_bytes());
    bytes.extend_from_slice(&5u64.to_le_bytes());
    bytes.extend_from_slice(b"llama");
    let path = std::env::temp_dir().join(format!(
        "bitnet-gguf-tokenizer-test-{}.gguf",
        std::process::id()
    ));
    std::fs::write(&path, &bytes).unwrap();
    let file = GgufFile::open(&path);
    let _ = std::fs::remove_file(&path);
    let err = tokenizer_from_gguf(&file.unwrap()).unwrap_err();
    match &err {
        Error::Format { path: p, reason } => {
            assert_eq!(p, &path);
            assert!(reason.contains("SentencePiece"), "{reason}");
        }
        other => panic!("expected a format error, got {other}"),
    }
}

#[test]
fn metadata_rejects_what_gguf_cannot_describe() {
    let text = std::fs::read_to_string(fixture("tokenizer/tokenizer.json")).unwrap();
    let original: serde_json::Value = serde_json::from_str(&text).unwrap();
    let load = |json: &serde_json::Value| {
        Tokenizer::from_tokenizers(
            tokenizers::Tokenizer::from_bytes(serde_json::to_vec(json).unwrap()).unwrap(),
        )
    };
    let check = |json: &serde_json::Value, expect_in_message: &str| {
        let err = gguf_tokenizer_metadata(&load(json), Some(510), Some(511)).unwrap_err();
        assert!(matches!(err, Error::Tokenizer(_)), "{err}");
        let message = err.to_string();
        assert!(
            message.contains(expect_in_message),
            "{message:?} does not mention {expect_in_message:?}"
        );
    };

    let mut json = original.clone();
    json["normalizer"] = serde_json::json!({ "type": "Lowercase" });
    check(&json, "normaliser");

    let mut json = original.clone();
    json["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\s+".into();
    check(&json, "pre-tokenizer");

    let mut json = original.clone();
    json["decoder"] = serde_json::json!({ "type": "Fuse" });
    check(&json, "decoder");

    // A stray huge id must not make it allocate a slot per id.
    let mut json = original.clone();
    json["model"]["vocab"]["!"] = 4_000_000_000u32.into();
    check(&json, "holes");

    let mut json = original.clone();
    json["added_tokens"][1]["lstrip"] = true.into();
    check(&json, "strip");

    let word_level = serde_json::json!({
        "version": "1.0",
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": null,
        "model": { "type": "WordLevel", "vocab": { "a": 0, "[UNK]": 1 }, "unk_token": "[UNK]" }
    });
    check(&word_level, "not BPE");
}
