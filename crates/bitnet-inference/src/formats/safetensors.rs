//! Hugging Face safetensors checkpoints: one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`, mapped read-only; tensors are borrowed from the map.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bitnet_core::{DType, MappedFile, Storage};
use half::{bf16, f16};

use crate::{Error, Result};

/// One tensor of a checkpoint: its dtype, shape and bytes (borrowed from the mapped file).
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// The tensor's name in the file.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The bytes, `numel * dtype.size()` of them.
    pub storage: Storage,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Fails with an error naming the tensor unless its shape is `expected`.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::TensorShape {
                name: self.name.clone(),
                expected: expected.to_vec(),
                found: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// The values converted to f32 (exactly: f16 and bf16 widen losslessly). Fails for
    /// integer dtypes.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.storage.bytes();
        // Mapped tensors need not be aligned for their dtype, so read bytes, not casts.
        Ok(match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::I8 | DType::U8 => {
                return Err(Error::TensorDType {
                    name: self.name.clone(),
                    expected: "F32, F16 or BF16".into(),
                    found: self.dtype.to_string(),
                })
            }
        })
    }
}

/// All tensors of a checkpoint, by name.
#[derive(Debug, Default)]
pub struct SafetensorsCheckpoint {
    tensors: BTreeMap<String, TensorEntry>,
    files: Vec<PathBuf>,
}

fn map_dtype(path: &Path, name: &str, d: safetensors::Dtype) -> Result<DType> {
    use safetensors::Dtype as S;
    Ok(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I8 => DType::I8,
        S::U8 => DType::U8,
        other => {
            return Err(Error::format(
                path,
                format!("tensor `{name}` has unsupported dtype {other:?}"),
            ))
        }
    })
}

impl SafetensorsCheckpoint {
    /// Opens the checkpoint in an HF model folder: `model.safetensors`, or the shards named
    /// by `model.safetensors.index.json`.
    pub fn open_folder(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut ckpt = SafetensorsCheckpoint::default();
        if single.is_file() {
            ckpt.add_file(&single)?;
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index, "no `weight_map` object"))?;
            let mut shards: Vec<&str> = Vec::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::format(
                        &index,
                        format!("weight_map entry `{name}` is not a file name"),
                    )
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(Error::format(
                        &index,
                        format!("shard name `{file}` must be a plain file name"),
                    ));
                }
                if !shards.contains(&file) {
                    shards.push(file);
                }
            }
            shards.sort_unstable();
            for shard in shards {
                ckpt.add_file(&dir.join(shard))?;
            }
            for name in map.keys() {
                if !ckpt.tensors.contains_key(name) {
                    return Err(Error::format(
                        &index,
                        format!("tensor `{name}` is listed in weight_map but not in its shard"),
                    ));
                }
            }
        } else {
            return Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json exists",
                ),
            ));
        }
        Ok(ckpt)
    }

    /// Adds the tensors of one `.safetensors` file (validated by the safetensors header rules:
    /// contiguous offsets, sizes matching shapes, the data ending exactly at the file's end).
    pub fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = MappedFile::open(path)?;
        let entries = read_file(&file)?;
        for e in entries {
            if self.tensors.contains_key(&e.name) {
                return Err(Error::format(
                    path,
                    format!("tensor `{}` appears in more than one shard", e.name),
                ));
            }
            self.tensors.insert(e.name.clone(), e);
        }
        self.files.push(path.to_path_buf());
        Ok(())
    }

    /// The tensor called `name`, or [`Error::MissingTensor`].
    pub fn get(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })
    }

    /// Whether a tensor called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorEntry> {
        self.tensors.values()
    }

    /// The files the tensors came from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// Parses the header of a mapped safetensors file and returns its tensors as borrowed views.
pub fn read_file(file: &Arc<MappedFile>) -> Result<Vec<TensorEntry>> {
    let mut out = Vec::new();
    for t in parse_header(file.path(), file.bytes())? {
        let storage = Storage::mapped(file.clone(), t.range)?;
        out.push(TensorEntry {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            storage,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Validates `bytes`, the whole of a safetensors file, exactly as [`read_file`] does (the
/// same code path, minus the memory map) and returns the number of tensors it holds, or the
/// reason it is invalid. Meant for fuzzing (`fuzz/fuzz_targets/safetensors_header.rs`) and
/// tests, where inputs are byte slices rather than files.
pub fn parse_header_bytes(bytes: &[u8]) -> std::result::Result<usize, String> {
    parse_header(Path::new("<bytes>"), bytes)
        .map(|tensors| tensors.len())
        .map_err(|e| e.to_string())
}

/// One tensor as a safetensors header describes it, checked against the file's bytes.
struct HeaderTensor {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// Parses and validates the header of the safetensors file held in `bytes` (read from
/// `path`, named in errors): the safetensors crate's rules, then a supported dtype, sizes
/// matching shapes (with overflow checks) and every tensor's bytes inside the file.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<Vec<HeaderTensor>> {
    check_offsets_inside(path, bytes)?;
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::format(path, format!("bad safetensors header: {e}")))?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let dtype = map_dtype(path, &name, info.dtype)?;
        let (s, e) = info.data_offsets;
        let range = data_start
            .checked_add(s)
            .zip(data_start.checked_add(e))
            .map(|(a, b)| a..b)
            .ok_or_else(|| Error::format(path, format!("tensor `{name}` offsets overflow")))?;
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::format(path, format!("tensor `{name}` shape overflows")))?;
        if numel.checked_mul(dtype.size()) != Some(range.len()) {
            return Err(Error::format(
                path,
                format!("tensor `{name}` byte size does not match its shape"),
            ));
        }
        if bytes.get(range.clone()).is_none() {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` bytes {}..{} lie outside the file ({} bytes)",
                    range.start,
                    range.end,
                    bytes.len()
                ),
            ));
        }
        out.push(HeaderTensor {
            name,
            dtype,
            shape: info.shape.clone(),
            range,
        });
    }
    Ok(out)
}

/// Rejects a header whose `data_offsets` point past the end of the file, before the
/// safetensors crate sees it: `read_metadata` (0.6) adds the last end offset to the header
/// length unchecked, which panics with overflow checks on (debug and test builds) for offsets
/// near `usize::MAX` (regression seed in `fuzz/corpus/safetensors_header/`). Such offsets are
/// invalid anyway, so this only changes which error they get; a header that does not parse
/// here is left for `read_metadata` to reject with its own message.
fn check_offsets_inside(path: &Path, bytes: &[u8]) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        data_offsets: Option<(u64, u64)>,
    }
    let Some(header) = bytes
        .get(..8)
        .and_then(|n| usize::try_from(u64::from_le_bytes(n.try_into().ok()?)).ok())
        // Longer headers than the safetensors crate's limit are its to reject.
        .filter(|&n| n <= 100_000_000)
        .and_then(|n| bytes.get(8..8usize.checked_add(n)?))
    else {
        return Ok(());
    };
    let Ok(entries) = serde_json::from_slice::<std::collections::HashMap<String, Entry>>(header)
    else {
        return Ok(());
    };
    for (name, entry) in &entries {
        if let Some((s, e)) = entry.data_offsets {
            if s.max(e) > bytes.len() as u64 {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}` data offsets [{s}, {e}] lie past the end of the \
                         file ({} bytes)",
                        bytes.len()
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header whose offsets sum to nearly `usize::MAX` must be an error, not an overflow
    /// panic inside the safetensors crate (fuzz regression seed
    /// `fuzz/corpus/safetensors_header/regress-offset-overflow.safetensors`).
    #[test]
    fn huge_offsets_fail_without_overflow() {
        let size = (1u64 << 61) - 1;
        let entries: Vec<String> = (0..8u64)
            .map(|i| {
                format!(
                    "\"t{i}\":{{\"dtype\":\"U8\",\"shape\":[{size}],\"data_offsets\":[{},{}]}}",
                    i * size,
                    (i + 1) * size
                )
            })
            .collect();
        let header = format!("{{{}}}", entries.join(","));
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        let err = parse_header_bytes(&bytes).unwrap_err();
        assert!(err.contains("past the end of the file"), "{err}");
    }

    #[test]
    fn parse_header_bytes_counts_tensors() {
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"format":"pt"}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0; 8]);
        assert_eq!(parse_header_bytes(&bytes), Ok(1));
        bytes.pop();
        assert!(parse_header_bytes(&bytes).is_err());
    }
}
