//! The dense runtime layout: five ternary weights per byte, 1.6 bits per weight.
//!
//! The 2-bit layout ([`crate::ternary`]) spends a quarter of its bits on a code no weight has.
//! This one stores a weight's digit `d = t + 1` in base 3: five digits make one of 243 values,
//! which fit a byte. Decoding must stay cheap enough that a memory-bound decode step still
//! gains from reading 20% fewer bytes, so the byte does not hold the number
//! `v = 81 d0 + 27 d1 + 9 d2 + 3 d3 + d4` itself but the fraction `v / 243` in 8 fixed-point
//! bits, rounded up: `q = ceil(256 v / 243)`. Multiplying by three then brings one digit at a
//! time into the carry: `3 q = 256 d0 + q1`, `3 q1 = 256 d1 + q2`, and so on, every step exact
//! for all 243 values (`digits_decode_exactly` checks them all). In SIMD the carry is two
//! byte comparisons (`d = [m >= 86] + [m >= 171]`) and the next `m` two wrapping byte
//! additions (`m + m + m`), with no shuffle, no widening and no multiply. (llama.cpp's TQ1_0
//! rests on the same fixed-point idea; the blocks and their order here are this project's.)
//!
//! Each output row is cut into blocks of [`BASE3_BLOCK_ELEMS`] = 160 weights in
//! [`BASE3_BLOCK_BYTES`] = 32 bytes; byte `j` of a block holds the digits of elements `j`,
//! `j + 32`, `j + 64`, `j + 96` and `j + 128` (first digit the most significant). Digit `i` of
//! a 32-byte load is therefore a vector of 32 consecutive weights that lines up with 32
//! consecutive int8 activations, as in the 2-bit layout. Rows come in groups of
//! [`ROW_GROUP`] with their blocks interleaved ([`block_offset`] applies unchanged: the blocks
//! have the same 32 bytes), the last block of a row is padded with weight 0
//! ([`BASE3_ZERO_BYTE`]) and activation rows are padded with zeros to a whole block.
//!
//! The layout lives only in memory: the engine repacks the 2-bit matrices it loaded into it
//! when asked to (`--weight-layout base3`), so no file holds it and nothing untrusted is ever
//! decoded from it.

use bitnet_core::{AlignedBuffer, Storage};
use rayon::prelude::*;

use crate::ternary::{block_offset, ROW_GROUP};
use crate::{Error, Result, TernaryMatrix};

/// Weights per block of the dense layout.
pub const BASE3_BLOCK_ELEMS: usize = 160;
/// Bytes per block of the dense layout (1.6 bits per weight).
pub const BASE3_BLOCK_BYTES: usize = 32;
/// Weights per byte.
pub const BASE3_DIGITS: usize = 5;
/// The byte of five zero weights (every digit 1: `ceil(256 * 121 / 243)`).
pub const BASE3_ZERO_BYTE: u8 = 128;

const _: () = assert!(BASE3_BLOCK_ELEMS == BASE3_BLOCK_BYTES * BASE3_DIGITS);

/// The byte holding five digits in {0, 1, 2}, the first the most significant.
#[inline]
pub fn encode_digits(d: [u8; BASE3_DIGITS]) -> u8 {
    let v = d.iter().fold(0u32, |v, &di| v * 3 + di as u32);
    // ceil(256 v / 243) <= 255 for v <= 242.
    (v * 256).div_ceil(243) as u8
}

/// [`encode_digits`] of every value `v < 243` (digits in base 3, the first the most
/// significant), for packing at load time.
const ENCODED: [u8; 243] = {
    let mut t = [0u8; 243];
    let mut v = 0;
    while v < 243 {
        t[v] = ((v * 256).div_ceil(243)) as u8;
        v += 1;
    }
    t
};

/// The five digits of a byte written by [`encode_digits`], by repeated multiplication by 3.
#[inline]
pub fn decode_digits(q: u8) -> [u8; BASE3_DIGITS] {
    let mut m = q as u32;
    std::array::from_fn(|_| {
        let m3 = 3 * m;
        m = m3 & 0xFF;
        (m3 >> 8) as u8
    })
}

/// A `[rows, cols]` ternary matrix in the dense (base-3) runtime layout.
#[derive(Debug, Clone)]
pub struct Base3Matrix {
    rows: usize,
    cols: usize,
    data: Storage,
}

impl Base3Matrix {
    /// Number of blocks per row for `cols` inputs.
    pub fn blocks_per_row(cols: usize) -> usize {
        cols.div_ceil(BASE3_BLOCK_ELEMS)
    }

    /// Length of the padded activation row the kernels expect for `cols` inputs.
    pub fn padded_cols(cols: usize) -> usize {
        Self::blocks_per_row(cols) * BASE3_BLOCK_ELEMS
    }

    /// Packs row-major codes in {-1, 0, 1} (`rows * cols` of them).
    pub fn from_codes(codes: &[i8], rows: usize, cols: usize) -> Result<Self> {
        if codes.len() != rows * cols {
            return Err(Error::InvalidInput(format!(
                "{} ternary codes cannot form a [{rows}, {cols}] matrix",
                codes.len()
            )));
        }
        if let Some(at) = codes.iter().position(|t| !(-1..=1).contains(t)) {
            return Err(Error::InvalidInput(format!(
                "code {} at [{}, {}] is not ternary",
                codes[at],
                at / cols,
                at % cols
            )));
        }
        Ok(Self::pack(rows, cols, |r, row| {
            row.copy_from_slice(&codes[r * cols..(r + 1) * cols])
        }))
    }

    /// The same weights as a 2-bit matrix, repacked (in parallel over row groups).
    pub fn from_ternary(m: &TernaryMatrix) -> Self {
        Self::pack(m.rows(), m.cols(), |r, row| m.row_codes(r, row))
    }

    /// Builds the layout from a source that writes row `r`'s `cols` codes into a slice.
    fn pack(rows: usize, cols: usize, row_codes: impl Fn(usize, &mut [i8]) + Sync) -> Self {
        let row_bytes = Self::blocks_per_row(cols) * BASE3_BLOCK_BYTES;
        let padded = TernaryMatrix::padded_rows(rows);
        let mut buf = AlignedBuffer::zeroed(padded * row_bytes);
        buf.as_mut_bytes().fill(BASE3_ZERO_BYTE);
        if row_bytes > 0 {
            buf.as_mut_bytes()
                .par_chunks_mut(ROW_GROUP * row_bytes)
                .enumerate()
                .for_each(|(g, group)| {
                    // One padded row of codes (weight 0 past `cols`), reused for the group.
                    let mut codes = vec![0i8; Self::padded_cols(cols)];
                    for i in 0..ROW_GROUP.min(rows.saturating_sub(g * ROW_GROUP)) {
                        row_codes(g * ROW_GROUP + i, &mut codes[..cols]);
                        for (b, block) in codes.chunks_exact(BASE3_BLOCK_ELEMS).enumerate() {
                            let at = block_offset(row_bytes, i, b);
                            for (j, byte) in
                                group[at..at + BASE3_BLOCK_BYTES].iter_mut().enumerate()
                            {
                                let v = (0..BASE3_DIGITS).fold(0, |v, d| {
                                    v * 3 + (block[d * BASE3_BLOCK_BYTES + j] + 1) as usize
                                });
                                *byte = ENCODED[v];
                            }
                        }
                    }
                });
        }
        Base3Matrix {
            rows,
            cols,
            data: Storage::heap(buf),
        }
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
        Self::blocks_per_row(self.cols) * BASE3_BLOCK_BYTES
    }

    /// The packed bytes, `padded_rows(rows) * row_bytes` of them, in row groups.
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    /// The codes of row `r` into `out` (`cols` of them).
    pub fn row_codes(&self, r: usize, out: &mut [i8]) {
        let rb = self.row_bytes();
        for (b, codes) in out[..self.cols].chunks_mut(BASE3_BLOCK_ELEMS).enumerate() {
            let at = block_offset(rb, r, b);
            let block = &self.bytes()[at..at + BASE3_BLOCK_BYTES];
            for (k, c) in codes.iter_mut().enumerate() {
                let d = decode_digits(block[k % BASE3_BLOCK_BYTES])[k / BASE3_BLOCK_BYTES];
                *c = d as i8 - 1;
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

    /// The same weights in the 2-bit layout.
    pub fn to_ternary(&self) -> TernaryMatrix {
        TernaryMatrix::from_codes(&self.to_codes(), self.rows, self.cols)
            .expect("decoded digits are ternary codes of the matrix's shape")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn digits_decode_exactly() {
        let mut seen = std::collections::HashSet::new();
        for v in 0..243u32 {
            let d: [u8; 5] = std::array::from_fn(|i| (v / 3u32.pow(4 - i as u32) % 3) as u8);
            let q = encode_digits(d);
            assert_eq!(decode_digits(q), d, "v = {v}, byte {q}");
            // The SIMD form: the digit is the count of thresholds m reaches, and the next m
            // is 3m modulo 256.
            let mut m = q;
            for (i, &di) in d.iter().enumerate() {
                assert_eq!((m >= 86) as u8 + (m >= 171) as u8, di, "v = {v} digit {i}");
                m = m.wrapping_mul(3);
            }
            assert!(seen.insert(q), "two values share byte {q}");
        }
        assert_eq!(encode_digits([1; 5]), BASE3_ZERO_BYTE);
    }

    #[test]
    fn block_layout_matches_the_doc() {
        // Element 0 is the first digit of byte 0, element 32 its second, 128 its fifth.
        let mut codes = vec![0i8; 170];
        codes[0] = 1;
        codes[32] = -1;
        codes[128] = 1;
        codes[165] = -1;
        let m = Base3Matrix::from_codes(&codes, 1, 170).unwrap();
        assert_eq!(m.row_bytes(), 64);
        assert_eq!(m.bytes().len(), 4 * 64, "a whole row group");
        assert_eq!(m.bytes()[0], encode_digits([2, 0, 1, 1, 2]));
        // Block 1 of row 0 follows block 0 of the group's four rows.
        assert_eq!(m.bytes()[4 * 32 + 5], encode_digits([0, 1, 1, 1, 1]));
        assert_eq!(m.bytes()[1], BASE3_ZERO_BYTE);
        assert!(m.bytes()[32..4 * 32].iter().all(|&b| b == BASE3_ZERO_BYTE));
        assert_eq!(Base3Matrix::padded_cols(170), 320);
        assert!(Base3Matrix::from_codes(&[2], 1, 1).is_err());
        assert!(Base3Matrix::from_codes(&[0; 3], 2, 2).is_err());
    }

    proptest! {
        #[test]
        fn codes_round_trip(rows in 1usize..7, cols in 1usize..400, seed in any::<u64>()) {
            let mut s = seed;
            let codes: Vec<i8> = (0..rows * cols).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) % 3) as i8 - 1
            }).collect();
            let m = Base3Matrix::from_codes(&codes, rows, cols).unwrap();
            prop_assert_eq!(&m.to_codes(), &codes);
            let two_bit = TernaryMatrix::from_codes(&codes, rows, cols).unwrap();
            let from_two_bit = Base3Matrix::from_ternary(&two_bit);
            prop_assert_eq!(from_two_bit.bytes(), m.bytes());
            let back = m.to_ternary();
            prop_assert_eq!(back.bytes(), two_bit.bytes());
        }
    }
}
