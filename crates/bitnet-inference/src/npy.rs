//! NumPy `.npy` files: reading the reference fixtures and writing logits for comparison.
//!
//! The format is a magic string, a version, a Python-literal dict describing the array and the
//! raw little-endian data. Only what the reference tooling writes is accepted: C order and
//! little-endian numeric dtypes. Everything read from the header is checked against the actual
//! file length before it is trusted, so a corrupt file gives an error, not a panic or a huge
//! allocation.

use crate::{Error, Result};
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// NumPy pads the header so the data starts on this boundary, which lets it memory-map arrays.
const HEADER_ALIGN: usize = 64;

/// The elements of an array read from a `.npy` file, in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// `<f4`.
    F32(Vec<f32>),
    /// `<f8`.
    F64(Vec<f64>),
    /// `<i8`.
    I64(Vec<i64>),
    /// `<i4`.
    I32(Vec<i32>),
    /// `|i1`.
    I8(Vec<i8>),
    /// `|u1`.
    U8(Vec<u8>),
}

impl NpyData {
    /// How many elements the array holds.
    pub fn len(&self) -> usize {
        match self {
            NpyData::F32(v) => v.len(),
            NpyData::F64(v) => v.len(),
            NpyData::I64(v) => v.len(),
            NpyData::I32(v) => v.len(),
            NpyData::I8(v) => v.len(),
            NpyData::U8(v) => v.len(),
        }
    }

    /// Whether the array holds no element (a zero-sized dimension).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The NumPy `descr` string of this element type, for messages.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            NpyData::F32(_) => "<f4",
            NpyData::F64(_) => "<f8",
            NpyData::I64(_) => "<i8",
            NpyData::I32(_) => "<i4",
            NpyData::I8(_) => "|i1",
            NpyData::U8(_) => "|u1",
        }
    }
}

/// An array read from a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// The dimensions, outermost first; empty for a 0-d (scalar) array.
    pub shape: Vec<usize>,
    /// The elements; their count is the product of `shape`.
    pub data: NpyData,
}

impl NpyArray {
    /// The elements as `f32`.
    ///
    /// `<f8` data is narrowed (rounded to nearest). Integer arrays are refused rather than
    /// converted, because asking for floats from an id array is almost always a mix-up of
    /// fixture files.
    pub fn into_f32(self) -> Result<Vec<f32>> {
        match self.data {
            NpyData::F32(v) => Ok(v),
            NpyData::F64(v) => Ok(v.into_iter().map(|x| x as f32).collect()),
            other => Err(Error::InvalidInput(format!(
                "expected a floating-point .npy array, found dtype {}",
                other.dtype_name()
            ))),
        }
    }

    /// The elements as `i64`, widening any integer dtype. Floating-point arrays are refused.
    pub fn into_i64(self) -> Result<Vec<i64>> {
        match self.data {
            NpyData::I64(v) => Ok(v),
            NpyData::I32(v) => Ok(v.into_iter().map(i64::from).collect()),
            NpyData::I8(v) => Ok(v.into_iter().map(i64::from).collect()),
            NpyData::U8(v) => Ok(v.into_iter().map(i64::from).collect()),
            other => Err(Error::InvalidInput(format!(
                "expected an integer .npy array, found dtype {}",
                other.dtype_name()
            ))),
        }
    }
}

/// Writes `data` with dimensions `shape` as a format-1.0 `.npy` file of `<f4` in C order.
///
/// The header is laid out byte for byte as NumPy writes it, so files can be compared with
/// NumPy's own. Fails with [`Error::InvalidInput`] when the shape does not match the data
/// length, and with [`Error::Io`] when the file cannot be written.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::InvalidInput(format!("npy shape {shape:?} overflows usize")))?;
    if count != data.len() {
        return Err(Error::InvalidInput(format!(
            "npy shape {shape:?} holds {count} elements but {} were given",
            data.len()
        )));
    }

    let bytes = encode_f32(shape, data)?;
    let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(&bytes).map_err(|e| Error::io(path, e))?;
    file.flush().map_err(|e| Error::io(path, e))
}

/// The whole file image; built in memory because outputs here are logits of at most a few MB.
fn encode_f32(shape: &[usize], data: &[f32]) -> Result<Vec<u8>> {
    let shape_text = match shape {
        [] => "()".to_string(),
        // Python's repr of a 1-tuple keeps the trailing comma.
        [d] => format!("({d},)"),
        dims => {
            let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            format!("({})", parts.join(", "))
        }
    };
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");

    // Version 1.0 stores the header length in 16 bits; larger headers need version 2.0.
    let header_len = |len_field: usize| {
        let prefix = MAGIC.len() + 2 + len_field;
        (prefix + dict.len() + 1).div_ceil(HEADER_ALIGN) * HEADER_ALIGN - prefix
    };
    let (version, len_bytes) = match u16::try_from(header_len(2)) {
        Ok(n) => (1u8, n.to_le_bytes().to_vec()),
        Err(_) => {
            let n = u32::try_from(header_len(4)).map_err(|_| {
                Error::InvalidInput(format!("npy shape of {} dims is too long", shape.len()))
            })?;
            (2u8, n.to_le_bytes().to_vec())
        }
    };
    let total_header = MAGIC.len() + 2 + len_bytes.len() + header_len(len_bytes.len());

    let mut out = Vec::with_capacity(total_header + data.len() * 4);
    out.extend_from_slice(MAGIC);
    out.push(version);
    out.push(0);
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(dict.as_bytes());
    out.resize(total_header - 1, b' ');
    out.push(b'\n');
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

/// Reads a `.npy` file of format version 1.0, 2.0 or 3.0.
///
/// Accepts the dtypes `<f4 <f8 <i8 <i4 |i1 |u1` in C order. Any other dtype, Fortran order, a
/// malformed or truncated header, or a data section whose length differs from what the shape
/// implies gives [`Error::Format`] naming the problem; an unreadable file gives [`Error::Io`].
pub fn read(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes).map_err(|reason| Error::format(path, format!("npy: {reason}")))
}

/// Parses a whole file image; errors are plain reasons so [`read`] can attach the path.
fn parse(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    if bytes.len() < MAGIC.len() + 2 || &bytes[..MAGIC.len()] != MAGIC {
        return Err("bad magic: not a NumPy .npy file".into());
    }
    let major = bytes[6];
    let minor = bytes[7];
    let (len_field, utf8) = match major {
        1 => (2usize, false),
        2 => (4, false),
        3 => (4, true),
        _ => return Err(format!("unsupported format version {major}.{minor}")),
    };
    let len_start = MAGIC.len() + 2;
    let len_bytes = bytes
        .get(len_start..len_start + len_field)
        .ok_or("truncated before the header length")?;
    let header_len = if len_field == 2 {
        usize::from(u16::from_le_bytes([len_bytes[0], len_bytes[1]]))
    } else {
        let n = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        usize::try_from(n).map_err(|_| "header length does not fit in memory".to_string())?
    };
    let header_start = len_start + len_field;
    let data_start = header_start
        .checked_add(header_len)
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            format!(
                "truncated header: it claims {header_len} bytes but the file has {} after the \
                 preamble",
                bytes.len() - header_start.min(bytes.len())
            )
        })?;
    let header_bytes = &bytes[header_start..data_start];
    let header = if utf8 {
        std::str::from_utf8(header_bytes).map_err(|_| "header is not valid UTF-8".to_string())?
    } else {
        if !header_bytes.is_ascii() {
            return Err("header is not ASCII".into());
        }
        // ASCII is valid UTF-8, so this cannot fail; the error path only keeps us panic-free.
        std::str::from_utf8(header_bytes).map_err(|_| "header is not ASCII".to_string())?
    };

    let header = parse_header(header)?;
    if header.fortran_order {
        return Err("fortran_order True is not supported (only C order)".into());
    }
    let dtype = Dtype::from_descr(&header.descr)?;
    let count = header
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {:?} overflows", header.shape))?;
    let data = &bytes[data_start..];
    let expected = count
        .checked_mul(dtype.size())
        .ok_or_else(|| format!("shape {:?} overflows", header.shape))?;
    if data.len() != expected {
        return Err(format!(
            "shape {:?} of {} needs {expected} data bytes but the file has {}",
            header.shape,
            header.descr,
            data.len()
        ));
    }
    Ok(NpyArray {
        shape: header.shape,
        data: dtype.decode(data),
    })
}

/// The element types this reader knows.
#[derive(Debug, Clone, Copy)]
enum Dtype {
    F32,
    F64,
    I64,
    I32,
    I8,
    U8,
}

impl Dtype {
    fn from_descr(descr: &str) -> std::result::Result<Dtype, String> {
        // NumPy writes '<' for multi-byte little-endian types and '|' for single bytes; a
        // single-byte type is endian-free, so '<' and '=' are harmless there too.
        Ok(match descr {
            "<f4" => Dtype::F32,
            "<f8" => Dtype::F64,
            "<i8" => Dtype::I64,
            "<i4" => Dtype::I32,
            "|i1" | "<i1" | "=i1" => Dtype::I8,
            "|u1" | "<u1" | "=u1" => Dtype::U8,
            other => {
                return Err(format!(
                    "unsupported dtype '{other}' (supported: <f4 <f8 <i8 <i4 |i1 |u1)"
                ))
            }
        })
    }

    fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::I8 | Dtype::U8 => 1,
        }
    }

    /// `data.len()` has already been checked to be a multiple of the element size.
    fn decode(self, data: &[u8]) -> NpyData {
        fn words<const N: usize, T>(data: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
            data.chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect()
        }
        match self {
            Dtype::F32 => NpyData::F32(words(data, f32::from_le_bytes)),
            Dtype::F64 => NpyData::F64(words(data, f64::from_le_bytes)),
            Dtype::I64 => NpyData::I64(words(data, i64::from_le_bytes)),
            Dtype::I32 => NpyData::I32(words(data, i32::from_le_bytes)),
            Dtype::I8 => NpyData::I8(data.iter().map(|&b| i8::from_le_bytes([b])).collect()),
            Dtype::U8 => NpyData::U8(data.to_vec()),
        }
    }
}

/// The three keys of a `.npy` header dict.
#[derive(Debug)]
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// A value of the Python-literal subset that `.npy` headers use.
#[derive(Debug)]
enum Value {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// Parses `{'descr': '<f4', 'fortran_order': False, 'shape': (35, 512), }` plus padding.
///
/// A hand-written parser over the small literal grammar NumPy emits; like NumPy, it requires
/// exactly the three known keys.
fn parse_header(text: &str) -> std::result::Result<Header, String> {
    let mut p = Cursor {
        s: text.as_bytes(),
        i: 0,
    };
    p.skip_ws();
    p.expect(b'{')?;
    let mut descr = None;
    let mut fortran = None;
    let mut shape = None;
    loop {
        p.skip_ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.skip_ws();
        p.expect(b':')?;
        p.skip_ws();
        let value = p.value()?;
        match (key.as_str(), value) {
            ("descr", Value::Str(s)) => descr = Some(s),
            ("fortran_order", Value::Bool(b)) => fortran = Some(b),
            ("shape", Value::Tuple(t)) => shape = Some(t),
            ("descr" | "fortran_order" | "shape", v) => {
                return Err(format!("header key '{key}' has an unexpected value {v:?}"))
            }
            (other, _) => return Err(format!("header has an unknown key '{other}'")),
        }
        p.skip_ws();
        if p.eat(b',') {
            continue;
        }
        p.skip_ws();
        p.expect(b'}')?;
        break;
    }
    p.skip_ws();
    if p.i != p.s.len() {
        return Err("header has trailing characters after the dict".into());
    }
    Ok(Header {
        descr: descr.ok_or("header lacks 'descr'")?,
        fortran_order: fortran.ok_or("header lacks 'fortran_order'")?,
        shape: shape.ok_or("header lacks 'shape'")?,
    })
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "malformed header: expected '{}' at byte {}",
                c as char, self.i
            ))
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let quote = match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => {
                return Err(format!(
                    "malformed header: expected a string at byte {}",
                    self.i
                ))
            }
        };
        self.i += 1;
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != quote {
            if self.s[self.i] == b'\\' {
                return Err("malformed header: escapes in strings are not supported".into());
            }
            self.i += 1;
        }
        if self.i >= self.s.len() {
            return Err("malformed header: unterminated string".into());
        }
        let text = std::str::from_utf8(&self.s[start..self.i])
            .map_err(|_| "malformed header: string is not UTF-8".to_string())?
            .to_string();
        self.i += 1;
        Ok(text)
    }

    fn value(&mut self) -> std::result::Result<Value, String> {
        match self.s.get(self.i) {
            Some(b'\'' | b'"') => self.string().map(Value::Str),
            Some(b'(') => self.tuple().map(Value::Tuple),
            _ => {
                for (word, b) in [("True", true), ("False", false)] {
                    if self.s[self.i..].starts_with(word.as_bytes()) {
                        self.i += word.len();
                        return Ok(Value::Bool(b));
                    }
                }
                Err(format!(
                    "malformed header: unexpected value at byte {}",
                    self.i
                ))
            }
        }
    }

    fn tuple(&mut self) -> std::result::Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.skip_ws();
            if self.eat(b')') {
                return Ok(dims);
            }
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                self.i += 1;
            }
            if start == self.i {
                return Err(format!(
                    "malformed header: expected a dimension at byte {}",
                    self.i
                ));
            }
            // Digits only, so the sole failure is overflow.
            let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or_default();
            let d = digits
                .parse::<usize>()
                .map_err(|_| format!("malformed header: dimension {digits} is too large"))?;
            dims.push(d);
            self.skip_ws();
            if !self.eat(b',') {
                self.skip_ws();
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../testdata/tiny-bitnet/ref/"
        ))
        .join(name)
    }

    /// A per-test scratch path, so parallel tests never share a file.
    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("bitnet-npy-{}-{name}", std::process::id()))
    }

    fn prompt_json_ids() -> Vec<i64> {
        let text = std::fs::read_to_string(fixture("prompt.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    }

    #[test]
    fn reads_logits_fixture() {
        let a = read(&fixture("logits_packed_f32.npy")).unwrap();
        assert_eq!(a.shape, vec![35, 512]);
        let v = a.into_f32().unwrap();
        assert_eq!(v.len(), 17920);
        assert!(v.iter().all(|x| x.is_finite()));
        // Random-weight logits are not all equal; a decoder bug that zero-fills would be.
        assert!(v.iter().any(|&x| x != v[0]));
    }

    #[test]
    fn reads_prompt_ids_matching_json() {
        let a = read(&fixture("prompt_ids.npy")).unwrap();
        assert_eq!(a.shape, vec![35]);
        assert!(matches!(a.data, NpyData::I64(_)));
        let ids = a.into_i64().unwrap();
        assert_eq!(ids.len(), 35);
        assert_eq!(ids[0], 510);
        assert_eq!(ids, prompt_json_ids());
    }

    #[test]
    fn reads_greedy_ids_and_step_logits() {
        let ids = read(&fixture("greedy_packed_f32_ids.npy")).unwrap();
        assert_eq!(ids.shape, vec![8]);
        let ids = ids.into_i64().unwrap();
        assert!(ids.iter().all(|&t| (0..512).contains(&t)));

        let steps = read(&fixture("greedy_packed_f32_step_logits.npy")).unwrap();
        assert_eq!(steps.shape, vec![8, 512]);
        let steps = steps.into_f32().unwrap();
        // Greedy ids are by definition the argmax of each step's logits.
        for (row, &id) in steps.chunks_exact(512).zip(&ids) {
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            assert_eq!(best as i64, id);
        }
    }

    #[test]
    fn write_matches_numpy_bytes() {
        // Rewriting a NumPy-written file must reproduce it byte for byte, header included.
        let src = fixture("logits_packed_f32.npy");
        let original = std::fs::read(&src).unwrap();
        let a = read(&src).unwrap();
        let shape = a.shape.clone();
        let data = a.into_f32().unwrap();
        let out = scratch("rewrite.npy");
        write_f32(&out, &shape, &data).unwrap();
        let written = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).ok();
        assert_eq!(written, original);
    }

    #[test]
    fn write_read_round_trip() {
        let cases: Vec<(Vec<usize>, Vec<f32>)> = vec![
            (vec![], vec![3.5]),
            (vec![0], vec![]),
            (vec![5], vec![0.0, -0.0, f32::MIN_POSITIVE, f32::MAX, 1e-42]),
            (
                vec![2, 3, 4],
                (0..24).map(|i| i as f32 * 0.37 - 4.0).collect(),
            ),
            (
                vec![1, 1, 1, 1, 1, 1, 1, 2],
                vec![f32::INFINITY, f32::NEG_INFINITY],
            ),
        ];
        for (i, (shape, data)) in cases.into_iter().enumerate() {
            let out = scratch(&format!("round-trip-{i}.npy"));
            write_f32(&out, &shape, &data).unwrap();
            let header_len = std::fs::metadata(&out).unwrap().len() as usize - data.len() * 4;
            assert_eq!(header_len % HEADER_ALIGN, 0, "shape {shape:?}");
            let back = read(&out).unwrap();
            std::fs::remove_file(&out).ok();
            assert_eq!(back.shape, shape);
            let back = back.into_f32().unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&back), bits(&data));
        }
    }

    #[test]
    fn long_header_switches_to_version_2() {
        // 30000 unit dims make a dict of ~90 kB, past version 1.0's 16-bit length field.
        let shape = vec![1usize; 30_000];
        let bytes = encode_f32(&shape, &[2.5]).unwrap();
        assert_eq!(&bytes[6..8], &[2, 0]);
        let header_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!((12 + header_len) % HEADER_ALIGN, 0);
        let back = parse(&bytes).unwrap();
        assert_eq!(back.shape, shape);
        assert_eq!(back.into_f32().unwrap(), vec![2.5]);
    }

    #[test]
    fn write_rejects_shape_mismatch() {
        let out = scratch("mismatch.npy");
        let err = write_f32(&out, &[2, 2], &[1.0; 3]).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn truncated_files_are_errors() {
        let original = std::fs::read(fixture("prompt_ids.npy")).unwrap();
        for cut in [
            0,
            3,
            6,
            8,
            9,
            10,
            50,
            127,
            128,
            129,
            200,
            original.len() - 1,
        ] {
            let err = parse(&original[..cut]).unwrap_err();
            assert!(!err.is_empty(), "cut {cut}");
        }
        // The full image still parses, so the failures above come from the cuts.
        assert!(parse(&original).is_ok());
    }

    #[test]
    fn read_reports_path_for_corrupt_file() {
        let original = std::fs::read(fixture("logits_packed_f32.npy")).unwrap();
        let out = scratch("corrupt.npy");
        std::fs::write(&out, &original[..1000]).unwrap();
        let err = read(&out).unwrap_err();
        std::fs::remove_file(&out).ok();
        match err {
            Error::Format { path, reason } => {
                assert_eq!(path, out);
                assert!(reason.contains("data bytes"), "{reason}");
            }
            other => panic!("expected a format error, got {other}"),
        }
        assert!(matches!(
            read(&scratch("does-not-exist.npy")),
            Err(Error::Io { .. })
        ));
    }

    /// Builds a version-1.0 image around an arbitrary header dict and data.
    fn image(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&[1, 0]);
        v.extend_from_slice(&(dict.len() as u16 + 1).to_le_bytes());
        v.extend_from_slice(dict.as_bytes());
        v.push(b'\n');
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn malformed_headers_are_errors() {
        let ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
        assert!(parse(&image(ok, &[0; 8])).is_ok());

        let cases = [
            (
                "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }",
                "dtype",
            ),
            (
                "{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }",
                "dtype",
            ),
            (
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }",
                "fortran",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
                "data bytes",
            ),
            ("{'descr': '<f4', 'fortran_order': False, }", "shape"),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 'y'}",
                "unknown",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,x), }",
                "malformed",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)",
                "malformed",
            ),
            (
                "{'descr': '<f4 , 'fortran_order': False, 'shape': (2,)}",
                "malformed",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}",
                "too large",
            ),
            (
                "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296)}",
                "overflow",
            ),
        ];
        for (dict, needle) in cases {
            let err = parse(&image(dict, &[0; 8])).unwrap_err();
            assert!(err.contains(needle), "{dict}: {err}");
        }

        let mut bad_magic = image(ok, &[0; 8]);
        bad_magic[1] = b'X';
        assert!(parse(&bad_magic).unwrap_err().contains("magic"));

        let mut bad_version = image(ok, &[0; 8]);
        bad_version[6] = 9;
        assert!(parse(&bad_version).unwrap_err().contains("version"));

        // A header length pointing far past the end must not be trusted.
        let mut huge_len = image(ok, &[0; 8]);
        huge_len[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(parse(&huge_len).unwrap_err().contains("truncated"));
    }

    #[test]
    fn reads_version_2_and_small_int_types() {
        let dict = "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 2), }\n";
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&[2, 0]);
        v.extend_from_slice(&(dict.len() as u32).to_le_bytes());
        v.extend_from_slice(dict.as_bytes());
        v.extend_from_slice(&[0, 1, 200, 255]);
        let a = parse(&v).unwrap();
        assert_eq!(a.shape, vec![2, 2]);
        assert_eq!(a.clone().into_i64().unwrap(), vec![0, 1, 200, 255]);
        assert!(a.into_f32().is_err());

        let i1 = "{'descr': '|i1', 'fortran_order': False, 'shape': (3,), }";
        let a = parse(&image(i1, &[0x80, 0xff, 0x7f])).unwrap();
        assert_eq!(a.into_i64().unwrap(), vec![-128, -1, 127]);

        let i4 = "{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }";
        let a = parse(&image(i4, &(-7i32).to_le_bytes())).unwrap();
        assert_eq!(a.into_i64().unwrap(), vec![-7]);

        let f8 = "{'descr': '<f8', 'fortran_order': False, 'shape': (), }";
        let a = parse(&image(f8, &0.1f64.to_le_bytes())).unwrap();
        assert!(a.clone().into_i64().is_err());
        assert_eq!(a.into_f32().unwrap(), vec![0.1f32]);
    }
}
