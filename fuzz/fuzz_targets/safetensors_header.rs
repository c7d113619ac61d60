//! Fuzzes the safetensors header path with arbitrary bytes.
//!
//! Every input goes through `parse_header_bytes`, the byte-slice entry point to the header
//! validation that `read_file` runs on a mapped file (the safetensors crate's
//! `read_metadata`, then this crate's dtype, size and range checks). When an input is
//! accepted, it is also written to a scratch file and opened through the public
//! `SafetensorsCheckpoint::add_file` (memory map included), the tensor counts are compared,
//! and every tensor's bytes are read and, for float dtypes, converted to f32. Any panic, and
//! any disagreement between the two paths, is a crash.

#![no_main]

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::OnceLock;

use bitnet_inference::formats::safetensors::{parse_header_bytes, SafetensorsCheckpoint};
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
        dir.join(format!(
            "bitnet-fuzz-safetensors-{}.safetensors",
            std::process::id()
        ))
    })
}

fuzz_target!(|data: &[u8]| {
    let count = match parse_header_bytes(data) {
        Ok(count) => count,
        Err(reason) => {
            black_box(reason);
            return;
        }
    };

    let path = scratch_path();
    std::fs::write(path, data).expect("write the scratch file");
    let mut ckpt = SafetensorsCheckpoint::default();
    ckpt.add_file(path)
        .expect("add_file rejected bytes that parse_header_bytes accepted");
    assert_eq!(ckpt.tensors().count(), count);
    for t in ckpt.tensors() {
        assert!(ckpt.contains(&t.name));
        assert_eq!(
            ckpt.get(&t.name).map(|e| e.name.as_str()).ok(),
            Some(t.name.as_str())
        );
        assert!(t.storage.is_mapped());
        assert_eq!(t.storage.len(), t.numel() * t.dtype.size());
        assert!(t.expect_shape(&t.shape).is_ok());
        black_box(format!("{t:?}"));
        match t.to_f32() {
            Ok(v) => assert_eq!(v.len(), t.numel()),
            Err(e) => black_box(e.to_string()).clear(),
        }
    }
    black_box(ckpt.files());
});
