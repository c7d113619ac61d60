//! The GGUF reader against the tiny-bitnet fixtures, and corrupted copies of them, through the
//! public `MappedFile` path.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use bitnet_core::MappedFile;
use bitnet_inference::formats::gguf::{GgmlType, GgufFile, GgufValue};
use bitnet_inference::Error;

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../testdata/tiny-bitnet/gguf/"
);

fn fixture_path(quant: &str) -> PathBuf {
    PathBuf::from(format!("{DIR}tiny-bitnet-{quant}.gguf"))
}

fn open(quant: &str) -> GgufFile {
    let path = fixture_path(quant);
    GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Writes `bytes` to a unique temporary file, opens it, and removes the file.
fn open_bytes(bytes: &[u8]) -> bitnet_inference::Result<GgufFile> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "bitnet-gguf-reader-{}-{}.gguf",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, bytes).unwrap();
    let result = GgufFile::open(&path);
    std::fs::remove_file(&path).unwrap();
    result
}

fn type_counts(g: &GgufFile) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for t in g.tensors() {
        *counts.entry(t.ggml_type.name()).or_insert(0) += 1;
    }
    counts
}

#[test]
fn fixtures_have_the_expected_metadata() {
    for quant in ["F32", "TQ1_0", "TQ2_0"] {
        let g = open(quant);
        assert_eq!(g.version(), 3, "{quant}");
        assert_eq!(g.alignment(), 32, "{quant}");
        assert_eq!(g.architecture(), Some("bitnet"), "{quant}");
        assert_eq!(
            g.get("bitnet.hidden_activation")
                .and_then(GgufValue::as_str),
            Some("relu2"),
            "{quant}"
        );
        assert_eq!(g.require_u64("bitnet.embedding_length").unwrap(), 256);
        assert_eq!(g.require_u64("bitnet.block_count").unwrap(), 2);
        assert_eq!(g.require_u64("bitnet.feed_forward_length").unwrap(), 512);
        assert_eq!(g.require_u64("bitnet.attention.head_count").unwrap(), 4);
        assert_eq!(g.require_u64("bitnet.attention.head_count_kv").unwrap(), 2);
        assert_eq!(g.require_u64("bitnet.context_length").unwrap(), 128);
        assert_eq!(g.require_f32("bitnet.rope.freq_base").unwrap(), 500000.0);
        assert_eq!(
            g.require_f32("bitnet.attention.layer_norm_rms_epsilon")
                .unwrap(),
            1e-5
        );
        assert_eq!(g.require_str("tokenizer.ggml.model").unwrap(), "gpt2");

        let tokens = g
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array)
            .and_then(|a| a.as_strings())
            .expect("tokenizer.ggml.tokens is an array of strings");
        assert_eq!(tokens.len(), 512);
        assert_eq!(tokens[510], "<|begin_of_text|>");
        assert_eq!(tokens[511], "<|end_of_text|>");
        let token_types = g
            .get("tokenizer.ggml.token_type")
            .and_then(GgufValue::as_array)
            .and_then(|a| a.as_i32s())
            .expect("tokenizer.ggml.token_type is an array of i32");
        assert_eq!(token_types.len(), 512);
        let merges = g
            .get("tokenizer.ggml.merges")
            .and_then(GgufValue::as_array)
            .and_then(|a| a.as_strings())
            .expect("tokenizer.ggml.merges is an array of strings");
        assert!(merges.iter().all(|m| m.split(' ').count() == 2));
        assert_eq!(g.require_u64("tokenizer.ggml.bos_token_id").unwrap(), 510);
        assert_eq!(g.require_u64("tokenizer.ggml.eos_token_id").unwrap(), 511);

        // Metadata keeps file order.
        assert_eq!(g.metadata()[0].0, "general.architecture");
    }
    assert_eq!(open("F32").require_u64("general.file_type").unwrap(), 0);
    assert_eq!(open("TQ1_0").require_u64("general.file_type").unwrap(), 36);
    assert_eq!(open("TQ2_0").require_u64("general.file_type").unwrap(), 37);
}

#[test]
fn fixtures_have_the_expected_tensors() {
    let expected: [(&str, &[(&str, usize)]); 3] = [
        ("F32", &[("F32", 24)]),
        ("TQ1_0", &[("F16", 1), ("F32", 9), ("TQ1_0", 14)]),
        ("TQ2_0", &[("F16", 1), ("F32", 9), ("TQ2_0", 14)]),
    ];
    for (quant, counts) in expected {
        let g = open(quant);
        assert_eq!(g.tensors().len(), 24, "{quant}");
        let want: BTreeMap<&str, usize> = counts.iter().copied().collect();
        assert_eq!(type_counts(&g), want, "{quant}");

        let embd = g.tensor("token_embd.weight").unwrap();
        assert_eq!(embd.dims, [256, 512], "{quant}");
        assert!(
            g.tensor("output.weight").is_none(),
            "{quant}: the head is token_embd"
        );
        for name in ["output_norm.weight", "blk.1.ffn_sub_norm.weight"] {
            assert_eq!(g.tensor(name).unwrap().ggml_type, GgmlType::F32);
        }
        assert_eq!(g.tensor("blk.0.ffn_down.weight").unwrap().dims, [512, 256]);

        let file_len = g.file().bytes().len();
        for t in g.tensors() {
            assert_eq!(g.tensor(&t.name), Some(t));
            let data = g.tensor_data(t);
            assert_eq!(
                data.len() as u64,
                t.ggml_type.data_size(t.n_elements()).unwrap()
            );
            assert!(t.data_range.end <= file_len);
            assert_eq!(t.data_range.start as u64, g.data_offset() + t.offset);
            assert_eq!(t.offset % g.alignment(), 0);
            // Zero copy: the storage and the slice are the same bytes of the map.
            let storage = g.tensor_storage(t).unwrap();
            assert!(storage.is_mapped());
            assert_eq!(storage.bytes().as_ptr(), data.as_ptr());
            assert_eq!(storage.len(), data.len());
        }
    }
    // TQ2_0 [256, 256]: 256 blocks of 66 bytes.
    let g = open("TQ2_0");
    let q = g.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.ggml_type, GgmlType::TQ2_0);
    assert_eq!(q.n_bytes(), 256 * 66);
    let g = open("TQ1_0");
    assert_eq!(g.tensor("blk.0.attn_q.weight").unwrap().n_bytes(), 256 * 54);
}

#[test]
fn parse_accepts_an_existing_map() {
    let file = MappedFile::open(fixture_path("TQ2_0")).unwrap();
    let g = GgufFile::parse(file.clone()).unwrap();
    assert!(std::sync::Arc::ptr_eq(g.file(), &file));
    assert_eq!(g.path(), fixture_path("TQ2_0"));
}

#[test]
fn corrupted_fixtures_give_format_errors_naming_the_file() {
    let bytes = std::fs::read(fixture_path("TQ2_0")).unwrap();
    let g = open("TQ2_0");
    let data_offset = g.data_offset() as usize;

    let check = |bytes: &[u8], needle: &str| match open_bytes(bytes) {
        Err(Error::Format { path, reason }) => {
            assert!(path.to_string_lossy().contains("bitnet-gguf-reader-"));
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
        }
        Err(e) => panic!("expected a format error, got {e}"),
        Ok(_) => panic!("expected a format error, parsed fine"),
    };

    let mut bad = bytes.clone();
    bad[..4].copy_from_slice(b"GGML");
    check(&bad, "magic");

    for v in [1u32, 4] {
        let mut bad = bytes.clone();
        bad[4..8].copy_from_slice(&v.to_le_bytes());
        check(&bad, &format!("version {v}"));
    }

    let mut bad = bytes.clone();
    bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    check(&bad, "tensor count");

    check(&bytes[..data_offset], "outside the file");
    check(&bytes[..bytes.len() - 1], "outside the file");
    check(&bytes[..14], "end of file");
    check(&bytes[..30], "cannot fit");

    // The first tensor info's type id: it follows the name, n_dims and two dims of
    // `token_embd.weight`, the first tensor info after the metadata.
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("token_embd.weight in the header");
    let type_at = at + name.len() + 4 + 2 * 8;
    assert_eq!(
        bytes[type_at..type_at + 4],
        1u32.to_le_bytes(),
        "F16 type id"
    );
    let mut bad = bytes.clone();
    bad[type_at..type_at + 4].copy_from_slice(&77u32.to_le_bytes());
    check(&bad, "tensor `token_embd.weight`: unknown ggml type id 77");

    // Its offset, made misaligned.
    let mut bad = bytes.clone();
    bad[type_at + 4..type_at + 12].copy_from_slice(&8u64.to_le_bytes());
    check(&bad, "not a multiple of the alignment 32");

    // Its n_dims, made 5.
    let mut bad = bytes.clone();
    bad[at + name.len()..at + name.len() + 4].copy_from_slice(&5u32.to_le_bytes());
    check(&bad, "5 dimensions");

    assert!(matches!(
        GgufFile::open("/nonexistent/model.gguf"),
        Err(Error::Io { .. })
    ));
}
