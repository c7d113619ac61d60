use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Error, Result};

/// One cache line; the unit of [`AlignedBuffer`] so its bytes start 64-byte aligned, which
/// every SIMD load width we use (up to 512 bits) accepts.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct CacheLine([u8; 64]);

/// A zero-initialised heap buffer whose first byte is 64-byte aligned.
#[derive(Clone)]
pub struct AlignedBuffer {
    lines: Vec<CacheLine>,
    len: usize,
}

impl AlignedBuffer {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        AlignedBuffer {
            lines: vec![CacheLine([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut b = Self::zeroed(bytes.len());
        b.as_mut_bytes().copy_from_slice(bytes);
        b
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }

    /// The bytes, writable.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }

    /// The bytes as signed values (int8 activation rows: 64-byte aligned, so the SIMD
    /// kernels' 32-byte loads never straddle two cache lines).
    pub fn as_i8(&self) -> &[i8] {
        bytemuck::cast_slice(self.as_bytes())
    }

    /// The bytes as signed values, writable.
    pub fn as_mut_i8(&mut self) -> &mut [i8] {
        bytemuck::cast_slice_mut(self.as_mut_bytes())
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for AlignedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuffer({} bytes)", self.len)
    }
}

/// A model file mapped read-only into memory.
///
/// Weights that the engine can use as stored are borrowed straight from the map, so loading a
/// multi-gigabyte model costs no copy and pages come in lazily.
pub struct MappedFile {
    path: PathBuf,
    map: Backing,
}

/// The bytes behind a [`MappedFile`]: a real map, or bytes built into the program (the
/// built-in model), which need no file at all.
enum Backing {
    Map(memmap2::Mmap),
    Static(&'static [u8]),
}

impl std::ops::Deref for Backing {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Static(b) => b,
        }
    }
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<Self>> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only and never handed out mutably. The remaining hazard of
        // any file map, another process truncating or rewriting the file while we hold it, is
        // the same one every mmap-based model loader accepts (llama.cpp, safetensors); model
        // files are not rewritten in place by the tools that produce them.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        Ok(Arc::new(MappedFile {
            path,
            map: Backing::Map(map),
        }))
    }

    /// Serves `bytes` compiled into the program as if they were a mapped file named `name`
    /// (errors name it). Tensors borrowed from it need the same alignment a page-aligned map
    /// gives, so callers embed the bytes in an aligned static.
    pub fn from_static(name: impl Into<PathBuf>, bytes: &'static [u8]) -> Arc<Self> {
        Arc::new(MappedFile {
            path: name.into(),
            map: Backing::Static(bytes),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All the file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The bytes in `range`, or a format error naming the file if the range is not inside it.
    pub fn slice(&self, range: Range<usize>) -> Result<&[u8]> {
        self.map.get(range.clone()).ok_or_else(|| {
            Error::format(
                &self.path,
                format!(
                    "byte range {}..{} lies outside the file ({} bytes)",
                    range.start,
                    range.end,
                    self.map.len()
                ),
            )
        })
    }
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MappedFile({}, {} bytes)",
            self.path.display(),
            self.map.len()
        )
    }
}

/// Where a tensor's bytes live: an owned aligned buffer or a range of a mapped file.
#[derive(Debug, Clone)]
pub enum Storage {
    /// Bytes owned by this process (repacked or converted weights).
    Heap(Arc<AlignedBuffer>),
    /// Bytes borrowed from a memory-mapped model file.
    Mapped {
        /// The mapped file.
        file: Arc<MappedFile>,
        /// The byte range inside it, already checked to lie within the file.
        range: Range<usize>,
    },
}

impl Storage {
    /// Storage owning `buf`.
    pub fn heap(buf: AlignedBuffer) -> Self {
        Storage::Heap(Arc::new(buf))
    }

    /// Storage borrowing `range` of `file`; fails if the range lies outside the file.
    pub fn mapped(file: Arc<MappedFile>, range: Range<usize>) -> Result<Self> {
        file.slice(range.clone())?;
        Ok(Storage::Mapped { file, range })
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Heap(b) => b.as_bytes(),
            Storage::Mapped { file, range } => &file.bytes()[range.clone()],
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the bytes are borrowed from a file map (no copy was made).
    pub fn is_mapped(&self) -> bool {
        matches!(self, Storage::Mapped { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffer_is_aligned_and_sized() {
        for len in [0usize, 1, 63, 64, 65, 1000] {
            let b = AlignedBuffer::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_bytes().as_ptr() as usize % 64, 0);
            assert!(b.as_bytes().iter().all(|&x| x == 0));
        }
        let b = AlignedBuffer::from_bytes(&[1, 2, 3]);
        assert_eq!(b.as_bytes(), &[1, 2, 3]);
    }

    #[test]
    fn mapped_range_is_checked() {
        let dir = std::env::temp_dir().join(format!("bitnet-core-map-{}", std::process::id()));
        std::fs::write(&dir, b"hello world").unwrap();
        let f = MappedFile::open(&dir).unwrap();
        let s = Storage::mapped(f.clone(), 6..11).unwrap();
        assert_eq!(s.bytes(), b"world");
        assert!(s.is_mapped());
        assert!(Storage::mapped(f, 6..12).is_err());
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(
            MappedFile::open("/nonexistent/x"),
            Err(Error::Io { .. })
        ));
    }
}
