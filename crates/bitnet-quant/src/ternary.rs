//! The runtime ternary layout that every kernel streams.
//!
//! Each output row is cut into blocks of [`BLOCK_ELEMS`] = 128 weights stored in
//! [`BLOCK_BYTES`] = 32 bytes. Byte `j` of a block holds the codes `t + 1` of elements `j`,
//! `j + 32`, `j + 64` and `j + 96` in bits 7-6, 5-4, 3-2 and 1-0. One 32-byte load, four
//! shifts and a mask give four vectors of 32 consecutive codes that line up with 32
//! consecutive int8 activations, so a SIMD kernel streams weights with no shuffles and no
//! per-call repacking. The last block of a row is padded with code 1 (weight 0); activations
//! are padded with zeros to the same length. (This block is also bitnet.cpp's x86 I2_S block.)
//!
//! Rows come in groups of [`ROW_GROUP`] = 4, and a group stores its blocks interleaved: block
//! `b` of the group's row `i` lies at `group_start + (b * ROW_GROUP + i) * BLOCK_BYTES` (see
//! [`block_offset`]). The decode kernel computes four rows at a time, so this turns its four
//! weight streams into one sequential stream, which the hardware prefetchers follow at full
//! memory bandwidth (four streams 1-2 KB apart measured at less than half of it). A matrix holds
//! [`TernaryMatrix::padded_rows`] rows, the missing rows of the last group padded with code 1.
//!
//! This is the default layout. [`crate::base3`] is a denser one (1.6 bits per weight, the
//! same blocks and row groups) that costs about twice the decoding work.

use bitnet_core::{AlignedBuffer, Storage};
use rayon::prelude::*;

use crate::{Error, Result};

/// Weights per block.
pub const BLOCK_ELEMS: usize = 128;
/// Bytes per block (2 bits per weight).
pub const BLOCK_BYTES: usize = 32;
/// Rows whose blocks are stored interleaved (see the module docs).
pub const ROW_GROUP: usize = 4;
/// A layout byte holding four zero weights (code 1 in every field); also the mask of each
/// field's low bit.
pub const ZERO_BYTE: u8 = 0b0101_0101;

/// Whether a layout byte holds the code 3, which no weight has (a corrupt or misread tensor).
#[inline]
pub fn holds_code_3(byte: u8) -> bool {
    byte & (byte >> 1) & ZERO_BYTE != 0
}

/// Byte offset of block `b` of row `r` in a matrix of `row_bytes` bytes per row.
#[inline]
pub fn block_offset(row_bytes: usize, r: usize, b: usize) -> usize {
    (r / ROW_GROUP) * ROW_GROUP * row_bytes + (b * ROW_GROUP + r % ROW_GROUP) * BLOCK_BYTES
}

/// A `[rows, cols]` ternary matrix in the runtime layout.
#[derive(Debug, Clone)]
pub struct TernaryMatrix {
    rows: usize,
    cols: usize,
    data: Storage,
}

/// The code byte of weight `k` within its block, and the shift of its two bits.
#[inline]
pub(crate) fn position(k: usize) -> (usize, u32) {
    let lane = k % BLOCK_ELEMS;
    (lane % 32, 6 - 2 * (lane / 32) as u32)
}

impl TernaryMatrix {
    /// Number of blocks per row for `cols` inputs.
    pub fn blocks_per_row(cols: usize) -> usize {
        cols.div_ceil(BLOCK_ELEMS)
    }

    /// Length of the padded activation row the kernels expect for `cols` inputs.
    pub fn padded_cols(cols: usize) -> usize {
        Self::blocks_per_row(cols) * BLOCK_ELEMS
    }

    /// Packs row-major codes in {-1, 0, 1} (`rows * cols` of them).
    pub fn from_codes(codes: &[i8], rows: usize, cols: usize) -> Result<Self> {
        if codes.len() != rows * cols {
            return Err(Error::InvalidInput(format!(
                "{} ternary codes cannot form a [{rows}, {cols}] matrix",
                codes.len()
            )));
        }
        let row_bytes = Self::blocks_per_row(cols) * BLOCK_BYTES;
        let mut buf = Self::zero_weights(rows, cols);
        if cols > 0 {
            // Row groups are independent: pack them in parallel (a 2B model has 1.3G codes).
            buf.as_mut_bytes()
                .par_chunks_mut(ROW_GROUP * row_bytes)
                .zip(codes.par_chunks(ROW_GROUP * cols))
                .enumerate()
                .try_for_each(|(g, (group, codes))| {
                    for (i, row) in codes.chunks_exact(cols).enumerate() {
                        for (k, &t) in row.iter().enumerate() {
                            if !(-1..=1).contains(&t) {
                                let r = g * ROW_GROUP + i;
                                return Err(Error::InvalidInput(format!(
                                    "code {t} at [{r}, {k}] is not ternary"
                                )));
                            }
                            let (byte, shift) = position(k);
                            let slot =
                                &mut group[block_offset(row_bytes, i, k / BLOCK_ELEMS) + byte];
                            *slot = (*slot & !(3 << shift)) | (((t + 1) as u8) << shift);
                        }
                    }
                    Ok(())
                })?;
        }
        Ok(TernaryMatrix {
            rows,
            cols,
            data: Storage::heap(buf),
        })
    }

    /// A buffer for a `[rows, cols]` matrix in the runtime layout holding only zero weights,
    /// so rows, padding and padding rows that nothing overwrites contribute nothing.
    pub(crate) fn zero_weights(rows: usize, cols: usize) -> AlignedBuffer {
        let bytes = Self::padded_rows(rows) * Self::blocks_per_row(cols) * BLOCK_BYTES;
        let mut buf = AlignedBuffer::zeroed(bytes);
        buf.as_mut_bytes().fill(ZERO_BYTE);
        buf
    }

    /// Rows stored for `rows` rows: `rows` rounded up to a whole [`ROW_GROUP`].
    pub fn padded_rows(rows: usize) -> usize {
        rows.div_ceil(ROW_GROUP) * ROW_GROUP
    }

    /// Regroups `rows` rows of blocks stored one row after the other (the x86 I2_S layout:
    /// `blocks_per_row(cols) * BLOCK_BYTES` bytes per row, same block format) into the
    /// runtime layout; fails if the length does not match the shape.
    pub fn from_row_major(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let row_bytes = Self::blocks_per_row(cols) * BLOCK_BYTES;
        if bytes.len() != rows * row_bytes {
            return Err(Error::InvalidInput(format!(
                "a [{rows}, {cols}] ternary matrix takes {} bytes, got {}",
                rows * row_bytes,
                bytes.len()
            )));
        }
        let mut buf = Self::zero_weights(rows, cols);
        let dst = buf.as_mut_bytes();
        for (r, row) in bytes.chunks_exact(row_bytes.max(1)).enumerate() {
            for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                let at = block_offset(row_bytes, r, b);
                dst[at..at + BLOCK_BYTES].copy_from_slice(block);
            }
        }
        Ok(TernaryMatrix {
            rows,
            cols,
            data: Storage::heap(buf),
        })
    }

    /// Wraps bytes already in the runtime layout, row groups included; fails if their length
    /// does not match the shape ([`Self::padded_rows`] rows).
    pub fn from_storage(data: Storage, rows: usize, cols: usize) -> Result<Self> {
        let want = Self::padded_rows(rows) * Self::blocks_per_row(cols) * BLOCK_BYTES;
        if data.len() != want {
            return Err(Error::InvalidInput(format!(
                "a [{rows}, {cols}] ternary matrix takes {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(TernaryMatrix { rows, cols, data })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes per row, padding included.
    pub fn row_bytes(&self) -> usize {
        Self::blocks_per_row(self.cols) * BLOCK_BYTES
    }

    /// The packed bytes, `padded_rows(rows) * row_bytes` of them, in row groups.
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    /// The storage behind the bytes.
    pub fn storage(&self) -> &Storage {
        &self.data
    }

    /// The 32 bytes of block `b` of row `r`.
    pub fn block(&self, r: usize, b: usize) -> &[u8] {
        let at = block_offset(self.row_bytes(), r, b);
        &self.bytes()[at..at + BLOCK_BYTES]
    }

    /// The code of weight `(r, k)`, in {-1, 0, 1}.
    pub fn get(&self, r: usize, k: usize) -> i8 {
        let (byte, shift) = position(k);
        let b = self.block(r, k / BLOCK_ELEMS)[byte];
        ((b >> shift) & 3) as i8 - 1
    }

    /// The codes of row `r` into `out` (`cols` of them), block by block.
    pub fn row_codes(&self, r: usize, out: &mut [i8]) {
        for (b, codes) in out[..self.cols].chunks_mut(BLOCK_ELEMS).enumerate() {
            let block = self.block(r, b);
            if let Ok(codes) = <&mut [i8; BLOCK_ELEMS]>::try_from(&mut *codes) {
                // A whole block: each byte's four fields in turn (the common case, and what
                // makes repacking a 2B model take a fraction of a second).
                for (j, &byte) in block.iter().enumerate() {
                    for lane in 0..4 {
                        codes[lane * 32 + j] = ((byte >> (6 - 2 * lane)) & 3) as i8 - 1;
                    }
                }
                continue;
            }
            for (k, c) in codes.iter_mut().enumerate() {
                let (byte, shift) = position(k);
                *c = ((block[byte] >> shift) & 3) as i8 - 1;
            }
        }
    }

    /// All codes, row-major `[rows, cols]` (for checks and export, not for the hot path).
    pub fn to_codes(&self) -> Vec<i8> {
        let mut out = vec![0i8; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row_codes(r, row);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn block_layout_matches_the_doc() {
        // Element 0 -> byte 0 bits 7-6, element 32 -> byte 0 bits 5-4, 96 -> bits 1-0.
        let mut codes = vec![0i8; 130];
        codes[0] = 1;
        codes[32] = -1;
        codes[96] = 1;
        codes[129] = -1;
        let m = TernaryMatrix::from_codes(&codes, 1, 130).unwrap();
        assert_eq!(m.row_bytes(), 64);
        assert_eq!(m.bytes().len(), 4 * 64, "a whole row group");
        assert_eq!(m.bytes()[0], 0b10_00_01_10);
        // Block 1 of row 0 follows block 0 of the group's four rows.
        assert_eq!(m.bytes()[4 * 32 + 1], 0b00_01_01_01);
        assert_eq!(m.bytes()[2], ZERO_BYTE);
        // Padding rows are weight 0.
        assert!(m.bytes()[32..4 * 32].iter().all(|&b| b == ZERO_BYTE));
        assert_eq!(block_offset(64, 5, 1), 4 * 64 + (4 + 1) * 32);
        assert!(TernaryMatrix::from_codes(&[2], 1, 1).is_err());
        assert!(TernaryMatrix::from_codes(&[0; 3], 2, 2).is_err());
    }

    proptest! {
        #[test]
        fn codes_round_trip(rows in 1usize..6, cols in 1usize..300, seed in any::<u64>()) {
            let mut s = seed;
            let codes: Vec<i8> = (0..rows * cols).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) % 3) as i8 - 1
            }).collect();
            let m = TernaryMatrix::from_codes(&codes, rows, cols).unwrap();
            prop_assert_eq!(&m.to_codes(), &codes);
            // The same blocks, one row after the other, regroup to the same matrix.
            let mut row_major = Vec::new();
            for r in 0..rows {
                for b in 0..TernaryMatrix::blocks_per_row(cols) {
                    row_major.extend_from_slice(m.block(r, b));
                }
            }
            let again = TernaryMatrix::from_row_major(&row_major, rows, cols).unwrap();
            prop_assert_eq!(again.bytes(), m.bytes());
        }
    }
}
