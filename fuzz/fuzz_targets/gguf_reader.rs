//! Fuzzes the GGUF reader with arbitrary bytes.
//!
//! Every input goes through `parse_gguf_bytes`, the byte-slice entry point to the reader's one
//! parse-and-validate path (`GgufFile::parse` calls the same function on the mapped bytes).
//! When an input is accepted, it is also written to a scratch file and opened through the
//! public `GgufFile::open` (memory map included), the two results are compared, and every
//! metadata value, tensor info and tensor data slice is touched through the public accessors.
//! Any panic, and any disagreement between the two paths, is a crash.

#![no_main]

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::OnceLock;

use bitnet_inference::formats::gguf::{
    parse_gguf_bytes, GgmlType, GgufArray, GgufFile, GgufTensorInfo, GgufValue, GgufValueType,
    GGUF_MAX_DIMS, I2S_TRAILER_BYTES,
};
use libfuzzer_sys::fuzz_target;

/// A per-process scratch file, on tmpfs when there is one.
fn scratch_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = PathBuf::from("/dev/shm");
        let dir = if dir.is_dir() {
            dir
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("bitnet-fuzz-gguf-{}.gguf", std::process::id()))
    })
}

fn touch_array(a: &GgufArray) {
    let ty: GgufValueType = a.elem_type();
    black_box((ty.id(), ty.name(), ty.fixed_size()));
    assert_eq!(GgufValueType::from_id(ty.id()), Some(ty));
    black_box(a.is_empty());
    let n = a.len();
    // Every element through `get`, plus the one past the end.
    for i in 0..n {
        let v = a.get(i).expect("get inside the array");
        assert_eq!(v.value_type(), ty);
        touch_value(&v);
    }
    assert!(a.get(n).is_none());
    // The typed slice accessors: exactly one matches.
    let hits = [
        a.as_u8s().map(<[u8]>::len),
        a.as_i8s().map(<[i8]>::len),
        a.as_u16s().map(<[u16]>::len),
        a.as_i16s().map(<[i16]>::len),
        a.as_u32s().map(<[u32]>::len),
        a.as_i32s().map(<[i32]>::len),
        a.as_f32s().map(<[f32]>::len),
        a.as_bools().map(<[bool]>::len),
        a.as_strings().map(<[String]>::len),
        a.as_arrays().map(<[GgufArray]>::len),
        a.as_u64s().map(<[u64]>::len),
        a.as_i64s().map(<[i64]>::len),
        a.as_f64s().map(<[f64]>::len),
    ];
    let matched: Vec<usize> = hits.iter().flatten().copied().collect();
    assert_eq!(matched, vec![n]);
}

fn touch_value(v: &GgufValue) {
    black_box(format!("{v} {v:?}"));
    black_box((
        v.value_type(),
        v.as_u64(),
        v.as_i64(),
        v.as_u32(),
        v.as_usize(),
        v.as_f64(),
        v.as_f32(),
        v.as_bool(),
        v.as_str().map(str::len),
    ));
    if let Some(a) = v.as_array() {
        touch_array(a);
    }
}

fn touch_tensor_info(t: &GgufTensorInfo, file_len: usize) {
    assert!(t.data_range.start <= t.data_range.end && t.data_range.end <= file_len);
    assert!(!t.dims.is_empty() && t.dims.len() <= GGUF_MAX_DIMS && t.dims.iter().all(|&d| d != 0));
    let ty: GgmlType = t.ggml_type;
    assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
    assert_eq!(ty.data_size(t.n_elements()), Some(t.n_bytes() as u64));
    black_box((
        ty.name(),
        ty.block_elems(),
        ty.block_bytes(),
        ty.is_quantized(),
        ty.has_trailing_scale(),
        ty.dtype(),
        t.dims_usize(),
        format!("{t:?} {ty}"),
    ));
}

fuzz_target!(|data: &[u8]| {
    let (metadata, tensors) = match parse_gguf_bytes(data) {
        Ok(parsed) => parsed,
        Err(reason) => {
            black_box(reason);
            return;
        }
    };

    for (key, value) in &metadata {
        black_box(key.len());
        touch_value(value);
    }
    let mut checksum = 0u64;
    for t in &tensors {
        touch_tensor_info(t, data.len());
        let bytes = &data[t.data_range.clone()];
        checksum = bytes
            .iter()
            .fold(checksum, |acc, &b| acc.rotate_left(5) ^ u64::from(b));
    }
    black_box(checksum);

    // The same bytes through the public, file-mapped path.
    let path = scratch_path();
    std::fs::write(path, data).expect("write the scratch file");
    let file =
        GgufFile::open(path).expect("GgufFile::open rejected bytes that parse_gguf_bytes accepted");
    // Compared through Debug: metadata may hold NaN floats, which are never `==` themselves.
    assert_eq!(
        format!("{:?}", file.metadata()),
        format!("{:?}", &metadata[..])
    );
    assert_eq!(file.tensors(), &tensors[..]);
    assert!(GgufFile::parse(file.file().clone()).is_ok());
    black_box((
        file.version(),
        file.alignment(),
        file.data_offset(),
        file.architecture(),
        file.path(),
        format!("{file:?}"),
    ));
    assert!(file.alignment().is_power_of_two());
    for (key, value) in file.metadata() {
        assert!(file.get(key).is_some_and(|v| std::ptr::eq(v, value)));
        assert!(file.require(key).is_ok_and(|v| std::ptr::eq(v, value)));
        let _ = black_box(file.require_u64(key).map_err(|e| e.to_string()));
        let _ = black_box(file.require_f32(key).map_err(|e| e.to_string()));
        let _ = black_box(file.require_str(key).map_err(|e| e.to_string()));
    }
    let _ = black_box(file.require("\u{0}no such key").map_err(|e| e.to_string()));
    for t in file.tensors() {
        assert_eq!(file.tensor(&t.name), Some(t));
        let slice = file.tensor_data(t);
        assert_eq!(slice, &data[t.data_range.clone()]);
        let storage = file
            .tensor_storage(t)
            .expect("tensor_storage of a validated tensor");
        assert!(storage.is_mapped());
        assert_eq!(storage.bytes(), slice);
        match (file.i2s_trailer(t), file.i2s_scale(t)) {
            (Ok(trailer), Ok(scale)) => {
                assert!(t.ggml_type.has_trailing_scale());
                assert_eq!(trailer.len(), I2S_TRAILER_BYTES);
                black_box(scale);
            }
            (Err(a), Err(b)) => {
                black_box((a.to_string(), b.to_string()));
            }
            _ => panic!("i2s_trailer and i2s_scale disagree"),
        }
    }
    drop(file);
});
