//! Full-precision matrices (embeddings, output head) kept in their file format.

use bitnet_core::{DType, Storage};
use bitnet_quant::kernels::{combine_sums, Kernels, DOT_SUMS};
use bitnet_quant::q6_k::{dequantize_q6_k, quantize_q6_k, Q6_K_BLOCK, Q6_K_BYTES};
use bitnet_quant::q8_0::quantize_q8_0_activations;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::{Error, Result};

/// How a [`DenseMatrix`] stores its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseFormat {
    /// f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    BF16,
    /// ggml Q8_0: blocks of 32 int8 values with one f16 scale (34 bytes).
    Q8_0,
    /// ggml Q6_K: super-blocks of 256 6-bit values with int8 scales per 16 and an f16 scale
    /// (210 bytes), llama.cpp's usual type for output heads and tied embeddings.
    #[allow(non_camel_case_types)] // ggml's name
    Q6_K,
}

/// Values per Q8_0 block.
const Q8_0_BLOCK: usize = 32;
/// Bytes per Q8_0 block.
const Q8_0_BYTES: usize = 34;

impl DenseFormat {
    /// The format of a float dtype; `None` for integer dtypes.
    pub fn from_dtype(d: DType) -> Option<Self> {
        match d {
            DType::F32 => Some(DenseFormat::F32),
            DType::F16 => Some(DenseFormat::F16),
            DType::BF16 => Some(DenseFormat::BF16),
            DType::I8 | DType::U8 => None,
        }
    }

    /// Bytes of a row of `cols` values, or `None` if `cols` does not fit the format's blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        match self {
            DenseFormat::F32 => Some(cols * 4),
            DenseFormat::F16 | DenseFormat::BF16 => Some(cols * 2),
            DenseFormat::Q8_0 => cols
                .is_multiple_of(Q8_0_BLOCK)
                .then_some(cols / Q8_0_BLOCK * Q8_0_BYTES),
            DenseFormat::Q6_K => cols
                .is_multiple_of(Q6_K_BLOCK)
                .then_some(cols / Q6_K_BLOCK * Q6_K_BYTES),
        }
    }

    /// Parses `f32`, `f16`, `bf16`, `q8_0` or `q6_k`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" => DenseFormat::F32,
            "f16" => DenseFormat::F16,
            "bf16" => DenseFormat::BF16,
            "q8_0" => DenseFormat::Q8_0,
            "q6_k" => DenseFormat::Q6_K,
            other => {
                return Err(Error::InvalidInput(format!(
                    "unknown head type `{other}` (expected f32, f16, bf16, q8_0 or q6_k)"
                )))
            }
        })
    }

    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            DenseFormat::F32 => "F32",
            DenseFormat::F16 => "F16",
            DenseFormat::BF16 => "BF16",
            DenseFormat::Q8_0 => "Q8_0",
            DenseFormat::Q6_K => "Q6_K",
        }
    }
}

/// Encodes one row of f32 values in `format` into `dst` (`format.row_bytes(row.len())` bytes).
fn encode_row(format: DenseFormat, row: &[f32], dst: &mut [u8]) {
    match format {
        DenseFormat::F32 => dst
            .chunks_exact_mut(4)
            .zip(row)
            .for_each(|(d, v)| d.copy_from_slice(&v.to_le_bytes())),
        DenseFormat::F16 => dst
            .chunks_exact_mut(2)
            .zip(row)
            .for_each(|(d, &v)| d.copy_from_slice(&f16::from_f32(v).to_le_bytes())),
        DenseFormat::BF16 => dst
            .chunks_exact_mut(2)
            .zip(row)
            .for_each(|(d, &v)| d.copy_from_slice(&bf16::from_f32(v).to_le_bytes())),
        DenseFormat::Q8_0 => {
            // Rows fit whole blocks (checked by `row_bytes`), so this cannot fail.
            if let Ok(q) = bitnet_quant::q8_0::quantize_q8_0(row) {
                dst.copy_from_slice(&q);
            }
        }
        DenseFormat::Q6_K => {
            if let Ok(q) = quantize_q6_k(row) {
                dst.copy_from_slice(&q);
            }
        }
    }
}

/// A row-major `[rows, cols]` matrix borrowed from the model file where possible: a
/// 128k x 2560 embedding would cost 1.3 GB as f32.
#[derive(Debug, Clone)]
pub struct DenseMatrix {
    format: DenseFormat,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Storage,
}

/// Rows per parallel task of the head: large enough to amortise scheduling.
const HEAD_ROWS_PER_TASK: usize = 256;

/// Values decoded per step: a stack buffer's worth, a multiple of the Q8_0 and Q6_K blocks.
const DECODE_CHUNK: usize = 256;

// Chunks must start at multiples of the running sums (see `dot`) and of the blocks.
const _: () =
    assert!(DECODE_CHUNK.is_multiple_of(DOT_SUMS) && DECODE_CHUNK.is_multiple_of(Q6_K_BLOCK));

impl DenseMatrix {
    /// Wraps `data` holding `rows` rows of `cols` values in `format`.
    pub fn new(
        name: &str,
        format: DenseFormat,
        rows: usize,
        cols: usize,
        data: Storage,
    ) -> Result<Self> {
        let row_bytes = format.row_bytes(cols).ok_or_else(|| {
            Error::InvalidInput(format!(
                "tensor `{name}`: rows of {cols} values do not fit {} blocks",
                format.name()
            ))
        })?;
        if Some(data.len()) != row_bytes.checked_mul(rows) {
            return Err(Error::InvalidInput(format!(
                "tensor `{name}` holds {} bytes, a [{rows}, {cols}] {} matrix takes {}",
                data.len(),
                format.name(),
                row_bytes.saturating_mul(rows)
            )));
        }
        Ok(DenseMatrix {
            format,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    /// A matrix from a float dtype (see [`DenseFormat::from_dtype`]).
    pub fn from_dtype(
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        data: Storage,
    ) -> Result<Self> {
        let format = DenseFormat::from_dtype(dtype).ok_or_else(|| Error::TensorDType {
            name: name.into(),
            expected: "F32, F16 or BF16".into(),
            found: dtype.to_string(),
        })?;
        Self::new(name, format, rows, cols, data)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Storage format.
    pub fn format(&self) -> DenseFormat {
        self.format
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.data.bytes()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Every row re-encoded in `format` into `dst` (`rows * format.row_bytes(cols)` bytes: the
    /// caller checks that the format fits the rows), in parallel over rows.
    pub(crate) fn encode_rows(&self, format: DenseFormat, dst: &mut [u8]) {
        let row_bytes = dst.len() / self.rows.max(1);
        dst.par_chunks_exact_mut(row_bytes.max(1))
            .enumerate()
            .for_each_init(
                || vec![0f32; self.cols],
                |row, (r, d)| {
                    self.row_to_f32(r, row);
                    encode_row(format, row, d);
                },
            );
    }

    /// Writes row `r` as f32 into `out`.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        for (i, chunk) in out[..self.cols].chunks_mut(DECODE_CHUNK).enumerate() {
            self.decode_span(row, i * DECODE_CHUNK, chunk);
        }
    }

    /// `sum_k row_r[k] * x[k]` in f32 in the summation order of the f16 kernels
    /// ([`DOT_SUMS`] running sums, sum `j` takes the values `k = j mod 32`, combined by
    /// [`combine_sums`]), so the f32, bf16 and f16 formats sum alike and an f16 head widened to
    /// f32 gives the same logits. The order is fixed, so the result does not depend on threads. The row is decoded in chunks into a stack
    /// buffer so the multiply-add loop is a plain f32 loop the compiler vectorizes.
    fn dot(&self, kernels: &Kernels, r: usize, x: &[f32]) -> f32 {
        match self.format {
            DenseFormat::F16 => {
                // The map keeps GGUF and safetensors data 2-byte aligned in practice; the
                // buffered path below gives the same bits when it is not.
                if let Ok(w) = bytemuck::try_cast_slice::<u8, f16>(self.row(r)) {
                    return (kernels.dot_f16)(w, &x[..self.cols]);
                }
            }
            DenseFormat::Q8_0 | DenseFormat::Q6_K | DenseFormat::F32 | DenseFormat::BF16 => {}
        }
        let mut acc = [0f32; DOT_SUMS];
        let mut buf = [0f32; DECODE_CHUNK];
        let row = self.row(r);
        let mut k0 = 0;
        while k0 < self.cols {
            let n = DECODE_CHUNK.min(self.cols - k0);
            self.decode_span(row, k0, &mut buf[..n]);
            let (w, xs) = (&buf[..n], &x[k0..k0 + n]);
            // Chunks start at multiples of DOT_SUMS, so value `j` of a chunk goes to sum `j`.
            let mut wc = w.chunks_exact(DOT_SUMS);
            let mut xc = xs.chunks_exact(DOT_SUMS);
            for (wb, xb) in (&mut wc).zip(&mut xc) {
                for j in 0..DOT_SUMS {
                    acc[j] += wb[j] * xb[j];
                }
            }
            for (j, (wv, xv)) in wc.remainder().iter().zip(xc.remainder()).enumerate() {
                acc[j] += wv * xv;
            }
            k0 += n;
        }
        combine_sums(&acc)
    }

    /// Decodes values `k0..k0 + out.len()` of a stored row (`k0` and the length multiples of
    /// [`DECODE_CHUNK`] except at the row's end, so Q8_0 and Q6_K spans are whole blocks).
    fn decode_span(&self, row: &[u8], k0: usize, out: &mut [f32]) {
        let n = out.len();
        match self.format {
            DenseFormat::F32 => {
                for (o, c) in out
                    .iter_mut()
                    .zip(row[k0 * 4..(k0 + n) * 4].chunks_exact(4))
                {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DenseFormat::F16 => {
                use half::slice::HalfFloatSliceExt;
                let mut h = [f16::ZERO; DECODE_CHUNK];
                for (d, c) in h.iter_mut().zip(row[k0 * 2..(k0 + n) * 2].chunks_exact(2)) {
                    *d = f16::from_le_bytes([c[0], c[1]]);
                }
                h[..n].convert_to_f32_slice(out);
            }
            DenseFormat::BF16 => {
                for (o, c) in out
                    .iter_mut()
                    .zip(row[k0 * 2..(k0 + n) * 2].chunks_exact(2))
                {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            DenseFormat::Q8_0 => {
                let b0 = k0 / Q8_0_BLOCK;
                let blocks = &row[b0 * Q8_0_BYTES..(b0 + n.div_ceil(Q8_0_BLOCK)) * Q8_0_BYTES];
                for (o, blk) in out
                    .chunks_mut(Q8_0_BLOCK)
                    .zip(blocks.chunks_exact(Q8_0_BYTES))
                {
                    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    for (v, &q) in o.iter_mut().zip(&blk[2..]) {
                        *v = d * (q as i8) as f32;
                    }
                }
            }
            DenseFormat::Q6_K => {
                let b0 = k0 / Q6_K_BLOCK;
                let blocks = &row[b0 * Q6_K_BYTES..(b0 + n.div_ceil(Q6_K_BLOCK)) * Q6_K_BYTES];
                dequantize_q6_k(blocks, out);
            }
        }
    }

    /// `out[r] = row_r . x` for every row, in parallel over rows.
    ///
    /// A Q8_0 or Q6_K matrix multiplies `x` quantized to int8 blocks of 32 (one f32 scale each, see
    /// [`quantize_q8_0_activations`]) into `xq` and `xd`, which the caller provides so that the
    /// per-token path allocates nothing (at least `cols` and `cols / 32` long; other formats
    /// leave them alone). The kernel then multiplies bytes rather than widening every weight to
    /// f32, so its logits differ from the f32 product by that rounding too (measured in the
    /// README).
    pub fn matvec(
        &self,
        kernels: &Kernels,
        x: &[f32],
        xq: &mut [i8],
        xd: &mut [f32],
        out: &mut [f32],
    ) {
        let dot = match self.format {
            DenseFormat::Q8_0 => kernels.dot_q8_0,
            DenseFormat::Q6_K => kernels.dot_q6_k,
            DenseFormat::F32 | DenseFormat::F16 | DenseFormat::BF16 => {
                return each_row_in_parallel(out, |r| self.dot(kernels, r, x));
            }
        };
        let (xq, xd) = (&mut xq[..self.cols], &mut xd[..self.cols / Q8_0_BLOCK]);
        quantize_q8_0_activations(&x[..self.cols], xq, xd);
        let (xq, xd) = (&*xq, &*xd);
        each_row_in_parallel(out, |r| dot(self.row(r), xq, xd));
    }
}

/// `out[r] = row_value(r)` for every row, in parallel tasks of [`HEAD_ROWS_PER_TASK`] rows.
fn each_row_in_parallel(out: &mut [f32], row_value: impl Fn(usize) -> f32 + Sync) {
    out.par_chunks_mut(HEAD_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(i, o)| {
            for (j, v) in o.iter_mut().enumerate() {
                *v = row_value(i * HEAD_ROWS_PER_TASK + j);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_core::AlignedBuffer;

    #[test]
    fn q8_0_rows_decode_and_dot() {
        // One row of 32: d = 0.5, q = 0..32.
        let mut bytes = f16::from_f32(0.5).to_le_bytes().to_vec();
        bytes.extend((0..32).map(|i| i as u8));
        let m = DenseMatrix::new(
            "t",
            DenseFormat::Q8_0,
            1,
            32,
            Storage::heap(AlignedBuffer::from_bytes(&bytes)),
        )
        .unwrap();
        let mut row = [0f32; 32];
        m.row_to_f32(0, &mut row);
        assert_eq!(row[3], 1.5);
        let mut out = [0f32];
        let (mut xq, mut xd) = ([0i8; 32], [0f32; 1]);
        m.matvec(Kernels::get(), &[1.0; 32], &mut xq, &mut xd, &mut out);
        assert_eq!(out[0], 0.5 * (31.0 * 32.0 / 2.0));
        let short = Storage::heap(AlignedBuffer::from_bytes(&bytes[..33]));
        assert!(DenseMatrix::new("t", DenseFormat::Q8_0, 1, 32, short).is_err());
    }
}
