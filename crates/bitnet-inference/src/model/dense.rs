//! Full-precision matrices (embeddings, output head) kept in their file dtype.

use bitnet_core::{DType, Storage};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::{Error, Result};

/// A row-major `[rows, cols]` matrix of f32, f16 or bf16 values, borrowed from the model file
/// where possible: a 128k x 2560 embedding would cost 1.3 GB as f32.
#[derive(Debug, Clone)]
pub struct DenseMatrix {
    dtype: DType,
    rows: usize,
    cols: usize,
    data: Storage,
}

/// Rows per parallel task of the head: large enough to amortise scheduling.
const HEAD_ROWS_PER_TASK: usize = 256;

impl DenseMatrix {
    /// Wraps `data` holding `rows * cols` values of `dtype`.
    pub fn new(name: &str, dtype: DType, rows: usize, cols: usize, data: Storage) -> Result<Self> {
        if !dtype.is_float() {
            return Err(Error::TensorDType {
                name: name.into(),
                expected: "F32, F16 or BF16".into(),
                found: dtype.to_string(),
            });
        }
        if data.len() != rows * cols * dtype.size() {
            return Err(Error::TensorShape {
                name: name.into(),
                expected: vec![rows, cols],
                found: vec![data.len() / dtype.size() / cols.max(1), cols],
            });
        }
        Ok(DenseMatrix {
            dtype,
            rows,
            cols,
            data,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self, r: usize) -> &[u8] {
        let n = self.cols * self.dtype.size();
        &self.data.bytes()[r * n..(r + 1) * n]
    }

    /// Writes row `r` as f32 into `out` (exact widening).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let b = self.row_bytes(r);
        match self.dtype {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::I8 | DType::U8 => unreachable!("DenseMatrix::new admits float dtypes only"),
        }
    }

    /// `sum_k row_r[k] * x[k]` in f32, eight running sums combined at the end. The order
    /// is fixed, so the result does not depend on threads.
    fn dot(&self, r: usize, x: &[f32]) -> f32 {
        let b = self.row_bytes(r);
        let mut acc = [0f32; 8];
        let mut add = |k: usize, w: f32| acc[k % 8] += w * x[k];
        match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .enumerate()
                .for_each(|(k, c)| add(k, f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            DType::F16 => b
                .chunks_exact(2)
                .enumerate()
                .for_each(|(k, c)| add(k, f16::from_le_bytes([c[0], c[1]]).to_f32())),
            DType::BF16 => b
                .chunks_exact(2)
                .enumerate()
                .for_each(|(k, c)| add(k, bf16::from_le_bytes([c[0], c[1]]).to_f32())),
            DType::I8 | DType::U8 => unreachable!("DenseMatrix::new admits float dtypes only"),
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    }

    /// `out[r] = row_r . x` for every row, in parallel over rows.
    pub fn matvec(&self, x: &[f32], out: &mut [f32]) {
        out.par_chunks_mut(HEAD_ROWS_PER_TASK)
            .enumerate()
            .for_each(|(i, o)| {
                for (j, v) in o.iter_mut().enumerate() {
                    *v = self.dot(i * HEAD_ROWS_PER_TASK + j, x);
                }
            });
    }
}
