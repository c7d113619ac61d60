//! The Hugging Face packed BitNet layout (`linear_class: bitlinear`, FORMATS.md section 3).
//!
//! A `[out, in]` ternary matrix is stored as uint8 `[out/4, in]`: with `R = out/4`, byte
//! `(r, j)` holds the codes `t+1` of rows `r`, `R+r`, `2R+r`, `3R+r` in bits 0-1, 2-3, 4-5, 6-7.

use crate::{Error, Result};

/// Unpacks HF packed bytes into row-major ternary codes `[out, in]`.
///
/// `packed` must hold `out/4 * in` bytes and `out` must be a multiple of 4. The unused code 3
/// is an error: it means the tensor is not what its name claims.
pub fn unpack(packed: &[u8], out: usize, cols: usize) -> Result<Vec<i8>> {
    if !out.is_multiple_of(4) {
        return Err(Error::InvalidInput(format!(
            "HF packed weights need out_features divisible by 4, got {out}"
        )));
    }
    let r_rows = out / 4;
    if packed.len() != r_rows * cols {
        return Err(Error::InvalidInput(format!(
            "HF packed weights of shape [{out}, {cols}] need {} bytes, got {}",
            r_rows * cols,
            packed.len()
        )));
    }
    let mut codes = vec![0i8; out * cols];
    for (r, row) in packed.chunks_exact(cols.max(1)).enumerate().take(r_rows) {
        for (j, &b) in row.iter().enumerate() {
            for i in 0..4 {
                let c = (b >> (2 * i)) & 3;
                if c == 3 {
                    return Err(Error::InvalidInput(format!(
                        "HF packed byte ({r}, {j}) holds the unused code 3"
                    )));
                }
                codes[(i * r_rows + r) * cols + j] = c as i8 - 1;
            }
        }
    }
    Ok(codes)
}

/// Packs row-major ternary codes `[out, in]` into the HF layout (the inverse of [`unpack`]).
pub fn pack(codes: &[i8], out: usize, cols: usize) -> Result<Vec<u8>> {
    if !out.is_multiple_of(4) || codes.len() != out * cols {
        return Err(Error::InvalidInput(format!(
            "cannot pack {} codes as [{out}, {cols}] (out must be a multiple of 4)",
            codes.len()
        )));
    }
    let r_rows = out / 4;
    let mut packed = vec![0u8; r_rows * cols];
    for (idx, &t) in codes.iter().enumerate() {
        if !(-1..=1).contains(&t) {
            return Err(Error::InvalidInput(format!("code {t} is not ternary")));
        }
        let (row, j) = (idx / cols, idx % cols);
        let (i, r) = (row / r_rows, row % r_rows);
        packed[r * cols + j] |= ((t + 1) as u8) << (2 * i);
    }
    Ok(packed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_row_blocks() {
        // out = 4, in = 1: one byte holds rows 0..4 in bits 0-1, 2-3, 4-5, 6-7.
        let packed = [0b10_01_00_10u8];
        assert_eq!(unpack(&packed, 4, 1).unwrap(), vec![1, -1, 0, 1]);
        assert!(unpack(&[0b11], 4, 1).is_err());
        assert!(unpack(&[0; 3], 4, 1).is_err());
        assert!(unpack(&[0; 3], 3, 1).is_err());
    }

    proptest! {
        #[test]
        fn pack_unpack_round_trip(r in 1usize..8, cols in 1usize..40, seed in any::<u64>()) {
            let out = 4 * r;
            let mut s = seed;
            let codes: Vec<i8> = (0..out * cols).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) % 3) as i8 - 1
            }).collect();
            let packed = pack(&codes, out, cols).unwrap();
            prop_assert_eq!(unpack(&packed, out, cols).unwrap(), codes);
        }
    }
}
