//! llama.cpp's ternary block formats TQ1_0 and TQ2_0 (FORMATS.md section 4).
//!
//! Both cut each row into blocks of 256 weights with one f16 scale `d`; weight = `(code - 1) * d`.
//! TQ2_0 stores 2-bit codes (66 bytes a block), TQ1_0 packs five trits per byte as a base-3
//! fraction (54 bytes a block, 1.69 bits a weight).

use half::f16;

use crate::{Error, Result};

/// Weights per TQ block.
pub const TQ_BLOCK: usize = 256;
/// Bytes per TQ2_0 block.
pub const TQ2_0_BYTES: usize = 66;
/// Bytes per TQ1_0 block.
pub const TQ1_0_BYTES: usize = 54;

/// Ternary codes with one scale per block of 256, as stored in a TQ tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockTernary {
    /// Codes in {-1, 0, 1}, row-major `[rows, cols]`.
    pub codes: Vec<i8>,
    /// The f16 scale `d` of each block, widened to f32, row-major `[rows, cols / 256]`.
    pub scales: Vec<f32>,
}

fn check_shape(data_len: usize, rows: usize, cols: usize, block_bytes: usize) -> Result<usize> {
    if cols % TQ_BLOCK != 0 {
        return Err(Error::InvalidInput(format!(
            "TQ tensors need rows that are whole blocks of {TQ_BLOCK}, got {cols}"
        )));
    }
    let blocks = rows
        .checked_mul(cols / TQ_BLOCK)
        .ok_or_else(|| Error::InvalidInput("TQ tensor shape overflows".into()))?;
    if data_len != blocks * block_bytes {
        return Err(Error::InvalidInput(format!(
            "a [{rows}, {cols}] TQ tensor takes {} bytes, got {data_len}",
            blocks * block_bytes
        )));
    }
    Ok(blocks)
}

/// Position of weight `k` (0..256) of a TQ2_0 block: byte of `qs` and bit shift.
#[inline]
fn tq2_position(k: usize) -> (usize, usize) {
    let (g, l, m) = (k / 128, (k % 128) / 32, k % 32);
    (32 * g + m, 2 * l)
}

/// Decodes a TQ2_0 tensor of `rows` rows of `cols` weights.
pub fn decode_tq2_0(data: &[u8], rows: usize, cols: usize) -> Result<BlockTernary> {
    let blocks = check_shape(data.len(), rows, cols, TQ2_0_BYTES)?;
    let mut codes = vec![0i8; blocks * TQ_BLOCK];
    let mut scales = Vec::with_capacity(blocks);
    for (b, (block, out)) in data
        .chunks_exact(TQ2_0_BYTES)
        .zip(codes.chunks_exact_mut(TQ_BLOCK))
        .enumerate()
    {
        let qs = &block[..64];
        for (k, o) in out.iter_mut().enumerate() {
            let (byte, shift) = tq2_position(k);
            let c = (qs[byte] >> shift) & 3;
            if c == 3 {
                return Err(Error::InvalidInput(format!(
                    "TQ2_0 block {b} holds the unused code 3 at weight {k}"
                )));
            }
            *o = c as i8 - 1;
        }
        scales.push(f16::from_le_bytes([block[64], block[65]]).to_f32());
    }
    Ok(BlockTernary { codes, scales })
}

/// Encodes codes (row-major `[rows, cols]`) with one scale per block as TQ2_0; scales are
/// rounded to f16.
pub fn encode_tq2_0(codes: &[i8], scales: &[f32], rows: usize, cols: usize) -> Result<Vec<u8>> {
    let blocks = check_encode(codes, scales, rows, cols)?;
    let mut out = vec![0u8; blocks * TQ2_0_BYTES];
    for ((dst, src), &d) in out
        .chunks_exact_mut(TQ2_0_BYTES)
        .zip(codes.chunks_exact(TQ_BLOCK))
        .zip(scales)
    {
        for (k, &t) in src.iter().enumerate() {
            let (byte, shift) = tq2_position(k);
            dst[byte] |= ((t + 1) as u8) << shift;
        }
        dst[64..66].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    }
    Ok(out)
}

fn check_encode(codes: &[i8], scales: &[f32], rows: usize, cols: usize) -> Result<usize> {
    if cols % TQ_BLOCK != 0 || codes.len() != rows * cols {
        return Err(Error::InvalidInput(format!(
            "cannot encode {} codes as a TQ tensor of [{rows}, {cols}] (rows must be whole \
             blocks of {TQ_BLOCK})",
            codes.len()
        )));
    }
    let blocks = rows * cols / TQ_BLOCK;
    if scales.len() != blocks {
        return Err(Error::InvalidInput(format!(
            "{} block scales given for {blocks} blocks",
            scales.len()
        )));
    }
    if let Some(&t) = codes.iter().find(|t| !(-1..=1).contains(*t)) {
        return Err(Error::InvalidInput(format!("code {t} is not ternary")));
    }
    Ok(blocks)
}

/// Trit `n` (0 = most significant) of a TQ1_0 byte: the byte is a base-3 fraction, so
/// multiplying by 3^n (wrapping in u8) shifts the wanted trit to the top, and `* 3 >> 8` reads it.
#[inline]
fn trit(byte: u8, n: usize) -> u8 {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    ((byte.wrapping_mul(POW3[n]) as u16 * 3) >> 8) as u8
}

/// Packs up to five trits (most significant first) into one TQ1_0 byte.
#[inline]
fn pack_trits(trits: &[u8]) -> u8 {
    let mut v: u16 = 0;
    for n in 0..5 {
        v = v * 3 + trits.get(n).copied().unwrap_or(0) as u16;
    }
    // ceil(v * 256 / 243): the byte is the smallest fraction at or above v / 243.
    (v * 256).div_ceil(243) as u8
}

/// For weight `k` (0..256) of a TQ1_0 block: the byte within the block and the trit index.
#[inline]
fn tq1_position(k: usize) -> (usize, usize) {
    if k < 160 {
        (k % 32, k / 32)
    } else if k < 240 {
        (32 + (k - 160) % 16, (k - 160) / 16)
    } else {
        (48 + (k - 240) % 4, (k - 240) / 4)
    }
}

/// Decodes a TQ1_0 tensor of `rows` rows of `cols` weights.
pub fn decode_tq1_0(data: &[u8], rows: usize, cols: usize) -> Result<BlockTernary> {
    let blocks = check_shape(data.len(), rows, cols, TQ1_0_BYTES)?;
    let mut codes = vec![0i8; blocks * TQ_BLOCK];
    let mut scales = Vec::with_capacity(blocks);
    for (block, out) in data
        .chunks_exact(TQ1_0_BYTES)
        .zip(codes.chunks_exact_mut(TQ_BLOCK))
    {
        for (k, o) in out.iter_mut().enumerate() {
            let (byte, n) = tq1_position(k);
            *o = trit(block[byte], n) as i8 - 1;
        }
        scales.push(f16::from_le_bytes([block[52], block[53]]).to_f32());
    }
    Ok(BlockTernary { codes, scales })
}

/// Encodes codes (row-major `[rows, cols]`) with one scale per block as TQ1_0; scales are
/// rounded to f16.
pub fn encode_tq1_0(codes: &[i8], scales: &[f32], rows: usize, cols: usize) -> Result<Vec<u8>> {
    let blocks = check_encode(codes, scales, rows, cols)?;
    let mut out = vec![0u8; blocks * TQ1_0_BYTES];
    for ((dst, src), &d) in out
        .chunks_exact_mut(TQ1_0_BYTES)
        .zip(codes.chunks_exact(TQ_BLOCK))
        .zip(scales)
    {
        let mut trits = [[0u8; 5]; 52];
        for (k, &t) in src.iter().enumerate() {
            let (byte, n) = tq1_position(k);
            trits[byte][n] = (t + 1) as u8;
        }
        for (o, t) in dst[..52].iter_mut().zip(&trits) {
            *o = pack_trits(t);
        }
        dst[52..54].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_five_trit_byte_decodes_back() {
        for v in 0..243u16 {
            let digits: Vec<u8> = (0..5).map(|n| ((v / 3u16.pow(4 - n)) % 3) as u8).collect();
            let b = pack_trits(&digits);
            for (n, &d) in digits.iter().enumerate() {
                assert_eq!(trit(b, n), d, "value {v} trit {n}");
            }
        }
    }

    #[test]
    fn positions_cover_each_slot_once() {
        let mut seen1 = [[false; 5]; 52];
        let mut seen2 = [[false; 8]; 64];
        for k in 0..TQ_BLOCK {
            let (b, n) = tq1_position(k);
            assert!(!seen1[b][n]);
            seen1[b][n] = true;
            let (b, s) = tq2_position(k);
            assert!(!seen2[b][s]);
            seen2[b][s] = true;
        }
        // qh bytes carry 4 trits each, the last trit stays zero.
        assert!(seen1[48..]
            .iter()
            .all(|b| !b[4] && b[..4].iter().all(|&x| x)));
    }

    #[test]
    fn tq2_layout_matches_the_spec() {
        // Weight 0 -> qs[0] bits 0-1, weight 32 -> bits 2-3, 64 -> 4-5, 96 -> 6-7;
        // weight 128 -> qs[32] bits 0-1.
        let mut codes = vec![0i8; 256];
        codes[0] = 1;
        codes[32] = -1;
        codes[128] = 1;
        let bytes = encode_tq2_0(&codes, &[0.5], 1, 256).unwrap();
        assert_eq!(bytes[0], 0b01_01_00_10);
        assert_eq!(bytes[32], 0b01_01_01_10);
        assert_eq!(&bytes[64..66], &f16::from_f32(0.5).to_le_bytes());
        assert!(decode_tq2_0(&bytes[..65], 1, 256).is_err());
        assert!(decode_tq2_0(&bytes, 1, 128).is_err());
    }

    proptest! {
        #[test]
        fn tq_round_trips(rows in 1usize..4, blocks in 1usize..3, seed in any::<u64>()) {
            let cols = blocks * TQ_BLOCK;
            let mut s = seed;
            let codes: Vec<i8> = (0..rows * cols).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) % 3) as i8 - 1
            }).collect();
            let scales: Vec<f32> = (0..rows * blocks).map(|i| 0.01 * (i + 1) as f32).collect();
            let rounded: Vec<f32> = scales.iter().map(|&d| f16::from_f32(d).to_f32()).collect();
            let want = BlockTernary { codes: codes.clone(), scales: rounded };
            let b2 = encode_tq2_0(&codes, &scales, rows, cols).unwrap();
            prop_assert_eq!(b2.len(), rows * blocks * TQ2_0_BYTES);
            prop_assert_eq!(decode_tq2_0(&b2, rows, cols).unwrap(), want.clone());
            let b1 = encode_tq1_0(&codes, &scales, rows, cols).unwrap();
            prop_assert_eq!(b1.len(), rows * blocks * TQ1_0_BYTES);
            prop_assert_eq!(decode_tq1_0(&b1, rows, cols).unwrap(), want);
        }
    }
}
