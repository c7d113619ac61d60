//! A GGUF writer (version 3, little-endian) whose files llama.cpp, the `gguf` Python package
//! and [`GgufFile`] read back.
//!
//! [`GgufWriter`] collects metadata entries and tensors, checks each one as it is added (so a
//! mistake is reported where it is made, not as a corrupt file later), and then writes:
//!
//! ```text
//! "GGUF" | u32 3 | u64 tensor_count | u64 metadata_kv_count
//! metadata entries in insertion order (string key | u32 value type | value)
//! tensor infos in insertion order (string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type
//!                                  | u64 offset from the start of the data section)
//! zero padding up to the alignment
//! each tensor's bytes followed by zero padding up to the alignment
//! ```
//!
//! The padding follows the convention of llama.cpp's `gguf_write_to_buf` and gguf-py's
//! `GGUFWriter`: the data section starts at the first aligned offset after the tensor infos,
//! and every tensor, the last one included, is padded to the alignment. A file that either of
//! them wrote therefore comes out byte for byte the same when its metadata and tensors are
//! copied into a [`GgufWriter`] in file order ([`GgufWriter::from_gguf`]).
//!
//! `I2_S` tensors (bitnet.cpp) carry [`I2S_TRAILER_BYTES`] bytes after their `n/4` bytes of
//! codes, holding the tensor's f32 scale. The tensor info implies only the codes; the writer
//! writes the trailer right after them and lays the next tensor out after the trailer, as
//! bitnet.cpp's loader expects.
//!
//! Compatibility notes: llama.cpp refuses metadata arrays whose elements are arrays ("invalid
//! GGUF type 9"; gguf-py and [`GgufFile`] accept them), and only bitnet.cpp's fork of ggml
//! knows type id 36 (`I2_S`): upstream llama.cpp takes it for a removed type with block size 0
//! and gguf-py 0.19 has no such type, so both refuse a whole file holding an `I2_S` tensor.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::gguf::{
    GgmlType, GgufArray, GgufFile, GgufValue, GGUF_ALIGNMENT_KEY, GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC, GGUF_MAX_ARRAY_DEPTH, GGUF_MAX_DIMS, I2S_TRAILER_BYTES,
};
use crate::{Error, Result};

/// The GGUF version [`GgufWriter`] writes.
pub const GGUF_WRITE_VERSION: u32 = 3;

/// The longest tensor name in bytes: ggml's `GGML_MAX_NAME` is 64 including the C string's
/// terminating NUL, and llama.cpp refuses longer names.
pub const GGUF_MAX_TENSOR_NAME_BYTES: usize = 63;

/// The longest metadata key in bytes (the GGUF specification's limit, `2^16 - 1`).
pub const GGUF_MAX_KEY_BYTES: usize = 65_535;

/// A tensor waiting to be written.
#[derive(Debug, Clone)]
struct PendingTensor<'a> {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    /// Everything written for the tensor: for `I2_S`, the codes and the trailer.
    data: Cow<'a, [u8]>,
}

/// The parts of a file that [`GgufWriter`] works out before writing anything.
struct Layout {
    /// Header, metadata and tensor infos, without the padding after them.
    head: Vec<u8>,
    /// The offset of the data section (the head's length rounded up to the alignment).
    data_start: u64,
    /// The total file size.
    file_size: u64,
}

/// Builds a GGUF file (version 3) from metadata entries and tensors, in the order they are
/// added.
///
/// Tensor data is held as [`Cow`]: owned (`Vec<u8>`) or borrowed for `'a` (a `&[u8]`, for
/// instance a slice of another file's memory map), so rewriting a large file copies nothing
/// until the bytes are written.
///
/// ```
/// use bitnet_inference::formats::gguf::{GgmlType, GgufValue};
/// use bitnet_inference::formats::gguf_writer::GgufWriter;
///
/// let mut w = GgufWriter::new();
/// w.add_metadata("general.architecture", GgufValue::String("bitnet".into()))?;
/// w.add_tensor("output_norm.weight", &[4], GgmlType::F32, vec![0u8; 16])?;
/// let bytes = w.write_to_vec()?;
/// assert_eq!(&bytes[..4], b"GGUF");
/// # Ok::<(), bitnet_inference::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct GgufWriter<'a> {
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<PendingTensor<'a>>,
    tensor_names: HashSet<String>,
    alignment: u64,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> GgufWriter<'a> {
    /// An empty writer with the default alignment ([`GGUF_DEFAULT_ALIGNMENT`]).
    pub fn new() -> Self {
        GgufWriter {
            metadata: Vec::new(),
            metadata_index: HashMap::new(),
            tensors: Vec::new(),
            tensor_names: HashSet::new(),
            alignment: GGUF_DEFAULT_ALIGNMENT,
        }
    }

    /// A writer holding all of `file`'s metadata and tensors in file order, the tensor data
    /// borrowed from its map (for `I2_S`, with the scale trailer).
    ///
    /// Writing it reproduces a file written by llama.cpp or gguf-py byte for byte. Fails if
    /// the file holds something this writer refuses: a `general.alignment` that is not a u32,
    /// a tensor name longer than [`GGUF_MAX_TENSOR_NAME_BYTES`], an `I2_S` tensor whose
    /// trailer is missing.
    pub fn from_gguf(file: &'a GgufFile) -> Result<Self> {
        let mut w = GgufWriter::new();
        for (key, value) in file.metadata() {
            w.add_metadata(key.clone(), value.clone())?;
        }
        for info in file.tensors() {
            let data = if info.ggml_type.has_trailing_scale() {
                // The codes and the trailer are contiguous: `i2s_trailer` checked that the
                // trailer lies inside the file right after the codes.
                let trailer = file.i2s_trailer(info)?;
                let end = info.data_range.end + trailer.len();
                file.file()
                    .bytes()
                    .get(info.data_range.start..end)
                    .ok_or_else(|| {
                        Error::format(
                            file.path(),
                            format!("I2_S tensor `{}` runs past the end of the file", info.name),
                        )
                    })?
            } else {
                file.tensor_data(info)
            };
            w.add_tensor(info.name.clone(), &info.dims, info.ggml_type, data)?;
        }
        Ok(w)
    }

    /// The alignment of the tensor data.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Sets the alignment of the tensor data: a power of two that fits a u32 (llama.cpp
    /// reads `general.alignment` as a u32).
    ///
    /// An existing `general.alignment` entry is updated in place; otherwise one is appended
    /// to the metadata unless `alignment` is the default 32.
    pub fn set_alignment(&mut self, alignment: u64) -> Result<()> {
        let value = u32::try_from(alignment)
            .ok()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| {
                invalid(format!(
                    "alignment {alignment} is not a power of two between 1 and 2^31"
                ))
            })?;
        match self.metadata_index.get(GGUF_ALIGNMENT_KEY) {
            Some(&i) => {
                if let Some((_, v)) = self.metadata.get_mut(i) {
                    *v = GgufValue::U32(value);
                }
            }
            None if alignment != GGUF_DEFAULT_ALIGNMENT => {
                self.push_metadata(GGUF_ALIGNMENT_KEY.to_owned(), GgufValue::U32(value));
            }
            None => {}
        }
        self.alignment = alignment;
        Ok(())
    }

    /// Appends a metadata entry.
    ///
    /// Fails if `key` is already present, empty or longer than [`GGUF_MAX_KEY_BYTES`], if
    /// arrays nest deeper than [`GGUF_MAX_ARRAY_DEPTH`], or if `key` is `general.alignment`
    /// and the value is not a u32 power of two (which then becomes the alignment).
    pub fn add_metadata(&mut self, key: impl Into<String>, value: GgufValue) -> Result<()> {
        let key = key.into();
        if key.is_empty() || key.len() > GGUF_MAX_KEY_BYTES {
            return Err(invalid(format!(
                "metadata key `{key}` is {} bytes long, expected 1 to {GGUF_MAX_KEY_BYTES}",
                key.len()
            )));
        }
        if self.metadata_index.contains_key(&key) {
            return Err(invalid(format!("duplicate metadata key `{key}`")));
        }
        if let GgufValue::Array(a) = &value {
            if nests_deeper_than(a, GGUF_MAX_ARRAY_DEPTH - 1) {
                return Err(invalid(format!(
                    "metadata key `{key}`: arrays nested more than {GGUF_MAX_ARRAY_DEPTH} deep"
                )));
            }
        }
        if key == GGUF_ALIGNMENT_KEY {
            match value {
                GgufValue::U32(a) if a.is_power_of_two() => self.alignment = a.into(),
                _ => {
                    return Err(invalid(format!(
                        "`{GGUF_ALIGNMENT_KEY}` is {value} ({}), expected a u32 power of two",
                        value.value_type()
                    )))
                }
            }
        }
        self.push_metadata(key, value);
        Ok(())
    }

    fn push_metadata(&mut self, key: String, value: GgufValue) {
        self.metadata_index.insert(key.clone(), self.metadata.len());
        self.metadata.push((key, value));
    }

    /// The metadata entries in the order they will be written.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// Appends a tensor.
    ///
    /// `dims` are in ggml order (`ne0`, the contiguous dimension, first): between 1 and
    /// [`GGUF_MAX_DIMS`] of them, none zero, their product at most `i64::MAX`, `ne0` a
    /// multiple of the type's block size. `data` must be exactly
    /// [`GgmlType::data_size`] bytes; for `I2_S`, that many bytes of codes followed by the
    /// [`I2S_TRAILER_BYTES`]-byte trailer whose first 4 bytes are the f32 scale.
    ///
    /// The name must be unique, non-empty, without NUL bytes and at most
    /// [`GGUF_MAX_TENSOR_NAME_BYTES`] bytes long.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ggml_type: GgmlType,
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<()> {
        let name = name.into();
        let data = data.into();
        if name.is_empty() || name.len() > GGUF_MAX_TENSOR_NAME_BYTES || name.contains('\0') {
            return Err(invalid(format!(
                "tensor name `{}` ({} bytes) must be 1 to {GGUF_MAX_TENSOR_NAME_BYTES} bytes \
                 without NUL",
                name.escape_debug(),
                name.len()
            )));
        }
        if self.tensor_names.contains(&name) {
            return Err(invalid(format!("duplicate tensor name `{name}`")));
        }
        let in_tensor = |reason: String| invalid(format!("tensor `{name}`: {reason}"));
        if dims.is_empty() || dims.len() > GGUF_MAX_DIMS {
            return Err(in_tensor(format!(
                "{} dimensions {dims:?}, expected 1 to {GGUF_MAX_DIMS}",
                dims.len()
            )));
        }
        let mut n_elements = 1u64;
        for (i, &d) in dims.iter().enumerate() {
            if d == 0 {
                return Err(in_tensor(format!("dimension {i} is zero (dims {dims:?})")));
            }
            n_elements = n_elements
                .checked_mul(d)
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| {
                    in_tensor(format!("element count of dims {dims:?} exceeds i64::MAX"))
                })?;
        }
        let block = ggml_type.block_elems();
        if !dims[0].is_multiple_of(block) {
            return Err(in_tensor(format!(
                "first dimension {} is not a multiple of the {ggml_type} block size {block}",
                dims[0]
            )));
        }
        let mut expected = ggml_type.data_size(n_elements);
        if ggml_type.has_trailing_scale() {
            expected = expected.and_then(|n| n.checked_add(I2S_TRAILER_BYTES as u64));
        }
        let expected = expected.ok_or_else(|| {
            in_tensor(format!(
                "byte size of {n_elements} {ggml_type} elements overflows"
            ))
        })?;
        if data.len() as u64 != expected {
            let what = if ggml_type.has_trailing_scale() {
                format!(
                    "{} bytes of codes and a {I2S_TRAILER_BYTES}-byte scale trailer",
                    expected - I2S_TRAILER_BYTES as u64
                )
            } else {
                format!("{expected} bytes")
            };
            return Err(in_tensor(format!(
                "{} bytes of data, expected {what} for {n_elements} {ggml_type} elements \
                 (dims {dims:?})",
                data.len()
            )));
        }
        self.tensor_names.insert(name.clone());
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ggml_type,
            data,
        });
        Ok(())
    }

    /// The number of tensors added so far.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// The size in bytes of the file [`GgufWriter::write_to`] would write now.
    pub fn file_size(&self) -> Result<u64> {
        Ok(self.layout()?.file_size)
    }

    /// Encodes the header, metadata and tensor infos and works out where everything goes.
    fn layout(&self) -> Result<Layout> {
        let overflow = || invalid("the file size overflows u64".to_owned());
        let mut head = Vec::new();
        head.extend_from_slice(&GGUF_MAGIC);
        head.extend_from_slice(&GGUF_WRITE_VERSION.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut head, key);
            head.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut head, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = offset
                .checked_add(t.data.len() as u64)
                .and_then(|end| end.checked_next_multiple_of(self.alignment))
                .ok_or_else(overflow)?;
        }
        let data_start = (head.len() as u64)
            .checked_next_multiple_of(self.alignment)
            .ok_or_else(overflow)?;
        let file_size = data_start.checked_add(offset).ok_or_else(overflow)?;
        Ok(Layout {
            head,
            data_start,
            file_size,
        })
    }

    /// Writes the whole file to `out`.
    fn write_into(&self, layout: &Layout, out: &mut impl Write) -> io::Result<()> {
        out.write_all(&layout.head)?;
        write_zeros(out, layout.data_start - layout.head.len() as u64)?;
        for t in &self.tensors {
            out.write_all(&t.data)?;
            let len = t.data.len() as u64;
            // `layout` checked that the padded sizes do not overflow.
            let padded = len.checked_next_multiple_of(self.alignment).unwrap_or(len);
            write_zeros(out, padded - len)?;
        }
        Ok(())
    }

    /// Writes the file to `path`.
    ///
    /// The bytes go to `path` with `.tmp` appended first, which is then renamed to `path`,
    /// so a failed write never leaves a truncated file at `path` (the temporary file is
    /// removed on failure). Nothing is created if the contents are invalid.
    pub fn write_to(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let layout = self.layout()?;
        let tmp = tmp_path(path);
        let written = File::create(&tmp).and_then(|file| {
            let mut out = BufWriter::with_capacity(1 << 20, file);
            self.write_into(&layout, &mut out)?;
            let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
            file.sync_all()
        });
        if let Err(e) = written {
            // Best effort: the write already failed, and that is the error to report.
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(tmp, e));
        }
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })
    }

    /// The file's bytes in memory.
    pub fn write_to_vec(&self) -> Result<Vec<u8>> {
        let layout = self.layout()?;
        let size = usize::try_from(layout.file_size)
            .map_err(|_| invalid(format!("{} bytes do not fit in memory", layout.file_size)))?;
        let mut out = Vec::new();
        out.try_reserve_exact(size)
            .map_err(|e| invalid(format!("cannot allocate {size} bytes: {e}")))?;
        self.write_into(&layout, &mut out)
            .map_err(|e| invalid(format!("writing to memory failed: {e}")))?;
        Ok(out)
    }
}

/// An [`Error::InvalidInput`] prefixed with the writer's name.
fn invalid(reason: String) -> Error {
    Error::InvalidInput(format!("GGUF writer: {reason}"))
}

/// `path` with `.tmp` appended to its file name.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Whether `a` holds arrays more than `limit` levels below itself (an array of scalars is
/// 0 levels deep). Stops descending at the limit.
fn nests_deeper_than(a: &GgufArray, limit: usize) -> bool {
    match a {
        GgufArray::Array(inner) => {
            limit == 0 || inner.iter().any(|x| nests_deeper_than(x, limit - 1))
        }
        _ => false,
    }
}

fn write_zeros(out: &mut impl Write, n: u64) -> io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut left = n;
    while left > 0 {
        let chunk = left.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..chunk])?;
        left -= chunk as u64;
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends the little-endian bytes of every element.
macro_rules! put_elems {
    ($out:expr, $v:expr) => {
        for x in $v {
            $out.extend_from_slice(&x.to_le_bytes());
        }
    };
}

/// Appends a value without its type id.
fn put_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.push(*v),
        GgufValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(a) => put_array(out, a),
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}

/// Appends an array: element type id, u64 count, elements (nested arrays recursively; the
/// depth was checked when the entry was added).
fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
    out.extend_from_slice(&a.elem_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    match a {
        GgufArray::U8(v) => out.extend_from_slice(v),
        GgufArray::I8(v) => put_elems!(out, v),
        GgufArray::U16(v) => put_elems!(out, v),
        GgufArray::I16(v) => put_elems!(out, v),
        GgufArray::U32(v) => put_elems!(out, v),
        GgufArray::I32(v) => put_elems!(out, v),
        GgufArray::F32(v) => put_elems!(out, v),
        GgufArray::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        GgufArray::String(v) => {
            for s in v {
                put_str(out, s);
            }
        }
        GgufArray::Array(v) => {
            for inner in v {
                put_array(out, inner);
            }
        }
        GgufArray::U64(v) => put_elems!(out, v),
        GgufArray::I64(v) => put_elems!(out, v),
        GgufArray::F64(v) => put_elems!(out, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::parse_bytes;

    fn u32b(v: u32) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    fn u64b(v: u64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    fn sb(s: &str) -> Vec<u8> {
        [u64b(s.len() as u64), s.as_bytes().to_vec()].concat()
    }

    fn err(r: Result<()>) -> String {
        match r {
            Err(e @ Error::InvalidInput(_)) => e.to_string(),
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn exact_bytes_of_a_small_file() {
        let mut w = GgufWriter::new();
        w.add_metadata("a", GgufValue::U16(0x0102)).unwrap();
        w.add_metadata(
            "b",
            GgufValue::Array(GgufArray::Array(vec![
                GgufArray::Bool(vec![true, false]),
                GgufArray::String(vec!["é".into()]),
                GgufArray::F64(vec![]),
            ])),
        )
        .unwrap();
        w.add_tensor("t", &[3], GgmlType::F16, vec![1, 2, 3, 4, 5, 6])
            .unwrap();
        w.add_tensor("u", &[1, 1], GgmlType::I8, vec![7]).unwrap();
        let bytes = w.write_to_vec().unwrap();

        let mut want = b"GGUF".to_vec();
        want.extend(u32b(3));
        want.extend(u64b(2));
        want.extend(u64b(2));
        want.extend([sb("a"), u32b(2), vec![2, 1]].concat());
        want.extend([sb("b"), u32b(9), u32b(9), u64b(3)].concat());
        want.extend([u32b(7), u64b(2), vec![1, 0]].concat());
        want.extend([u32b(8), u64b(1), sb("é")].concat());
        want.extend([u32b(12), u64b(0)].concat());
        want.extend([sb("t"), u32b(1), u64b(3), u32b(1), u64b(0)].concat());
        want.extend([sb("u"), u32b(2), u64b(1), u64b(1), u32b(24), u64b(32)].concat());
        let head = want.len();
        want.resize(head.next_multiple_of(32), 0);
        want.extend([1, 2, 3, 4, 5, 6]);
        want.resize(want.len() + 26, 0);
        want.push(7);
        want.resize(want.len() + 31, 0);
        assert_eq!(bytes, want);
        assert_eq!(w.file_size().unwrap(), want.len() as u64);

        let p = parse_bytes(&bytes).unwrap();
        assert_eq!(p.metadata, w.metadata());
        assert_eq!(p.tensors[1].data_range.len(), 1);
    }

    #[test]
    fn empty_writer_is_a_valid_file() {
        let bytes = GgufWriter::new().write_to_vec().unwrap();
        // 24-byte header padded to 32, like llama.cpp and gguf-py.
        assert_eq!(bytes.len(), 32);
        let p = parse_bytes(&bytes).unwrap();
        assert!(p.metadata.is_empty() && p.tensors.is_empty());
        assert_eq!(p.data_offset, 32);
    }

    #[test]
    fn alignment_key_handling() {
        let mut w = GgufWriter::new();
        w.set_alignment(32).unwrap();
        assert!(w.metadata().is_empty(), "default alignment writes no key");
        w.add_metadata("x", GgufValue::U8(1)).unwrap();
        w.set_alignment(64).unwrap();
        w.set_alignment(8).unwrap();
        assert_eq!(
            w.metadata()[1],
            (GGUF_ALIGNMENT_KEY.to_owned(), GgufValue::U32(8))
        );
        assert_eq!(w.alignment(), 8);
        w.add_tensor("t", &[3], GgmlType::F32, vec![0; 12]).unwrap();
        w.add_tensor("u", &[1], GgmlType::F32, vec![0; 4]).unwrap();
        let p = parse_bytes(&w.write_to_vec().unwrap()).unwrap();
        assert_eq!(p.alignment, 8);
        assert_eq!(p.tensors[1].offset, 16);

        for bad in [0, 3, 48, 1 << 32, u64::MAX] {
            let e = err(w.set_alignment(bad));
            assert!(e.contains("power of two"), "{e}");
        }
        assert_eq!(w.alignment(), 8);

        let mut w = GgufWriter::new();
        for v in [
            GgufValue::U64(64),
            GgufValue::I32(64),
            GgufValue::U32(0),
            GgufValue::U32(96),
        ] {
            let e = err(w.add_metadata(GGUF_ALIGNMENT_KEY, v));
            assert!(e.contains("u32 power of two"), "{e}");
        }
        w.add_metadata(GGUF_ALIGNMENT_KEY, GgufValue::U32(1))
            .unwrap();
        assert_eq!(w.alignment(), 1);
        w.add_tensor("t", &[3], GgmlType::I8, vec![0; 3]).unwrap();
        w.add_tensor("u", &[1], GgmlType::I8, vec![9]).unwrap();
        let bytes = w.write_to_vec().unwrap();
        let p = parse_bytes(&bytes).unwrap();
        assert_eq!(p.tensors[1].offset, 3);
        assert_eq!(bytes.last(), Some(&9));
    }

    #[test]
    fn bad_names_and_keys_fail() {
        let mut w = GgufWriter::new();
        let long = "n".repeat(GGUF_MAX_TENSOR_NAME_BYTES);
        w.add_tensor(long.clone(), &[1], GgmlType::F32, vec![0; 4])
            .unwrap();
        for name in [format!("{long}x"), String::new(), "a\0b".to_owned()] {
            let e = err(w.add_tensor(name, &[1], GgmlType::F32, vec![0; 4]));
            assert!(e.contains("tensor name"), "{e}");
        }
        let e = err(w.add_metadata("", GgufValue::U8(0)));
        assert!(e.contains("1 to 65535"), "{e}");
        let e = err(w.add_metadata("k".repeat(GGUF_MAX_KEY_BYTES + 1), GgufValue::U8(0)));
        assert!(e.contains("1 to 65535"), "{e}");
        assert_eq!(w.tensor_count(), 1);
        assert!(w.metadata().is_empty());
    }

    #[test]
    fn array_depth_is_limited_like_the_reader() {
        fn nested(depth: usize) -> GgufValue {
            let mut a = GgufArray::U32(vec![42]);
            for _ in 1..depth {
                a = GgufArray::Array(vec![GgufArray::I8(vec![]), a]);
            }
            GgufValue::Array(a)
        }
        let mut w = GgufWriter::new();
        w.add_metadata("ok", nested(GGUF_MAX_ARRAY_DEPTH)).unwrap();
        let e = err(w.add_metadata("deep", nested(GGUF_MAX_ARRAY_DEPTH + 1)));
        assert!(e.contains("nested more than 8"), "{e}");
        let p = parse_bytes(&w.write_to_vec().unwrap()).unwrap();
        assert_eq!(p.metadata, w.metadata());
    }

    #[test]
    fn i2s_trailer_is_written_and_skipped() {
        let mut w = GgufWriter::new();
        let mut data = vec![0x5Au8; 24];
        data.extend(1.5f32.to_le_bytes());
        data.resize(24 + I2S_TRAILER_BYTES, 0xEE);
        w.add_tensor("q", &[96], GgmlType::I2_S, data.clone())
            .unwrap();
        w.add_tensor("n", &[2], GgmlType::F32, vec![1; 8]).unwrap();
        let bytes = w.write_to_vec().unwrap();
        let p = parse_bytes(&bytes).unwrap();
        let q = &p.tensors[0];
        assert_eq!(q.data_range.len(), 24);
        assert_eq!(
            &bytes[q.data_range.start..q.data_range.start + 56],
            &data[..]
        );
        // 56 bytes rounded up to 64.
        assert_eq!(p.tensors[1].offset, 64);
        assert_eq!(bytes.len() as u64, p.data_offset + 64 + 32);

        let e = err(w.add_tensor("r", &[96], GgmlType::I2_S, vec![0; 24]));
        assert!(
            e.contains("24 bytes of codes and a 32-byte scale trailer"),
            "{e}"
        );
    }

    #[test]
    fn write_to_creates_no_file_on_failure() {
        let dir = std::env::temp_dir().join(format!("bitnet-gguf-writer-{}", std::process::id()));
        let missing = dir.join("missing-dir").join("out.gguf");
        let w = GgufWriter::new();
        match w.write_to(&missing) {
            Err(Error::Io { path, .. }) => assert_eq!(path, tmp_path(&missing)),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        assert!(!missing.exists() && !tmp_path(&missing).exists());
    }
}
