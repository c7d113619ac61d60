//! A validating, zero-copy GGUF reader (versions 2 and 3, little-endian).
//!
//! [`GgufFile::open`] maps the file and checks every header field before anything else may
//! use it: the magic and version, every length and count against the bytes that are actually
//! left (so a hostile count never turns into a huge allocation), UTF-8, value and ggml type
//! ids, array nesting, tensor ranks and shapes, byte sizes (with overflow checks), offset
//! alignment, and that every tensor's bytes lie inside the file without overlapping another's.
//! Tensor data is then handed out as slices of the map ([`GgufFile::tensor_data`]) or as
//! [`Storage`] borrowing it ([`GgufFile::tensor_storage`]); nothing is copied.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! "GGUF" | u32 version | u64 tensor_count | u64 metadata_kv_count
//! metadata_kv_count x (string key | u32 value type | value)
//! tensor_count x (string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset)
//! padding up to `general.alignment` (default 32)
//! tensor data; each tensor at data start + offset, offsets multiples of the alignment
//! ```
//!
//! A string is a u64 byte length followed by UTF-8 bytes; an array is a u32 element type, a
//! u64 count and the elements (arrays may nest).

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use bitnet_core::{DType, MappedFile, Storage};

use crate::{Error, Result};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The GGUF versions this reader accepts.
pub const GGUF_SUPPORTED_VERSIONS: [u32; 2] = [2, 3];

/// Alignment of the tensor data when the file has no `general.alignment` key.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;

/// The metadata key that sets the data alignment.
pub const GGUF_ALIGNMENT_KEY: &str = "general.alignment";

/// The metadata key naming the model architecture (`bitnet`, `llama`, ...).
pub const GGUF_ARCHITECTURE_KEY: &str = "general.architecture";

/// The most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const GGUF_MAX_DIMS: usize = 4;

/// The deepest nesting of arrays inside metadata values this reader accepts (an array of
/// scalars is depth 1).
pub const GGUF_MAX_ARRAY_DEPTH: usize = 8;

/// Bytes that follow the codes of an `I2_S` tensor (bitnet.cpp): the per-tensor f32 scale and
/// padding. The tensor info's implied size does not include them.
pub const I2S_TRAILER_BYTES: usize = 32;

/// Smallest possible encoding of one metadata entry: empty key (8), type (4), one-byte value.
const KV_MIN_BYTES: usize = 8 + 4 + 1;

/// Smallest possible encoding of one tensor info: empty name (8), n_dims (4), one dim (8),
/// type (4), offset (8).
const TENSOR_INFO_MIN_BYTES: usize = 8 + 4 + 8 + 4 + 8;

/// Reads the value types of GGUF metadata.
///
/// The ids are those of the GGUF specification, so a writer can reuse [`GgufValueType::id`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    /// Unsigned 8-bit integer (id 0).
    U8,
    /// Signed 8-bit integer (id 1).
    I8,
    /// Unsigned 16-bit integer (id 2).
    U16,
    /// Signed 16-bit integer (id 3).
    I16,
    /// Unsigned 32-bit integer (id 4).
    U32,
    /// Signed 32-bit integer (id 5).
    I32,
    /// IEEE 754 binary32 (id 6).
    F32,
    /// Boolean stored as one byte, 0 or 1 (id 7).
    Bool,
    /// UTF-8 string with a u64 length prefix (id 8).
    String,
    /// Array: u32 element type, u64 count, elements (id 9).
    Array,
    /// Unsigned 64-bit integer (id 10).
    U64,
    /// Signed 64-bit integer (id 11).
    I64,
    /// IEEE 754 binary64 (id 12).
    F64,
}

impl GgufValueType {
    /// Every value type, in id order.
    pub const ALL: [GgufValueType; 13] = [
        GgufValueType::U8,
        GgufValueType::I8,
        GgufValueType::U16,
        GgufValueType::I16,
        GgufValueType::U32,
        GgufValueType::I32,
        GgufValueType::F32,
        GgufValueType::Bool,
        GgufValueType::String,
        GgufValueType::Array,
        GgufValueType::U64,
        GgufValueType::I64,
        GgufValueType::F64,
    ];

    /// The id written in the file.
    pub const fn id(self) -> u32 {
        match self {
            GgufValueType::U8 => 0,
            GgufValueType::I8 => 1,
            GgufValueType::U16 => 2,
            GgufValueType::I16 => 3,
            GgufValueType::U32 => 4,
            GgufValueType::I32 => 5,
            GgufValueType::F32 => 6,
            GgufValueType::Bool => 7,
            GgufValueType::String => 8,
            GgufValueType::Array => 9,
            GgufValueType::U64 => 10,
            GgufValueType::I64 => 11,
            GgufValueType::F64 => 12,
        }
    }

    /// The value type with file id `id`, if there is one.
    pub const fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgufValueType::U8,
            1 => GgufValueType::I8,
            2 => GgufValueType::U16,
            3 => GgufValueType::I16,
            4 => GgufValueType::U32,
            5 => GgufValueType::I32,
            6 => GgufValueType::F32,
            7 => GgufValueType::Bool,
            8 => GgufValueType::String,
            9 => GgufValueType::Array,
            10 => GgufValueType::U64,
            11 => GgufValueType::I64,
            12 => GgufValueType::F64,
            _ => return None,
        })
    }

    /// A short lowercase name (`u32`, `string`, `array`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            GgufValueType::U8 => "u8",
            GgufValueType::I8 => "i8",
            GgufValueType::U16 => "u16",
            GgufValueType::I16 => "i16",
            GgufValueType::U32 => "u32",
            GgufValueType::I32 => "i32",
            GgufValueType::F32 => "f32",
            GgufValueType::Bool => "bool",
            GgufValueType::String => "string",
            GgufValueType::Array => "array",
            GgufValueType::U64 => "u64",
            GgufValueType::I64 => "i64",
            GgufValueType::F64 => "f64",
        }
    }

    /// The encoded size of one value of a fixed-size type; `None` for strings and arrays.
    pub const fn fixed_size(self) -> Option<usize> {
        match self {
            GgufValueType::U8 | GgufValueType::I8 | GgufValueType::Bool => Some(1),
            GgufValueType::U16 | GgufValueType::I16 => Some(2),
            GgufValueType::U32 | GgufValueType::I32 | GgufValueType::F32 => Some(4),
            GgufValueType::U64 | GgufValueType::I64 | GgufValueType::F64 => Some(8),
            GgufValueType::String | GgufValueType::Array => None,
        }
    }

    /// The fewest bytes one value of this type can take in a file: the fixed size, the length
    /// prefix of an empty string, or the header of an empty array.
    const fn min_encoded_size(self) -> usize {
        match self.fixed_size() {
            Some(n) => n,
            None => match self {
                GgufValueType::String => 8,
                _ => 4 + 8,
            },
        }
    }
}

impl fmt::Display for GgufValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A typed array from GGUF metadata: all elements share the type written in the array header.
///
/// Nested arrays ([`GgufArray::Array`]) each carry their own element type.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    /// Elements of type u8.
    U8(Vec<u8>),
    /// Elements of type i8.
    I8(Vec<i8>),
    /// Elements of type u16.
    U16(Vec<u16>),
    /// Elements of type i16.
    I16(Vec<i16>),
    /// Elements of type u32.
    U32(Vec<u32>),
    /// Elements of type i32.
    I32(Vec<i32>),
    /// Elements of type f32.
    F32(Vec<f32>),
    /// Elements of type bool.
    Bool(Vec<bool>),
    /// Elements of type string.
    String(Vec<String>),
    /// Elements that are arrays themselves.
    Array(Vec<GgufArray>),
    /// Elements of type u64.
    U64(Vec<u64>),
    /// Elements of type i64.
    I64(Vec<i64>),
    /// Elements of type f64.
    F64(Vec<f64>),
}

/// Generates a typed slice accessor of [`GgufArray`].
macro_rules! array_accessor {
    ($(#[$doc:meta])* $fn_name:ident, $variant:ident, $t:ty) => {
        $(#[$doc])*
        pub fn $fn_name(&self) -> Option<&[$t]> {
            match self {
                GgufArray::$variant(v) => Some(v),
                _ => None,
            }
        }
    };
}

impl GgufArray {
    /// The element type written in the array header.
    pub fn elem_type(&self) -> GgufValueType {
        match self {
            GgufArray::U8(_) => GgufValueType::U8,
            GgufArray::I8(_) => GgufValueType::I8,
            GgufArray::U16(_) => GgufValueType::U16,
            GgufArray::I16(_) => GgufValueType::I16,
            GgufArray::U32(_) => GgufValueType::U32,
            GgufArray::I32(_) => GgufValueType::I32,
            GgufArray::F32(_) => GgufValueType::F32,
            GgufArray::Bool(_) => GgufValueType::Bool,
            GgufArray::String(_) => GgufValueType::String,
            GgufArray::Array(_) => GgufValueType::Array,
            GgufArray::U64(_) => GgufValueType::U64,
            GgufArray::I64(_) => GgufValueType::I64,
            GgufArray::F64(_) => GgufValueType::F64,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `index` as a [`GgufValue`] (strings and nested arrays are cloned), or `None`
    /// past the end.
    pub fn get(&self, index: usize) -> Option<GgufValue> {
        Some(match self {
            GgufArray::U8(v) => GgufValue::U8(*v.get(index)?),
            GgufArray::I8(v) => GgufValue::I8(*v.get(index)?),
            GgufArray::U16(v) => GgufValue::U16(*v.get(index)?),
            GgufArray::I16(v) => GgufValue::I16(*v.get(index)?),
            GgufArray::U32(v) => GgufValue::U32(*v.get(index)?),
            GgufArray::I32(v) => GgufValue::I32(*v.get(index)?),
            GgufArray::F32(v) => GgufValue::F32(*v.get(index)?),
            GgufArray::Bool(v) => GgufValue::Bool(*v.get(index)?),
            GgufArray::String(v) => GgufValue::String(v.get(index)?.clone()),
            GgufArray::Array(v) => GgufValue::Array(v.get(index)?.clone()),
            GgufArray::U64(v) => GgufValue::U64(*v.get(index)?),
            GgufArray::I64(v) => GgufValue::I64(*v.get(index)?),
            GgufArray::F64(v) => GgufValue::F64(*v.get(index)?),
        })
    }

    array_accessor!(
        /// The elements if they are u8.
        as_u8s, U8, u8
    );
    array_accessor!(
        /// The elements if they are i8.
        as_i8s, I8, i8
    );
    array_accessor!(
        /// The elements if they are u16.
        as_u16s, U16, u16
    );
    array_accessor!(
        /// The elements if they are i16.
        as_i16s, I16, i16
    );
    array_accessor!(
        /// The elements if they are u32.
        as_u32s, U32, u32
    );
    array_accessor!(
        /// The elements if they are i32 (`tokenizer.ggml.token_type`, for one).
        as_i32s, I32, i32
    );
    array_accessor!(
        /// The elements if they are f32 (`tokenizer.ggml.scores`, for one).
        as_f32s, F32, f32
    );
    array_accessor!(
        /// The elements if they are bools.
        as_bools, Bool, bool
    );
    array_accessor!(
        /// The elements if they are strings (`tokenizer.ggml.tokens`, for one).
        as_strings, String, String
    );
    array_accessor!(
        /// The elements if they are arrays.
        as_arrays, Array, GgufArray
    );
    array_accessor!(
        /// The elements if they are u64.
        as_u64s, U64, u64
    );
    array_accessor!(
        /// The elements if they are i64.
        as_i64s, I64, i64
    );
    array_accessor!(
        /// The elements if they are f64.
        as_f64s, F64, f64
    );
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Unsigned 8-bit integer.
    U8(u8),
    /// Signed 8-bit integer.
    I8(i8),
    /// Unsigned 16-bit integer.
    U16(u16),
    /// Signed 16-bit integer.
    I16(i16),
    /// Unsigned 32-bit integer.
    U32(u32),
    /// Signed 32-bit integer.
    I32(i32),
    /// IEEE 754 binary32.
    F32(f32),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Typed array.
    Array(GgufArray),
    /// Unsigned 64-bit integer.
    U64(u64),
    /// Signed 64-bit integer.
    I64(i64),
    /// IEEE 754 binary64.
    F64(f64),
}

impl GgufValue {
    /// The value's type.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// The value as a u64 if it is an integer of any width and sign that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an i64 if it is an integer of any width and sign that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a u32 if it is a non-negative integer that fits.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_u64().and_then(|v| u32::try_from(v).ok())
    }

    /// The value as a usize if it is a non-negative integer that fits.
    pub fn as_usize(&self) -> Option<usize> {
        self.as_u64().and_then(|v| usize::try_from(v).ok())
    }

    /// The value as an f64 if it is a float or an integer (integers beyond 2^53 round).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self
                .as_i64()
                .map(|v| v as f64)
                .or_else(|| self.as_u64().map(|v| v as f64)),
        }
    }

    /// The value as an f32 if it is a float or an integer (f64 and large integers round).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(v) => Some(v),
            _ => self.as_f64().map(|v| v as f32),
        }
    }

    /// The value if it is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value if it is an array.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Shows scalars as they are, strings quoted, and arrays with at most their first 8 elements.
impl fmt::Display for GgufValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufValue::U8(v) => write!(f, "{v}"),
            GgufValue::I8(v) => write!(f, "{v}"),
            GgufValue::U16(v) => write!(f, "{v}"),
            GgufValue::I16(v) => write!(f, "{v}"),
            GgufValue::U32(v) => write!(f, "{v}"),
            GgufValue::I32(v) => write!(f, "{v}"),
            GgufValue::F32(v) => write!(f, "{v}"),
            GgufValue::Bool(v) => write!(f, "{v}"),
            GgufValue::String(v) => write!(f, "{v:?}"),
            GgufValue::U64(v) => write!(f, "{v}"),
            GgufValue::I64(v) => write!(f, "{v}"),
            GgufValue::F64(v) => write!(f, "{v}"),
            GgufValue::Array(a) => {
                const SHOWN: usize = 8;
                f.write_str("[")?;
                for i in 0..a.len().min(SHOWN) {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    if let Some(v) = a.get(i) {
                        write!(f, "{v}")?;
                    }
                }
                if a.len() > SHOWN {
                    write!(f, ", ... ({} {} elements)", a.len(), a.elem_type())?;
                }
                f.write_str("]")
            }
        }
    }
}

/// The tensor data types of ggml that a GGUF tensor info may name.
///
/// Variant names follow ggml's spelling (`Q4_0`, `TQ2_0`, `I2_S`).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// IEEE 754 binary32 (id 0).
    F32,
    /// IEEE 754 binary16 (id 1).
    F16,
    /// 4-bit blocks of 32 with an f16 scale (id 2).
    Q4_0,
    /// 4-bit blocks of 32 with f16 scale and minimum (id 3).
    Q4_1,
    /// 5-bit blocks of 32 with an f16 scale (id 6).
    Q5_0,
    /// 5-bit blocks of 32 with f16 scale and minimum (id 7).
    Q5_1,
    /// 8-bit blocks of 32 with an f16 scale (id 8).
    Q8_0,
    /// 8-bit blocks of 32 with f16 scale and sum (id 9).
    Q8_1,
    /// 2-bit k-quant super-blocks of 256 (id 10).
    Q2_K,
    /// 3-bit k-quant super-blocks of 256 (id 11).
    Q3_K,
    /// 4-bit k-quant super-blocks of 256 (id 12).
    Q4_K,
    /// 5-bit k-quant super-blocks of 256 (id 13).
    Q5_K,
    /// 6-bit k-quant super-blocks of 256 (id 14).
    Q6_K,
    /// 8-bit k-quant super-blocks of 256 (id 15).
    Q8_K,
    /// Signed 8-bit integers (id 24).
    I8,
    /// Signed 16-bit integers (id 25).
    I16,
    /// Signed 32-bit integers (id 26).
    I32,
    /// Signed 64-bit integers (id 27).
    I64,
    /// IEEE 754 binary64 (id 28).
    F64,
    /// bfloat16 (id 30).
    BF16,
    /// Ternary, 1.6875 bits per weight: blocks of 256 in 54 bytes, `qs[48] qh[4] d(f16)`
    /// (id 34).
    TQ1_0,
    /// Ternary, 2.0625 bits per weight: blocks of 256 in 66 bytes, `qs[64] d(f16)` (id 35).
    TQ2_0,
    /// bitnet.cpp's ternary 2-bit codes (id 36, a fork-only id that collides with a retired
    /// upstream one): `n/4` bytes of codes followed by [`I2S_TRAILER_BYTES`] bytes holding
    /// one f32 scale for the whole tensor. The size implied by the tensor info covers the
    /// codes only; see [`GgufFile::i2s_trailer`].
    I2_S,
}

impl GgmlType {
    /// Every type this reader knows, in id order.
    pub const ALL: [GgmlType; 23] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::I2_S,
    ];

    /// The id written in tensor infos.
    pub const fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::I8 => 24,
            GgmlType::I16 => 25,
            GgmlType::I32 => 26,
            GgmlType::I64 => 27,
            GgmlType::F64 => 28,
            GgmlType::BF16 => 30,
            GgmlType::TQ1_0 => 34,
            GgmlType::TQ2_0 => 35,
            GgmlType::I2_S => 36,
        }
    }

    /// The type with id `id`, or `None` for ids this reader does not know.
    pub const fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            15 => GgmlType::Q8_K,
            24 => GgmlType::I8,
            25 => GgmlType::I16,
            26 => GgmlType::I32,
            27 => GgmlType::I64,
            28 => GgmlType::F64,
            30 => GgmlType::BF16,
            34 => GgmlType::TQ1_0,
            35 => GgmlType::TQ2_0,
            36 => GgmlType::I2_S,
            _ => return None,
        })
    }

    /// ggml's name for the type (`F32`, `TQ2_0`, `I2_S`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::Q8_K => "Q8_K",
            GgmlType::I8 => "I8",
            GgmlType::I16 => "I16",
            GgmlType::I32 => "I32",
            GgmlType::I64 => "I64",
            GgmlType::F64 => "F64",
            GgmlType::BF16 => "BF16",
            GgmlType::TQ1_0 => "TQ1_0",
            GgmlType::TQ2_0 => "TQ2_0",
            GgmlType::I2_S => "I2_S",
        }
    }

    /// Elements per block; `ne0` of a tensor must be a multiple of it.
    ///
    /// For [`GgmlType::I2_S`] this is 4 (one byte of codes): the size arithmetic of the tensor
    /// info. Its packing unit (128 elements on x86, 64 on ARM builds of bitnet.cpp) is the
    /// loader's concern.
    pub const fn block_elems(self) -> u64 {
        match self {
            GgmlType::F32
            | GgmlType::F16
            | GgmlType::I8
            | GgmlType::I16
            | GgmlType::I32
            | GgmlType::I64
            | GgmlType::F64
            | GgmlType::BF16 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1 => 32,
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::Q8_K
            | GgmlType::TQ1_0
            | GgmlType::TQ2_0 => 256,
            GgmlType::I2_S => 4,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> u64 {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q8_1 => 36,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
            GgmlType::Q8_K => 292,
            GgmlType::I8 => 1,
            GgmlType::I16 => 2,
            GgmlType::I32 => 4,
            GgmlType::I64 => 8,
            GgmlType::F64 => 8,
            GgmlType::BF16 => 2,
            GgmlType::TQ1_0 => 54,
            GgmlType::TQ2_0 => 66,
            GgmlType::I2_S => 1,
        }
    }

    /// Whether the type packs several elements per block (everything but the plain
    /// integer and float types).
    pub const fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Whether [`I2S_TRAILER_BYTES`] bytes holding a scale follow the tensor's data
    /// (only [`GgmlType::I2_S`]).
    pub const fn has_trailing_scale(self) -> bool {
        matches!(self, GgmlType::I2_S)
    }

    /// The bytes of a tensor of `n_elements` elements, as implied by the tensor info (for
    /// `I2_S`, without the trailer); `None` if `n_elements` is not a whole number of blocks
    /// or the size overflows.
    pub const fn data_size(self, n_elements: u64) -> Option<u64> {
        let b = self.block_elems();
        if !n_elements.is_multiple_of(b) {
            return None;
        }
        (n_elements / b).checked_mul(self.block_bytes())
    }

    /// The [`DType`] with the same element encoding, for the plain element types that have
    /// one (`F32`, `F16`, `BF16`, `I8`).
    pub const fn dtype(self) -> Option<DType> {
        match self {
            GgmlType::F32 => Some(DType::F32),
            GgmlType::F16 => Some(DType::F16),
            GgmlType::BF16 => Some(DType::BF16),
            GgmlType::I8 => Some(DType::I8),
            _ => None,
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's description, validated against the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The tensor's name (`token_embd.weight`, `blk.0.attn_q.weight`, ...).
    pub name: String,
    /// The dimensions in ggml order: `dims[0]` (ne0) is the contiguous one. A
    /// `[in, out]` weight has `dims == [in, out]`. Between 1 and [`GGUF_MAX_DIMS`] entries,
    /// none zero.
    pub dims: Vec<u64>,
    /// The element type.
    pub ggml_type: GgmlType,
    /// The offset of the data relative to the start of the data section, as written in the
    /// file (a multiple of the alignment).
    pub offset: u64,
    /// The absolute byte range of the data in the file, checked to lie inside it. For `I2_S`
    /// it covers the codes only, not the trailer.
    pub data_range: Range<usize>,
}

impl GgufTensorInfo {
    /// The number of elements (the product of the dimensions).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// The number of bytes of data (the length of [`GgufTensorInfo::data_range`]).
    pub fn n_bytes(&self) -> usize {
        self.data_range.len()
    }

    /// The dimensions in ggml order as usize, or `None` if one does not fit.
    pub fn dims_usize(&self) -> Option<Vec<usize>> {
        self.dims.iter().map(|&d| usize::try_from(d).ok()).collect()
    }
}

/// A parsed and validated GGUF file whose tensor data stays in the memory map.
pub struct GgufFile {
    file: Arc<MappedFile>,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.file.path())
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps `path` and parses and validates it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::parse(MappedFile::open(path)?)
    }

    /// Parses and validates an already mapped file.
    pub fn parse(file: Arc<MappedFile>) -> Result<Self> {
        let parsed =
            parse_bytes(file.bytes()).map_err(|reason| Error::format(file.path(), reason))?;
        Ok(GgufFile {
            file,
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            metadata: parsed.metadata,
            metadata_index: parsed.metadata_index,
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
        })
    }

    /// The mapped file.
    pub fn file(&self) -> &Arc<MappedFile> {
        &self.file
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The absolute offset of the data section: the end of the tensor infos rounded up to the
    /// alignment. (With no tensors it may lie past the end of the file.)
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata entries in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        let &i = self.metadata_index.get(key)?;
        self.metadata.get(i).map(|(_, v)| v)
    }

    /// The metadata value under `key`, or a format error saying it is missing.
    pub fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key)
            .ok_or_else(|| Error::format(self.path(), format!("metadata key `{key}` is missing")))
    }

    /// The non-negative integer under `key`, or a format error saying it is missing or of
    /// another type.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, v, "a non-negative integer"))
    }

    /// The number under `key` as f32, or a format error saying it is missing or of another
    /// type.
    pub fn require_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        v.as_f32()
            .ok_or_else(|| self.wrong_type(key, v, "a number"))
    }

    /// The string under `key`, or a format error saying it is missing or of another type.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, v, "a string"))
    }

    fn wrong_type(&self, key: &str, v: &GgufValue, expected: &str) -> Error {
        Error::format(
            self.path(),
            format!(
                "metadata key `{key}` holds a {} ({v}), expected {expected}",
                v.value_type()
            ),
        )
    }

    /// The model architecture (`general.architecture`), if present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.get(GGUF_ARCHITECTURE_KEY)?.as_str()
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        let &i = self.tensor_index.get(name)?;
        self.tensors.get(i)
    }

    /// The tensor's data, borrowed from the map (for `I2_S`, the codes only).
    ///
    /// `info` should come from this file; for an info whose range lies outside this file the
    /// slice is empty.
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> &[u8] {
        self.file
            .bytes()
            .get(info.data_range.clone())
            .unwrap_or_default()
    }

    /// The tensor's data as [`Storage`] borrowing the map (no copy).
    pub fn tensor_storage(&self, info: &GgufTensorInfo) -> Result<Storage> {
        Storage::mapped(self.file.clone(), info.data_range.clone())
    }

    /// The [`I2S_TRAILER_BYTES`] bytes after an `I2_S` tensor's codes, which hold its f32
    /// scale; a format error if the tensor is not `I2_S` or the trailer runs past the end of
    /// the file.
    pub fn i2s_trailer(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        if !info.ggml_type.has_trailing_scale() {
            return Err(Error::format(
                self.path(),
                format!(
                    "tensor `{}` is {}, not I2_S: it has no trailing scale",
                    info.name, info.ggml_type
                ),
            ));
        }
        let start = info.data_range.end;
        let end = start.checked_add(I2S_TRAILER_BYTES);
        end.and_then(|end| self.file.bytes().get(start..end))
            .ok_or_else(|| {
                Error::format(
                    self.path(),
                    format!(
                        "I2_S tensor `{}`: its {I2S_TRAILER_BYTES}-byte scale trailer at byte \
                         {start} runs past the end of the file ({} bytes)",
                        info.name,
                        self.file.bytes().len()
                    ),
                )
            })
    }

    /// The f32 scale of an `I2_S` tensor: the first 4 bytes of [`GgufFile::i2s_trailer`].
    pub fn i2s_scale(&self, info: &GgufTensorInfo) -> Result<f32> {
        let trailer = self.i2s_trailer(info)?;
        Ok(f32::from_le_bytes(le_array(trailer)))
    }
}

/// Everything [`parse_bytes`] finds; [`GgufFile`] adds the file.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) version: u32,
    pub(crate) alignment: u64,
    pub(crate) data_offset: u64,
    pub(crate) metadata: Vec<(String, GgufValue)>,
    pub(crate) metadata_index: HashMap<String, usize>,
    pub(crate) tensors: Vec<GgufTensorInfo>,
    pub(crate) tensor_index: HashMap<String, usize>,
}

/// Internal parse result: the reason is wrapped into [`Error::format`] with the path.
type PResult<T> = std::result::Result<T, String>;

/// Copies the first `N` bytes of `bytes` (zero-filled if shorter; callers pass exact slices).
fn le_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    for (d, s) in a.iter_mut().zip(bytes) {
        *d = *s;
    }
    a
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let slice = self
            .pos
            .checked_add(n)
            .and_then(|end| self.bytes.get(self.pos..end))
            .ok_or_else(|| {
                format!(
                    "unexpected end of file at byte {}: {n} bytes needed, {} left",
                    self.pos,
                    self.remaining()
                )
            })?;
        self.pos += n;
        Ok(slice)
    }

    fn fixed<const N: usize>(&mut self) -> PResult<[u8; N]> {
        self.take(N).map(le_array)
    }

    fn u32(&mut self) -> PResult<u32> {
        self.fixed().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> PResult<u64> {
        self.fixed().map(u64::from_le_bytes)
    }

    /// Reads a u64 count of items of at least `min_size` bytes each and checks that so many
    /// could fit in the rest of the file, so the caller may allocate for them.
    fn count(&mut self, min_size: usize, what: &str) -> PResult<usize> {
        let at = self.pos;
        let n = self.u64()?;
        let max = self.remaining() / min_size.max(1);
        match usize::try_from(n) {
            Ok(n) if n <= max => Ok(n),
            _ => Err(format!(
                "{what} {n} at byte {at} cannot fit in the {} bytes left in the file",
                self.remaining()
            )),
        }
    }

    fn string(&mut self) -> PResult<String> {
        let at = self.pos;
        let len = self.count(1, "string length")?;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| format!("string at byte {at} is not valid UTF-8: {e}"))
    }

    fn value_type(&mut self) -> PResult<GgufValueType> {
        let at = self.pos;
        let id = self.u32()?;
        GgufValueType::from_id(id)
            .ok_or_else(|| format!("unknown value type id {id} at byte {at} (known: 0 to 12)"))
    }

    fn bool(&mut self) -> PResult<bool> {
        let at = self.pos;
        match self.fixed::<1>()? {
            [0] => Ok(false),
            [1] => Ok(true),
            [b] => Err(format!("bool at byte {at} is {b}, expected 0 or 1")),
        }
    }

    /// Reads a value of type `ty`; `depth` is the number of arrays enclosing it.
    fn value(&mut self, ty: GgufValueType, depth: usize) -> PResult<GgufValue> {
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(u8::from_le_bytes(self.fixed()?)),
            GgufValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.fixed()?)),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.fixed()?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.fixed()?)),
            GgufValueType::U32 => GgufValue::U32(u32::from_le_bytes(self.fixed()?)),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.fixed()?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.fixed()?)),
            GgufValueType::Bool => GgufValue::Bool(self.bool()?),
            GgufValueType::String => GgufValue::String(self.string()?),
            GgufValueType::Array => GgufValue::Array(self.array(depth + 1)?),
            GgufValueType::U64 => GgufValue::U64(u64::from_le_bytes(self.fixed()?)),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.fixed()?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.fixed()?)),
        })
    }

    /// Reads an array at nesting depth `depth` (1 for a top-level array).
    fn array(&mut self, depth: usize) -> PResult<GgufArray> {
        if depth > GGUF_MAX_ARRAY_DEPTH {
            return Err(format!(
                "arrays nested more than {GGUF_MAX_ARRAY_DEPTH} deep at byte {}",
                self.pos
            ));
        }
        let elem = self.value_type()?;
        let n = self.count(
            elem.min_encoded_size(),
            &format!("array of {elem}: element count"),
        )?;

        /// Reads `n` fixed-size little-endian elements in one bounds-checked slice.
        macro_rules! fixed_elems {
            ($variant:ident, $t:ty) => {{
                const SIZE: usize = std::mem::size_of::<$t>();
                let raw = self.take(n.saturating_mul(SIZE))?;
                GgufArray::$variant(
                    raw.chunks_exact(SIZE)
                        .map(|c| <$t>::from_le_bytes(le_array(c)))
                        .collect(),
                )
            }};
        }

        Ok(match elem {
            GgufValueType::U8 => GgufArray::U8(self.take(n)?.to_vec()),
            GgufValueType::I8 => fixed_elems!(I8, i8),
            GgufValueType::U16 => fixed_elems!(U16, u16),
            GgufValueType::I16 => fixed_elems!(I16, i16),
            GgufValueType::U32 => fixed_elems!(U32, u32),
            GgufValueType::I32 => fixed_elems!(I32, i32),
            GgufValueType::F32 => fixed_elems!(F32, f32),
            GgufValueType::U64 => fixed_elems!(U64, u64),
            GgufValueType::I64 => fixed_elems!(I64, i64),
            GgufValueType::F64 => fixed_elems!(F64, f64),
            GgufValueType::Bool => {
                let raw = self.take(n)?;
                let mut v = Vec::with_capacity(n);
                for (i, &b) in raw.iter().enumerate() {
                    match b {
                        0 => v.push(false),
                        1 => v.push(true),
                        _ => return Err(format!("bool element {i} is {b}, expected 0 or 1")),
                    }
                }
                GgufArray::Bool(v)
            }
            GgufValueType::String => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(
                        self.string()
                            .map_err(|e| format!("string element {i}: {e}"))?,
                    );
                }
                GgufArray::String(v)
            }
            GgufValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(
                        self.array(depth + 1)
                            .map_err(|e| format!("array element {i}: {e}"))?,
                    );
                }
                GgufArray::Array(v)
            }
        })
    }
}

/// A tensor info as read, before its byte range is known.
struct RawTensorInfo {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    offset: u64,
}

fn read_tensor_info(r: &mut Reader<'_>, index: usize) -> PResult<RawTensorInfo> {
    let name = r
        .string()
        .map_err(|e| format!("tensor info #{index}: name: {e}"))?;
    let in_tensor = |e: String| format!("tensor `{name}`: {e}");
    let n_dims = r.u32().map_err(in_tensor)?;
    if n_dims == 0 || n_dims as usize > GGUF_MAX_DIMS {
        return Err(in_tensor(format!(
            "{n_dims} dimensions, expected 1 to {GGUF_MAX_DIMS}"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(r.u64().map_err(in_tensor)?);
    }
    let type_at = r.pos;
    let type_id = r.u32().map_err(in_tensor)?;
    let ggml_type = GgmlType::from_id(type_id)
        .ok_or_else(|| in_tensor(format!("unknown ggml type id {type_id} at byte {type_at}")))?;
    let offset = r.u64().map_err(in_tensor)?;
    Ok(RawTensorInfo {
        name,
        dims,
        ggml_type,
        offset,
    })
}

/// Checks a tensor's shape, type and offset and works out its absolute byte range.
fn tensor_range(
    t: &RawTensorInfo,
    alignment: u64,
    data_offset: u64,
    file_len: usize,
) -> PResult<Range<usize>> {
    let in_tensor = |e: String| format!("tensor `{}`: {e}", t.name);
    let mut n_elements = 1u64;
    for (i, &d) in t.dims.iter().enumerate() {
        if d == 0 {
            return Err(in_tensor(format!(
                "dimension {i} is zero (dims {:?})",
                t.dims
            )));
        }
        if d > i64::MAX as u64 {
            return Err(in_tensor(format!("dimension {i} is {d}, too large")));
        }
        n_elements = n_elements
            .checked_mul(d)
            .ok_or_else(|| in_tensor(format!("element count of dims {:?} overflows", t.dims)))?;
    }
    let block = t.ggml_type.block_elems();
    let ne0 = t.dims.first().copied().unwrap_or(1);
    if ne0 % block != 0 {
        return Err(in_tensor(format!(
            "first dimension {ne0} is not a multiple of the {} block size {block}",
            t.ggml_type
        )));
    }
    let n_bytes = t.ggml_type.data_size(n_elements).ok_or_else(|| {
        in_tensor(format!(
            "byte size of {n_elements} {} elements overflows",
            t.ggml_type
        ))
    })?;
    if !t.offset.is_multiple_of(alignment) {
        return Err(in_tensor(format!(
            "data offset {} is not a multiple of the alignment {alignment}",
            t.offset
        )));
    }
    let outside = || {
        in_tensor(format!(
            "data at offset {} ({n_bytes} bytes) from the data section at byte {data_offset} \
             lies outside the file ({file_len} bytes)",
            t.offset
        ))
    };
    let start = data_offset.checked_add(t.offset).ok_or_else(outside)?;
    let end = start.checked_add(n_bytes).ok_or_else(outside)?;
    if end > file_len as u64 {
        return Err(outside());
    }
    // Both fit: end <= file_len, a usize.
    let start = usize::try_from(start).map_err(|_| outside())?;
    let end = usize::try_from(end).map_err(|_| outside())?;
    Ok(start..end)
}

/// Parses and validates a whole GGUF file held in `bytes` with exactly the checks of
/// [`GgufFile::parse`] (the same code path, minus the memory map) and returns its metadata
/// entries and tensor infos in file order, or the reason it is invalid. Every returned
/// [`GgufTensorInfo::data_range`] lies inside `bytes`. Meant for fuzzing
/// (`fuzz/fuzz_targets/gguf_reader.rs`) and tests, where inputs are byte slices rather than
/// files.
#[allow(clippy::type_complexity)]
pub fn parse_gguf_bytes(
    bytes: &[u8],
) -> std::result::Result<(Vec<(String, GgufValue)>, Vec<GgufTensorInfo>), String> {
    parse_bytes(bytes).map(|p| (p.metadata, p.tensors))
}

/// Parses and validates a whole GGUF file held in `bytes`; the error is the reason only.
pub(crate) fn parse_bytes(bytes: &[u8]) -> PResult<Parsed> {
    let mut r = Reader { bytes, pos: 0 };

    // Header.
    let magic: [u8; 4] = r
        .fixed()
        .map_err(|_| format!("file is {} bytes, too short for a GGUF header", bytes.len()))?;
    if magic != GGUF_MAGIC {
        return Err(format!(
            "not a GGUF file: magic is {magic:02x?}, expected {GGUF_MAGIC:02x?} (\"GGUF\")"
        ));
    }
    let version = r.u32().map_err(|e| format!("header: version: {e}"))?;
    if !GGUF_SUPPORTED_VERSIONS.contains(&version) {
        let hint = if GGUF_SUPPORTED_VERSIONS.contains(&version.swap_bytes()) {
            " (this looks like a big-endian GGUF file, which is not supported)"
        } else if version == 1 {
            " (version 1 used 32-bit counts and is obsolete)"
        } else {
            ""
        };
        return Err(format!(
            "unsupported GGUF version {version}, expected 2 or 3{hint}"
        ));
    }
    let tensor_count = r
        .count(TENSOR_INFO_MIN_BYTES, "tensor count")
        .map_err(|e| format!("header: {e}"))?;
    let kv_count = r
        .count(KV_MIN_BYTES, "metadata entry count")
        .map_err(|e| format!("header: {e}"))?;
    if tensor_count
        .checked_mul(TENSOR_INFO_MIN_BYTES)
        .zip(kv_count.checked_mul(KV_MIN_BYTES))
        .and_then(|(a, b)| a.checked_add(b))
        .is_none_or(|need| need > r.remaining())
    {
        return Err(format!(
            "header: {tensor_count} tensors and {kv_count} metadata entries cannot fit in the \
             {} bytes left in the file",
            r.remaining()
        ));
    }

    // Metadata.
    let mut metadata = Vec::with_capacity(kv_count);
    let mut metadata_index = HashMap::with_capacity(kv_count);
    for i in 0..kv_count {
        let key = r
            .string()
            .map_err(|e| format!("metadata entry #{i}: key: {e}"))?;
        if metadata_index.contains_key(&key) {
            return Err(format!("duplicate metadata key `{key}` (entry #{i})"));
        }
        let value = r
            .value_type()
            .and_then(|ty| r.value(ty, 0))
            .map_err(|e| format!("metadata key `{key}`: {e}"))?;
        metadata_index.insert(key.clone(), metadata.len());
        metadata.push((key, value));
    }

    let alignment = match metadata_index
        .get(GGUF_ALIGNMENT_KEY)
        .and_then(|&i| metadata.get(i))
    {
        None => GGUF_DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            Some(a) => {
                return Err(format!(
                    "`{GGUF_ALIGNMENT_KEY}` is {a}, expected a non-zero power of two"
                ))
            }
            None => {
                return Err(format!(
                    "`{GGUF_ALIGNMENT_KEY}` holds a {} ({v}), expected an unsigned integer",
                    v.value_type()
                ))
            }
        },
    };

    // Tensor infos.
    if tensor_count > r.remaining() / TENSOR_INFO_MIN_BYTES {
        return Err(format!(
            "{tensor_count} tensor infos cannot fit in the {} bytes left after the metadata",
            r.remaining()
        ));
    }
    let mut raw = Vec::with_capacity(tensor_count);
    let mut tensor_index = HashMap::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let t = read_tensor_info(&mut r, i)?;
        if tensor_index.insert(t.name.clone(), i).is_some() {
            return Err(format!(
                "duplicate tensor name `{}` (tensor info #{i})",
                t.name
            ));
        }
        raw.push(t);
    }

    // Data section.
    let infos_end = r.pos as u64;
    let data_offset = infos_end
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| format!("data section offset overflows with alignment {alignment}"))?;
    let mut tensors = Vec::with_capacity(raw.len());
    for t in raw {
        let data_range = tensor_range(&t, alignment, data_offset, bytes.len())?;
        tensors.push(GgufTensorInfo {
            name: t.name,
            dims: t.dims,
            ggml_type: t.ggml_type,
            offset: t.offset,
            data_range,
        });
    }

    // No two tensors may share bytes.
    let mut order: Vec<&GgufTensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| (t.data_range.start, t.data_range.end));
    for pair in order.windows(2) {
        if let [a, b] = pair {
            if a.data_range.end > b.data_range.start {
                return Err(format!(
                    "tensors `{}` (bytes {}..{}) and `{}` (bytes {}..{}) overlap",
                    a.name,
                    a.data_range.start,
                    a.data_range.end,
                    b.name,
                    b.data_range.start,
                    b.data_range.end
                ));
            }
        }
    }

    Ok(Parsed {
        version,
        alignment,
        data_offset,
        metadata,
        metadata_index,
        tensors,
        tensor_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // ---- a tiny test-only encoder -------------------------------------------------------

    fn u32b(v: u32) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    fn u64b(v: u64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    /// A GGUF string: u64 length, bytes.
    fn sb(s: impl AsRef<[u8]>) -> Vec<u8> {
        let s = s.as_ref();
        let mut v = u64b(s.len() as u64);
        v.extend_from_slice(s);
        v
    }

    /// An array payload: element type id, count, encoded elements.
    fn arr(elem: u32, count: u64, elems: &[u8]) -> Vec<u8> {
        [u32b(elem), u64b(count), elems.to_vec()].concat()
    }

    /// One metadata entry: key, value type id, encoded value.
    fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
        [sb(key), u32b(ty), value.to_vec()].concat()
    }

    /// One tensor info.
    fn ti(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
        let mut v = [sb(name), u32b(dims.len() as u32)].concat();
        for &d in dims {
            v.extend(u64b(d));
        }
        v.extend(u32b(ty));
        v.extend(u64b(offset));
        v
    }

    /// A GGUF file under construction; counts default to the number of entries.
    #[derive(Clone)]
    struct Builder {
        magic: [u8; 4],
        version: u32,
        tensor_count: Option<u64>,
        kv_count: Option<u64>,
        kvs: Vec<Vec<u8>>,
        infos: Vec<Vec<u8>>,
        /// Padding the encoder applies before the data section.
        pad_to: usize,
        data_len: usize,
    }

    /// Where the sections of a built file end.
    struct Sections {
        header_end: usize,
        kvs_end: usize,
        infos_end: usize,
        data_start: usize,
    }

    impl Builder {
        fn empty() -> Self {
            Builder {
                magic: GGUF_MAGIC,
                version: 3,
                tensor_count: None,
                kv_count: None,
                kvs: Vec::new(),
                infos: Vec::new(),
                pad_to: 32,
                data_len: 0,
            }
        }

        fn kv(mut self, entry: Vec<u8>) -> Self {
            self.kvs.push(entry);
            self
        }

        fn info(mut self, entry: Vec<u8>) -> Self {
            self.infos.push(entry);
            self
        }

        fn build_with_sections(&self) -> (Vec<u8>, Sections) {
            let mut b = self.magic.to_vec();
            b.extend(u32b(self.version));
            b.extend(u64b(self.tensor_count.unwrap_or(self.infos.len() as u64)));
            b.extend(u64b(self.kv_count.unwrap_or(self.kvs.len() as u64)));
            let header_end = b.len();
            for e in &self.kvs {
                b.extend_from_slice(e);
            }
            let kvs_end = b.len();
            for e in &self.infos {
                b.extend_from_slice(e);
            }
            let infos_end = b.len();
            b.resize(infos_end.next_multiple_of(self.pad_to), 0);
            let data_start = b.len();
            // Recognisable data: byte i of the data section is i mod 251.
            b.extend((0..self.data_len).map(|i| (i % 251) as u8));
            (
                b,
                Sections {
                    header_end,
                    kvs_end,
                    infos_end,
                    data_start,
                },
            )
        }

        fn build(&self) -> Vec<u8> {
            self.build_with_sections().0
        }
    }

    /// Metadata of every kind and three tensors: `a` F32 [4, 2] at 0 (32 bytes), `b` TQ2_0
    /// [256, 2] at 32 (132 bytes), `c` F16 [3] at 192 (6 bytes).
    fn valid() -> Builder {
        let nested = arr(
            9,
            2,
            &[arr(4, 2, &[u32b(1), u32b(2)].concat()), arr(8, 1, &sb("x"))].concat(),
        );
        Builder::empty()
            .kv(kv("general.architecture", 8, &sb("bitnet")))
            .kv(kv("u8", 0, &[200]))
            .kv(kv("i8", 1, &[0xFE]))
            .kv(kv("u16", 2, &[0x34, 0x12]))
            .kv(kv("i16", 3, &(-300i16).to_le_bytes()))
            .kv(kv("u32", 4, &u32b(70000)))
            .kv(kv("i32", 5, &(-5i32).to_le_bytes()))
            .kv(kv("f32", 6, &1.5f32.to_le_bytes()))
            .kv(kv("bool", 7, &[1]))
            .kv(kv("u64", 10, &u64b(1 << 40)))
            .kv(kv("i64", 11, &(-7i64).to_le_bytes()))
            .kv(kv("f64", 12, &0.25f64.to_le_bytes()))
            .kv(kv("strings", 9, &arr(8, 2, &[sb("a"), sb("é")].concat())))
            .kv(kv(
                "f32s",
                9,
                &arr(6, 2, &[1.0f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat()),
            ))
            .kv(kv("bools", 9, &arr(7, 3, &[0, 1, 0])))
            .kv(kv("empty", 9, &arr(10, 0, &[])))
            .kv(kv("nested", 9, &nested))
            .info(ti("a", &[4, 2], 0, 0))
            .info(ti("b", &[256, 2], 35, 32))
            .info(ti("c", &[3], 1, 192))
            .with_data(198)
    }

    impl Builder {
        fn with_data(mut self, len: usize) -> Self {
            self.data_len = len;
            self
        }
    }

    fn parse_err(bytes: &[u8]) -> String {
        match parse_bytes(bytes) {
            Ok(_) => panic!("expected an error, parsed fine"),
            Err(e) => e,
        }
    }

    #[track_caller]
    fn assert_err_contains(bytes: &[u8], needles: &[&str]) {
        let e = parse_err(bytes);
        for n in needles {
            assert!(e.contains(n), "error {e:?} does not mention {n:?}");
        }
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../../testdata/tiny-bitnet/gguf/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Writes `bytes` to a unique temporary file and opens it through the public path.
    fn open_bytes(bytes: &[u8]) -> Result<GgufFile> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "bitnet-gguf-unit-{}-{}.gguf",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, bytes).unwrap();
        let result = GgufFile::open(&path);
        std::fs::remove_file(&path).unwrap();
        result
    }

    // ---- valid files ---------------------------------------------------------------------

    #[test]
    fn valid_file_parses_every_value_type() {
        let p = parse_bytes(&valid().build()).unwrap();
        assert_eq!(p.version, 3);
        assert_eq!(p.alignment, 32);
        let keys: Vec<&str> = p.metadata.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys.first(), Some(&"general.architecture"));
        assert_eq!(keys.last(), Some(&"nested"));
        let get = |k: &str| &p.metadata[p.metadata_index[k]].1;
        assert_eq!(get("general.architecture").as_str(), Some("bitnet"));
        assert_eq!(get("u8"), &GgufValue::U8(200));
        assert_eq!(get("i8"), &GgufValue::I8(-2));
        assert_eq!(get("u16"), &GgufValue::U16(0x1234));
        assert_eq!(get("i16"), &GgufValue::I16(-300));
        assert_eq!(get("u32"), &GgufValue::U32(70000));
        assert_eq!(get("i32"), &GgufValue::I32(-5));
        assert_eq!(get("f32"), &GgufValue::F32(1.5));
        assert_eq!(get("bool"), &GgufValue::Bool(true));
        assert_eq!(get("u64"), &GgufValue::U64(1 << 40));
        assert_eq!(get("i64"), &GgufValue::I64(-7));
        assert_eq!(get("f64"), &GgufValue::F64(0.25));
        let strings = get("strings").as_array().unwrap();
        assert_eq!(strings.as_strings().unwrap(), ["a", "é"]);
        assert_eq!(strings.elem_type(), GgufValueType::String);
        assert_eq!(
            get("f32s").as_array().and_then(GgufArray::as_f32s),
            Some(&[1.0f32, 2.0][..])
        );
        assert_eq!(
            get("bools").as_array().and_then(GgufArray::as_bools),
            Some(&[false, true, false][..])
        );
        let empty = get("empty").as_array().unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.elem_type(), GgufValueType::U64);
        let nested = get("nested").as_array().unwrap().as_arrays().unwrap();
        assert_eq!(nested[0], GgufArray::U32(vec![1, 2]));
        assert_eq!(nested[1], GgufArray::String(vec!["x".into()]));

        let (bytes, s) = valid().build_with_sections();
        assert_eq!(p.data_offset, s.data_start as u64);
        let names: Vec<&str> = p.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let b = &p.tensors[p.tensor_index["b"]];
        assert_eq!(b.dims, [256, 2]);
        assert_eq!(b.ggml_type, GgmlType::TQ2_0);
        assert_eq!(b.offset, 32);
        assert_eq!(b.data_range, s.data_start + 32..s.data_start + 32 + 132);
        assert_eq!(b.n_elements(), 512);
        assert_eq!(p.tensors[2].data_range.end, bytes.len());
    }

    #[test]
    fn version_2_and_custom_alignment_parse() {
        let mut b = valid();
        b.version = 2;
        assert_eq!(parse_bytes(&b.build()).unwrap().version, 2);

        let mut b = valid().kv(kv(GGUF_ALIGNMENT_KEY, 4, &u32b(64)));
        b.infos[1] = ti("b", &[256, 2], 35, 64);
        b.infos[2] = ti("c", &[3], 1, 256);
        b.pad_to = 64;
        b.data_len = 262;
        let (bytes, s) = b.build_with_sections();
        let p = parse_bytes(&bytes).unwrap();
        assert_eq!(p.alignment, 64);
        assert_eq!(p.data_offset % 64, 0);
        assert_eq!(p.data_offset, s.data_start as u64);
        assert_eq!(p.tensors[2].data_range.start, s.data_start + 256);

        // With alignment 64, `b`'s offset 32 of the plain layout is misaligned.
        let mut b = valid().kv(kv(GGUF_ALIGNMENT_KEY, 4, &u32b(64)));
        b.pad_to = 64;
        assert_err_contains(&b.build(), &["`b`", "not a multiple of the alignment 64"]);
    }

    #[test]
    fn no_tensors_no_metadata_is_valid() {
        let p = parse_bytes(&Builder::empty().build()).unwrap();
        assert!(p.tensors.is_empty() && p.metadata.is_empty());
        assert_eq!(p.alignment, GGUF_DEFAULT_ALIGNMENT);
    }

    #[test]
    fn public_api_through_mapped_file() {
        let bytes = valid().build();
        let g = open_bytes(&bytes).unwrap();
        assert_eq!(g.architecture(), Some("bitnet"));
        assert_eq!(g.version(), 3);
        assert_eq!(g.alignment(), 32);
        assert_eq!(g.require_u64("u32").unwrap(), 70000);
        assert_eq!(g.require_f32("f32").unwrap(), 1.5);
        assert_eq!(g.require_str("general.architecture").unwrap(), "bitnet");
        let missing = g.require_u64("nope").unwrap_err().to_string();
        assert!(missing.contains("`nope` is missing"), "{missing}");
        let wrong = g
            .require_u64("general.architecture")
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("holds a string"), "{wrong}");
        assert!(g.require_u64("i32").is_err());

        let c = g.tensor("c").unwrap();
        assert!(g.tensor("d").is_none());
        let data = g.tensor_data(c);
        let start = g.data_offset() as usize + 192;
        assert_eq!(data, &bytes[start..start + 6]);
        let storage = g.tensor_storage(c).unwrap();
        assert!(storage.is_mapped());
        assert_eq!(storage.bytes().as_ptr(), data.as_ptr());
        assert!(g
            .i2s_trailer(c)
            .unwrap_err()
            .to_string()
            .contains("not I2_S"));

        // An info from elsewhere gives an empty slice, never a panic.
        let mut alien = c.clone();
        alien.data_range = usize::MAX - 1..usize::MAX;
        assert!(g.tensor_data(&alien).is_empty());
        assert!(g.tensor_storage(&alien).is_err());
        assert!(format!("{g:?}").contains("tensors: 3"));
    }

    #[test]
    fn i2s_sizes_and_trailer() {
        // [128, 2]: 256 codes in 64 bytes, then a 32-byte trailer holding the scale.
        let b = Builder::empty()
            .info(ti("w", &[128, 2], 36, 0))
            .with_data(64);
        let mut bytes = b.build();
        let data_start = bytes.len() - 64;
        let mut trailer = 0.75f32.to_le_bytes().to_vec();
        trailer.resize(I2S_TRAILER_BYTES, 0);
        bytes.extend(&trailer);
        let g = open_bytes(&bytes).unwrap();
        let w = g.tensor("w").unwrap();
        assert_eq!(w.ggml_type, GgmlType::I2_S);
        assert_eq!(w.data_range, data_start..data_start + 64);
        assert_eq!(g.i2s_trailer(w).unwrap(), &trailer[..]);
        assert_eq!(g.i2s_scale(w).unwrap(), 0.75);

        // Without the trailer the file still parses, but the trailer is refused.
        let g = open_bytes(&b.build()).unwrap();
        let w = g.tensor("w").unwrap();
        let e = g.i2s_trailer(w).unwrap_err().to_string();
        assert!(e.contains("runs past the end"), "{e}");
        assert!(g.i2s_scale(w).is_err());
    }

    #[test]
    fn type_tables_round_trip() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(t.to_string(), t.name());
            assert!(t.block_elems() >= 1 && t.block_bytes() >= 1);
        }
        for id in [4, 5, 16, 23, 29, 31, 33, 37, u32::MAX] {
            assert_eq!(GgmlType::from_id(id), None, "id {id}");
        }
        assert_eq!(GgmlType::TQ1_0.data_size(512), Some(108));
        assert_eq!(GgmlType::TQ2_0.data_size(100), None);
        assert_eq!(GgmlType::I2_S.data_size(1024), Some(256));
        assert_eq!(GgmlType::F32.data_size(u64::MAX), None);
        assert_eq!(GgmlType::BF16.dtype(), Some(DType::BF16));
        assert_eq!(GgmlType::Q8_0.dtype(), None);
        assert!(GgmlType::Q8_0.is_quantized() && !GgmlType::F16.is_quantized());
        for t in GgufValueType::ALL {
            assert_eq!(GgufValueType::from_id(t.id()), Some(t));
        }
        assert_eq!(GgufValueType::from_id(13), None);
    }

    #[test]
    fn value_accessors() {
        assert_eq!(GgufValue::I32(-1).as_u64(), None);
        assert_eq!(GgufValue::I32(5).as_u64(), Some(5));
        assert_eq!(GgufValue::U8(7).as_u64(), Some(7));
        assert_eq!(GgufValue::U64(u64::MAX).as_i64(), None);
        assert_eq!(GgufValue::U64(u64::MAX).as_u32(), None);
        assert_eq!(GgufValue::U16(9).as_usize(), Some(9));
        assert_eq!(GgufValue::I8(-3).as_i64(), Some(-3));
        assert_eq!(GgufValue::Bool(true).as_u64(), None);
        assert_eq!(GgufValue::F64(0.5).as_f32(), Some(0.5));
        assert_eq!(GgufValue::U32(3).as_f32(), Some(3.0));
        assert_eq!(GgufValue::String("x".into()).as_f32(), None);
        assert_eq!(GgufValue::Bool(false).as_bool(), Some(false));
        assert_eq!(GgufValue::U8(1).as_bool(), None);
        assert_eq!(GgufValue::U8(1).as_str(), None);
        let a = GgufValue::Array(GgufArray::I32((0..20).collect()));
        assert_eq!(a.as_array().map(GgufArray::len), Some(20));
        assert_eq!(
            a.as_array().and_then(|a| a.get(19)),
            Some(GgufValue::I32(19))
        );
        assert_eq!(a.as_array().and_then(|a| a.get(20)), None);
        assert_eq!(
            a.to_string(),
            "[0, 1, 2, 3, 4, 5, 6, 7, ... (20 i32 elements)]"
        );
        assert_eq!(GgufValue::String("a\"b".into()).to_string(), "\"a\\\"b\"");
    }

    // ---- header corruption ---------------------------------------------------------------

    #[test]
    fn bad_magic_and_versions() {
        let mut bytes = valid().build();
        bytes[0] = b'X';
        assert_err_contains(&bytes, &["not a GGUF file", "magic"]);
        for v in [0u32, 1, 4, u32::MAX] {
            let mut b = valid();
            b.version = v;
            assert_err_contains(&b.build(), &[&format!("unsupported GGUF version {v}")]);
        }
        let mut b = valid();
        b.version = 3u32.swap_bytes();
        assert_err_contains(&b.build(), &["big-endian"]);
        assert_err_contains(&[], &["too short"]);
        assert_err_contains(b"GGU", &["too short"]);
    }

    #[test]
    fn huge_counts_fail_without_allocating() {
        for n in [u64::MAX, 1 << 60, 1 << 32, 1000] {
            let mut b = valid();
            b.tensor_count = Some(n);
            assert_err_contains(&b.build(), &["tensor"]);
            let mut b = valid();
            b.kv_count = Some(n);
            assert_err_contains(&b.build(), &["metadata"]);
        }
        // Counts that fit the header check but not the file after the metadata.
        let mut b = valid();
        b.tensor_count = Some(4);
        assert!(parse_bytes(&b.build()).is_err());
        let mut b = valid();
        b.kv_count = Some(18);
        assert!(parse_bytes(&b.build()).is_err());
    }

    #[test]
    fn huge_string_lengths_fail() {
        // Key length.
        let mut entry = u64b(u64::MAX);
        entry.extend(b"abc");
        let b = Builder::empty().kv(entry);
        assert_err_contains(&b.build(), &["metadata entry #0", "string length"]);
        // String value length.
        let b = Builder::empty().kv(kv("k", 8, &u64b(u64::MAX)));
        assert_err_contains(&b.build(), &["`k`", "string length"]);
        let b = Builder::empty().kv(kv("k", 8, &u64b(1 << 60)));
        assert_err_contains(&b.build(), &["`k`", "cannot fit"]);
        // Tensor name length.
        let mut info = ti("t", &[4], 0, 0);
        info[..8].copy_from_slice(&u64b(u64::MAX - 7));
        let b = Builder::empty().info(info).with_data(16);
        assert_err_contains(&b.build(), &["tensor info #0", "string length"]);
    }

    #[test]
    fn huge_array_counts_fail() {
        for elem in [0u32, 6, 7, 8, 9, 12] {
            for n in [u64::MAX, 1 << 60, 1 << 20] {
                let b = Builder::empty().kv(kv("k", 9, &arr(elem, n, &[0; 64])));
                assert_err_contains(&b.build(), &["`k`", "element count"]);
            }
        }
        // A nested array that claims too many elements.
        let inner = arr(8, u64::MAX, &[]);
        let b = Builder::empty().kv(kv("k", 9, &arr(9, 1, &inner)));
        assert_err_contains(&b.build(), &["`k`", "array element 0", "element count"]);
    }

    #[test]
    fn bad_value_types_and_values() {
        let b = valid().kv(kv("k", 13, &[0; 8]));
        assert_err_contains(&b.build(), &["`k`", "unknown value type id 13"]);
        let b = valid().kv(kv("k", 9, &arr(99, 1, &[0; 8])));
        assert_err_contains(&b.build(), &["`k`", "unknown value type id 99"]);
        let b = valid().kv(kv("k", 7, &[2]));
        assert_err_contains(&b.build(), &["`k`", "bool", "is 2"]);
        let b = valid().kv(kv("k", 9, &arr(7, 3, &[0, 1, 255])));
        assert_err_contains(&b.build(), &["`k`", "bool element 2 is 255"]);
        let b = valid().kv(kv("k", 8, &sb([0x66, 0xFF, 0x66])));
        assert_err_contains(&b.build(), &["`k`", "UTF-8"]);
        let b = valid().kv([sb([0xC3]), u32b(4), u32b(1)].concat());
        assert_err_contains(&b.build(), &["key", "UTF-8"]);
        let b = valid().kv(kv(
            "k",
            9,
            &arr(8, 2, &[sb("ok"), sb([0xED, 0xA0, 0x80])].concat()),
        ));
        assert_err_contains(&b.build(), &["`k`", "string element 1", "UTF-8"]);
    }

    #[test]
    fn nesting_depth_is_limited() {
        fn nested(depth: usize) -> Vec<u8> {
            let mut v = arr(4, 1, &u32b(42));
            for _ in 1..depth {
                v = arr(9, 1, &v);
            }
            v
        }
        let ok = Builder::empty().kv(kv("k", 9, &nested(GGUF_MAX_ARRAY_DEPTH)));
        assert!(parse_bytes(&ok.build()).is_ok());
        let deep = Builder::empty().kv(kv("k", 9, &nested(GGUF_MAX_ARRAY_DEPTH + 1)));
        assert_err_contains(&deep.build(), &["`k`", "nested more than 8"]);
        // A deep claim far beyond the limit stops at the limit, not at stack exhaustion.
        let mut evil = Vec::new();
        for _ in 0..10_000 {
            evil.extend(u32b(9));
            evil.extend(u64b(1));
        }
        let b = Builder::empty().kv(kv("k", 9, &evil));
        assert_err_contains(&b.build(), &["nested more than"]);
    }

    #[test]
    fn duplicates_fail() {
        let b = valid().kv(kv("u8", 0, &[1]));
        assert_err_contains(&b.build(), &["duplicate metadata key `u8`"]);
        let b = valid().info(ti("a", &[4], 0, 224)).with_data(240);
        assert_err_contains(&b.build(), &["duplicate tensor name `a`"]);
    }

    #[test]
    fn bad_alignment_fails() {
        for a in [0u32, 3, 48, 100] {
            let b = valid().kv(kv(GGUF_ALIGNMENT_KEY, 4, &u32b(a)));
            assert_err_contains(&b.build(), &[GGUF_ALIGNMENT_KEY, "power of two"]);
        }
        let b = valid().kv(kv(GGUF_ALIGNMENT_KEY, 8, &sb("32")));
        assert_err_contains(&b.build(), &[GGUF_ALIGNMENT_KEY, "unsigned integer"]);
        let b = valid().kv(kv(GGUF_ALIGNMENT_KEY, 5, &(-32i32).to_le_bytes()));
        assert_err_contains(&b.build(), &[GGUF_ALIGNMENT_KEY, "unsigned integer"]);
        // 2^63 is a power of two, but the data section offset cannot be rounded up to it.
        let b = valid().kv(kv(GGUF_ALIGNMENT_KEY, 10, &u64b(1 << 63)));
        assert!(parse_bytes(&b.build()).is_err());
    }

    // ---- tensor info corruption ----------------------------------------------------------

    fn with_tensor_c(info: Vec<u8>) -> Vec<u8> {
        let mut b = valid();
        b.infos[2] = info;
        b.build()
    }

    #[test]
    fn bad_tensor_infos_fail() {
        assert_err_contains(
            &with_tensor_c(ti("c", &[3], 99, 192)),
            &["tensor `c`", "unknown ggml type id 99"],
        );
        assert_err_contains(
            &with_tensor_c(ti("c", &[3], 4, 192)),
            &["tensor `c`", "unknown ggml type id 4"],
        );
        assert_err_contains(
            &with_tensor_c(ti("c", &[1, 1, 1, 1, 3], 1, 192)),
            &["tensor `c`", "5 dimensions"],
        );
        assert_err_contains(
            &with_tensor_c(ti("c", &[], 1, 192)),
            &["tensor `c`", "0 dimensions"],
        );
        let mut info = ti("c", &[3], 1, 192);
        info[9..13].copy_from_slice(&u32b(u32::MAX));
        assert_err_contains(&with_tensor_c(info), &["tensor `c`", "dimensions"]);
        assert_err_contains(
            &with_tensor_c(ti("c", &[3, 0], 1, 192)),
            &["tensor `c`", "dimension 1 is zero"],
        );
        assert_err_contains(
            &with_tensor_c(ti("c", &[1 << 32, 1 << 32], 1, 192)),
            &["tensor `c`", "overflows"],
        );
        assert_err_contains(
            &with_tensor_c(ti("c", &[1 << 62], 0, 192)),
            &["tensor `c`", "byte size", "overflows"],
        );
        assert_err_contains(
            &with_tensor_c(ti("c", &[u64::MAX], 1, 192)),
            &["tensor `c`", "too large"],
        );
        assert_err_contains(
            &with_tensor_c(ti("c", &[128, 2], 35, 192)),
            &["tensor `c`", "not a multiple of the TQ2_0 block size 256"],
        );
    }

    #[test]
    fn bad_offsets_fail() {
        assert_err_contains(
            &with_tensor_c(ti("c", &[3], 1, 193)),
            &["tensor `c`", "offset 193", "alignment 32"],
        );
        assert_err_contains(
            &with_tensor_c(ti("c", &[3], 1, 224)),
            &["tensor `c`", "outside the file"],
        );
        assert_err_contains(
            &with_tensor_c(ti("c", &[3], 1, 1 << 40)),
            &["tensor `c`", "outside the file"],
        );
        assert_err_contains(
            &with_tensor_c(ti("c", &[3], 1, !31)),
            &["tensor `c`", "outside the file"],
        );
        // `c` moved onto `b`'s bytes.
        assert_err_contains(
            &with_tensor_c(ti("c", &[3], 1, 128)),
            &["`b`", "`c`", "overlap"],
        );
        // The file ends one byte early.
        let bytes = valid().build();
        assert_err_contains(
            &bytes[..bytes.len() - 1],
            &["tensor `c`", "outside the file"],
        );
    }

    // ---- truncation and mutation everywhere ----------------------------------------------

    #[test]
    fn synthetic_truncation_everywhere_fails() {
        let (bytes, s) = valid().build_with_sections();
        assert!(s.header_end < s.kvs_end && s.kvs_end < s.infos_end);
        assert!(s.infos_end <= s.data_start && s.data_start < bytes.len());
        assert!(parse_bytes(&bytes).is_ok());
        for n in 0..bytes.len() {
            assert!(
                parse_bytes(&bytes[..n]).is_err(),
                "prefix of {n} bytes parsed"
            );
        }
    }

    #[test]
    fn synthetic_byte_mutations_never_panic() {
        let (bytes, s) = valid().build_with_sections();
        let mut copy = bytes.clone();
        for i in 0..s.data_start {
            for v in [0u8, 1, 2, 9, 0x7F, 0x80, 0xFF] {
                copy[i] = v;
                let _ = parse_bytes(&copy);
            }
            copy[i] = bytes[i];
        }
    }

    #[test]
    fn fixture_truncation_everywhere_fails() {
        for name in ["tiny-bitnet-TQ2_0.gguf", "tiny-bitnet-TQ1_0.gguf"] {
            let bytes = fixture(name);
            let p = parse_bytes(&bytes).unwrap();
            let data_start = p.data_offset as usize;
            let data_end = p.tensors.iter().map(|t| t.data_range.end).max().unwrap();
            assert_eq!(
                data_end,
                bytes.len(),
                "{name}: no trailing bytes after the data"
            );
            for n in 0..=data_start {
                assert!(
                    parse_bytes(&bytes[..n]).is_err(),
                    "{name}: prefix {n} parsed"
                );
            }
            // Section boundaries: header, end of each metadata entry's key, each tensor's
            // start and end inside the data section.
            let mut cuts = vec![24, data_end - 1];
            for t in &p.tensors {
                cuts.extend([
                    t.data_range.start,
                    t.data_range.start + 1,
                    t.data_range.end - 1,
                ]);
            }
            for n in cuts {
                assert!(
                    parse_bytes(&bytes[..n]).is_err(),
                    "{name}: prefix {n} parsed"
                );
            }
        }
    }

    #[test]
    fn fixture_byte_flips_never_panic() {
        let bytes = fixture("tiny-bitnet-TQ2_0.gguf");
        let data_start = parse_bytes(&bytes).unwrap().data_offset as usize;
        let mut copy = bytes.clone();
        for i in 0..data_start {
            copy[i] = !bytes[i];
            let _ = parse_bytes(&copy);
            copy[i] = bytes[i];
        }
        // Specific fields of the fixture: version and the first tensor's type.
        let mut v4 = bytes.clone();
        v4[4..8].copy_from_slice(&u32b(4));
        assert_err_contains(&v4, &["version 4"]);
    }
}
