//! The GGUF writer through the public API: round trips through [`GgufFile::open`], byte-exact
//! rewrites of the tiny-bitnet fixtures (written by gguf-py), and refused input.
//!
//! Set `BITNET_KEEP_GGUF_DIR=/some/dir` to keep the files these tests write there (for
//! checking them with `scripts/check_gguf.py`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use bitnet_inference::formats::gguf::{
    GgmlType, GgufArray, GgufFile, GgufValue, GGUF_ALIGNMENT_KEY, I2S_TRAILER_BYTES,
};
use bitnet_inference::formats::gguf_writer::{GgufWriter, GGUF_MAX_TENSOR_NAME_BYTES};
use bitnet_inference::Error;

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../testdata/tiny-bitnet/gguf/"
);

fn fixture_path(quant: &str) -> PathBuf {
    PathBuf::from(format!("{DIR}tiny-bitnet-{quant}.gguf"))
}

/// A unique path in the temporary directory.
fn temp_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "bitnet-gguf-writer-{tag}-{}-{}.gguf",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Copies `path` to `$BITNET_KEEP_GGUF_DIR/name` when that variable is set.
fn keep(path: &Path, name: &str) {
    if let Some(dir) = std::env::var_os("BITNET_KEEP_GGUF_DIR") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(path, dir.join(name)).unwrap();
    }
}

/// Writes `w` with `write_to`, checks it equals `write_to_vec`, opens it and removes it.
fn write_and_open(w: &GgufWriter<'_>, keep_as: &str) -> (GgufFile, Vec<u8>) {
    let bytes = w.write_to_vec().unwrap();
    assert_eq!(w.file_size().unwrap(), bytes.len() as u64);
    let path = temp_path("rt");
    w.write_to(&path).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "write_to != write_to_vec"
    );
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    assert!(!Path::new(&tmp).exists(), "temporary file left behind");
    keep(&path, keep_as);
    let g = GgufFile::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    (g, bytes)
}

/// Deterministic filler bytes.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Every value type; `nested` adds arrays of arrays, which llama.cpp refuses.
fn every_value(nested: bool) -> Vec<(String, GgufValue)> {
    use GgufArray as A;
    use GgufValue as V;
    let entries = vec![
        ("general.architecture", V::String("bitnet".into())),
        ("t.u8", V::U8(u8::MAX)),
        ("t.i8", V::I8(i8::MIN)),
        ("t.u16", V::U16(0xBEEF)),
        ("t.i16", V::I16(-12345)),
        ("t.u32", V::U32(u32::MAX)),
        ("t.i32", V::I32(i32::MIN)),
        ("t.f32", V::F32(-1.5e-7)),
        ("t.f32_inf", V::F32(f32::NEG_INFINITY)),
        ("t.bool_true", V::Bool(true)),
        ("t.bool_false", V::Bool(false)),
        ("t.string", V::String("ünïcödé ✓ 🦀 \u{0} tab\t".into())),
        ("t.string_empty", V::String(String::new())),
        ("t.u64", V::U64(u64::MAX)),
        ("t.i64", V::I64(i64::MIN)),
        ("t.f64", V::F64(std::f64::consts::PI)),
        ("t.arr.u8", V::Array(A::U8(vec![0, 1, 255]))),
        ("t.arr.i8", V::Array(A::I8(vec![-128, 0, 127]))),
        ("t.arr.u16", V::Array(A::U16(vec![1, 65535]))),
        ("t.arr.i16", V::Array(A::I16(vec![-1, 2, -3]))),
        ("t.arr.u32", V::Array(A::U32(vec![7; 5]))),
        ("t.arr.i32", V::Array(A::I32((-3..4).collect()))),
        ("t.arr.f32", V::Array(A::F32(vec![0.25, -0.0, 1e30]))),
        ("t.arr.bool", V::Array(A::Bool(vec![true, false, true]))),
        (
            "t.arr.string",
            V::Array(A::String(vec!["a".into(), String::new(), "日本語".into()])),
        ),
        ("t.arr.u64", V::Array(A::U64(vec![u64::MAX, 0]))),
        ("t.arr.i64", V::Array(A::I64(vec![i64::MIN, i64::MAX]))),
        ("t.arr.f64", V::Array(A::F64(vec![1e-300, -2.5]))),
    ];
    let mut all: Vec<(String, GgufValue)> = entries
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    // An empty array of every element type keeps that type.
    let empties = [
        A::U8(vec![]),
        A::I8(vec![]),
        A::U16(vec![]),
        A::I16(vec![]),
        A::U32(vec![]),
        A::I32(vec![]),
        A::F32(vec![]),
        A::Bool(vec![]),
        A::String(vec![]),
        A::Array(vec![]),
        A::U64(vec![]),
        A::I64(vec![]),
        A::F64(vec![]),
    ];
    for a in empties {
        if nested || !matches!(a, A::Array(_)) {
            all.push((format!("t.empty.{}", a.elem_type()), V::Array(a)));
        }
    }
    if nested {
        all.push((
            "t.arr.nested".to_owned(),
            V::Array(A::Array(vec![
                A::U32(vec![1, 2]),
                A::String(vec!["x".into()]),
                A::Array(vec![A::F64(vec![]), A::Bool(vec![true])]),
                A::Array(vec![]),
            ])),
        ));
    }
    all
}

struct TestTensor {
    name: &'static str,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

fn test_tensors(with_i2s: bool) -> Vec<TestTensor> {
    let t = |name, dims: &[u64], ggml_type: GgmlType, seed| {
        let n: u64 = dims.iter().product();
        let mut size = ggml_type.data_size(n).unwrap() as usize;
        if ggml_type == GgmlType::I2_S {
            size += I2S_TRAILER_BYTES;
        }
        let mut data = pattern(size, seed);
        if ggml_type == GgmlType::I2_S {
            let codes = size - I2S_TRAILER_BYTES;
            data[codes..codes + 4].copy_from_slice(&0.8125f32.to_le_bytes());
        }
        TestTensor {
            name,
            dims: dims.to_vec(),
            ggml_type,
            data,
        }
    };
    let mut v = vec![
        t("f32.odd", &[3, 5, 7], GgmlType::F32, 1),
        t("f16.one", &[1], GgmlType::F16, 2),
        t("f16.odd", &[5, 3, 1, 3], GgmlType::F16, 3),
        t("q8_0", &[96, 3], GgmlType::Q8_0, 4),
        t("tq1_0", &[256, 3], GgmlType::TQ1_0, 5),
        t("tq2_0", &[512, 1, 3], GgmlType::TQ2_0, 6),
    ];
    if with_i2s {
        // 84 elements: 21 bytes of codes and the trailer, 53 bytes in all.
        v.insert(4, t("i2_s", &[12, 7], GgmlType::I2_S, 7));
        v.push(t("i2_s.last", &[128, 3], GgmlType::I2_S, 8));
    }
    v.push(t("blk.0.attn_norm.weight", &[7], GgmlType::F32, 9));
    v
}

fn round_trip(with_i2s: bool, nested: bool, alignment: Option<u64>, keep_as: &str) {
    let metadata = every_value(nested);
    let tensors = test_tensors(with_i2s);
    let mut w = GgufWriter::new();
    for (k, v) in &metadata {
        w.add_metadata(k.clone(), v.clone()).unwrap();
    }
    if let Some(a) = alignment {
        w.set_alignment(a).unwrap();
    }
    for t in &tensors {
        w.add_tensor(t.name, &t.dims, t.ggml_type, t.data.as_slice())
            .unwrap();
    }
    let (g, bytes) = write_and_open(&w, keep_as);

    let align = alignment.unwrap_or(32);
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), align);
    let mut want_meta = metadata.clone();
    if align != 32 {
        want_meta.push((GGUF_ALIGNMENT_KEY.to_owned(), GgufValue::U32(align as u32)));
    }
    assert_eq!(g.metadata(), &want_meta[..], "metadata differs");
    assert_eq!(g.data_offset() % align, 0);

    assert_eq!(g.tensors().len(), tensors.len());
    let mut next = 0u64;
    for (info, t) in g.tensors().iter().zip(&tensors) {
        assert_eq!(info.name, t.name);
        assert_eq!(info.dims, t.dims, "{}", t.name);
        assert_eq!(info.ggml_type, t.ggml_type, "{}", t.name);
        assert_eq!(info.offset % align, 0, "{}", t.name);
        assert_eq!(info.offset, next, "{}: tensors are packed in order", t.name);
        next = (info.offset + t.data.len() as u64).next_multiple_of(align);
        let codes = if t.ggml_type == GgmlType::I2_S {
            let codes = t.data.len() - I2S_TRAILER_BYTES;
            assert_eq!(g.i2s_trailer(info).unwrap(), &t.data[codes..]);
            assert_eq!(g.i2s_scale(info).unwrap(), 0.8125);
            codes
        } else {
            t.data.len()
        };
        assert_eq!(g.tensor_data(info), &t.data[..codes], "{}", t.name);
    }
    assert_eq!(bytes.len() as u64, g.data_offset() + next);
}

#[test]
fn round_trip_every_value_and_tensor_type() {
    round_trip(false, true, None, "writer-roundtrip-nested.gguf");
}

/// No nested arrays and no I2_S: a file upstream llama.cpp and gguf-py both read.
#[test]
fn round_trip_upstream_compatible() {
    round_trip(false, false, None, "writer-roundtrip.gguf");
}

#[test]
fn round_trip_with_i2s_tensors() {
    round_trip(true, true, None, "writer-roundtrip-i2s.gguf");
}

#[test]
fn round_trip_with_other_alignments() {
    for a in [1, 8, 64, 4096] {
        round_trip(
            false,
            false,
            Some(a),
            &format!("writer-roundtrip-align{a}.gguf"),
        );
        round_trip(
            true,
            true,
            Some(a),
            &format!("writer-roundtrip-i2s-align{a}.gguf"),
        );
    }
}

/// Copies every metadata entry and tensor of a fixture into a writer by hand.
fn copy_by_hand(g: &GgufFile) -> GgufWriter<'_> {
    let mut w = GgufWriter::new();
    for (k, v) in g.metadata() {
        w.add_metadata(k.as_str(), v.clone()).unwrap();
    }
    for info in g.tensors() {
        w.add_tensor(
            info.name.as_str(),
            &info.dims,
            info.ggml_type,
            g.tensor_data(info),
        )
        .unwrap();
    }
    w
}

#[test]
fn rewriting_the_fixtures_is_byte_identical() {
    for quant in ["TQ2_0", "TQ1_0", "F32"] {
        let path = fixture_path(quant);
        let original = std::fs::read(&path).unwrap();
        let g = GgufFile::open(&path).unwrap();
        let by_hand = copy_by_hand(&g);
        let out = by_hand.write_to_vec().unwrap();
        if out != original {
            let first = out
                .iter()
                .zip(&original)
                .position(|(a, b)| a != b)
                .unwrap_or(out.len().min(original.len()));
            panic!(
                "{quant}: rewrite differs from the fixture at byte {first} (lengths {} and {})",
                out.len(),
                original.len()
            );
        }
        let via_from = GgufWriter::from_gguf(&g).unwrap().write_to_vec().unwrap();
        assert!(via_from == original, "{quant}: from_gguf rewrite differs");
        if quant == "TQ2_0" {
            let tmp = temp_path("fixture");
            by_hand.write_to(&tmp).unwrap();
            keep(&tmp, "tiny-bitnet-TQ2_0.rewritten.gguf");
            std::fs::remove_file(&tmp).unwrap();
        }
    }
}

#[test]
fn from_gguf_keeps_the_i2s_trailer_and_alignment() {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("bitnet".into()))
        .unwrap();
    w.set_alignment(64).unwrap();
    for t in test_tensors(true) {
        w.add_tensor(t.name, &t.dims, t.ggml_type, t.data).unwrap();
    }
    let (g, bytes) = write_and_open(&w, "writer-from-gguf-source.gguf");
    let again = GgufWriter::from_gguf(&g).unwrap();
    assert_eq!(again.alignment(), 64);
    assert_eq!(again.write_to_vec().unwrap(), bytes);
}

fn assert_invalid(r: bitnet_inference::Result<()>, needles: &[&str]) {
    match r {
        Err(e @ Error::InvalidInput(_)) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "`{msg}` lacks `{n}`");
            }
        }
        other => panic!("expected InvalidInput containing {needles:?}, got {other:?}"),
    }
}

#[test]
fn bad_input_is_refused() {
    let mut w = GgufWriter::new();
    w.add_metadata("k", GgufValue::U32(1)).unwrap();
    assert_invalid(
        w.add_metadata("k", GgufValue::String("again".into())),
        &["duplicate metadata key `k`"],
    );
    w.add_tensor("t", &[4], GgmlType::F32, vec![0; 16]).unwrap();
    assert_invalid(
        w.add_tensor("t", &[4], GgmlType::F32, vec![0; 16]),
        &["duplicate tensor name `t`"],
    );

    let f32s = |n: usize| vec![0u8; 4 * n];
    assert_invalid(
        w.add_tensor("d0", &[], GgmlType::F32, f32s(1)),
        &["`d0`", "0 dimensions"],
    );
    assert_invalid(
        w.add_tensor("d5", &[1, 1, 1, 1, 1], GgmlType::F32, f32s(1)),
        &["`d5`", "5 dimensions"],
    );
    assert_invalid(
        w.add_tensor("z", &[4, 0], GgmlType::F32, f32s(0)),
        &["`z`", "dimension 1 is zero"],
    );
    assert_invalid(
        w.add_tensor("big", &[1 << 32, 1 << 31], GgmlType::F32, f32s(1)),
        &["`big`", "exceeds i64::MAX"],
    );
    assert_invalid(
        w.add_tensor("huge", &[u64::MAX], GgmlType::I8, f32s(1)),
        &["`huge`", "exceeds i64::MAX"],
    );
    assert_invalid(
        w.add_tensor("blk", &[128, 2], GgmlType::TQ2_0, vec![0; 66]),
        &["`blk`", "not a multiple of the TQ2_0 block size 256"],
    );
    assert_invalid(
        w.add_tensor("len", &[3, 2], GgmlType::F32, f32s(5)),
        &["`len`", "20 bytes of data, expected 24 bytes"],
    );
    assert_invalid(
        w.add_tensor("q8", &[64], GgmlType::Q8_0, vec![0; 64]),
        &["`q8`", "expected 68 bytes"],
    );
    assert_invalid(
        w.add_tensor("i2s", &[128], GgmlType::I2_S, vec![0; 32]),
        &["`i2s`", "32 bytes of codes and a 32-byte scale trailer"],
    );
    assert_invalid(
        w.add_tensor(
            "x".repeat(GGUF_MAX_TENSOR_NAME_BYTES + 1),
            &[1],
            GgmlType::F32,
            f32s(1),
        ),
        &["tensor name", "63 bytes"],
    );
    for a in [3, 0, 96, 1 << 32] {
        assert_invalid(w.set_alignment(a), &["alignment", "power of two"]);
    }
    assert_invalid(
        w.add_metadata(GGUF_ALIGNMENT_KEY, GgufValue::U64(64)),
        &[GGUF_ALIGNMENT_KEY, "u32 power of two"],
    );
    assert_invalid(
        w.add_metadata(GGUF_ALIGNMENT_KEY, GgufValue::U32(48)),
        &[GGUF_ALIGNMENT_KEY, "u32 power of two"],
    );

    // Nothing refused was kept: the file holds just `k` and `t`.
    assert_eq!(w.alignment(), 32);
    let (g, _) = write_and_open(&w, "writer-after-errors.gguf");
    assert_eq!(g.metadata().len(), 1);
    assert_eq!(g.tensors().len(), 1);
}

#[test]
fn failed_write_leaves_the_old_file_alone() {
    let path = temp_path("keep");
    std::fs::write(&path, b"old contents").unwrap();
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    // A directory where the temporary file should go makes the write fail.
    std::fs::create_dir(&tmp).unwrap();
    let w = GgufWriter::new();
    assert!(matches!(w.write_to(&path), Err(Error::Io { .. })));
    assert_eq!(std::fs::read(&path).unwrap(), b"old contents");
    std::fs::remove_dir(&tmp).unwrap();
    // Now it succeeds and replaces the file.
    w.write_to(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), w.write_to_vec().unwrap());
    std::fs::remove_file(&path).unwrap();
}
