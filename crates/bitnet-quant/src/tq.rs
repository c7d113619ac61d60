//! llama.cpp's ternary block formats TQ1_0 and TQ2_0 (FORMATS.md section 4).
//!
//! Both cut each row into blocks of 256 weights with one f16 scale `d`; weight = `(code - 1) * d`.
//! TQ2_0 stores 2-bit codes (66 bytes a block), TQ1_0 packs five trits per byte as a base-3
//! fraction (54 bytes a block, 1.69 bits a weight).

use bitnet_core::Storage;
use half::f16;
use rayon::prelude::*;

use crate::ternary::{
    block_offset, holds_code_3, position, BLOCK_BYTES, BLOCK_ELEMS, ROW_GROUP, ZERO_BYTE,
};
use crate::{Error, Result, TernaryMatrix};

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
    if !cols.is_multiple_of(TQ_BLOCK) {
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
    if !cols.is_multiple_of(TQ_BLOCK) || codes.len() != rows * cols {
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

/// A TQ tensor repacked straight into the runtime layout, with what the loader needs to
/// choose between one scale and per-block scales.
#[derive(Debug, Clone)]
pub struct RepackedTq {
    /// The codes, in the runtime layout.
    pub matrix: TernaryMatrix,
    /// The f16 scale `d` of each block, widened to f32, row-major `[rows, cols / 256]`.
    pub scales: Vec<f32>,
    /// Whether each block holds a non-zero weight (a block of zeros has no say in the step).
    pub nonzero: Vec<bool>,
}

/// Runtime bytes of a block of 256 weights: two runtime blocks of 128.
const RUNTIME_PAIR: usize = 2 * BLOCK_BYTES;

/// Repacks a TQ2_0 tensor into the runtime layout without going through one byte per weight.
///
/// The 32 bytes of each half of a TQ2_0 block hold the same 128 weights as a runtime block
/// (weight `32 l + m` in byte `m`, codes `t + 1`), only with the four 2-bit fields of each byte
/// in the opposite order, so each byte is mirrored pairwise.
pub fn repack_tq2_0(data: &[u8], rows: usize, cols: usize) -> Result<RepackedTq> {
    repack(data, rows, cols, TQ2_0_BYTES, |block, out| {
        for (o, &b) in out.iter_mut().zip(&block[..64]) {
            if holds_code_3(b) {
                return Err("the unused code 3");
            }
            *o = (b << 6) | ((b << 2) & 0b0011_0000) | ((b >> 2) & 0b0000_1100) | (b >> 6);
        }
        Ok(f16::from_le_bytes([block[64], block[65]]).to_f32())
    })
}

/// Repacks a TQ1_0 tensor into the runtime layout, one block of 256 weights at a time.
pub fn repack_tq1_0(data: &[u8], rows: usize, cols: usize) -> Result<RepackedTq> {
    repack(data, rows, cols, TQ1_0_BYTES, |block, out| {
        out.fill(0);
        for k in 0..TQ_BLOCK {
            let (byte, n) = tq1_position(k);
            // The trit is the code `t + 1` already.
            let c = trit(block[byte], n);
            let (at, shift) = position(k);
            out[(k / BLOCK_ELEMS) * BLOCK_BYTES + at] |= c << shift;
        }
        Ok(f16::from_le_bytes([block[52], block[53]]).to_f32())
    })
}

/// Shared driver of the repackers: `block_to_runtime` turns one stored block into the 64
/// runtime bytes of its 256 weights and returns its scale, or says what is wrong with it.
/// Row groups are independent, so they are repacked in parallel.
fn repack(
    data: &[u8],
    rows: usize,
    cols: usize,
    block_bytes: usize,
    block_to_runtime: impl Fn(&[u8], &mut [u8]) -> std::result::Result<f32, &'static str> + Sync,
) -> Result<RepackedTq> {
    let blocks = check_shape(data.len(), rows, cols, block_bytes)?;
    let per_row = cols / TQ_BLOCK;
    let row_bytes = TernaryMatrix::blocks_per_row(cols) * BLOCK_BYTES;
    let mut buf = TernaryMatrix::zero_weights(rows, cols);
    let mut scales = vec![0f32; blocks];
    let mut nonzero = vec![false; blocks];
    let group_blocks = (ROW_GROUP * per_row).max(1);
    buf.as_mut_bytes()
        .par_chunks_mut((ROW_GROUP * row_bytes).max(1))
        .zip(scales.par_chunks_mut(group_blocks))
        .zip(nonzero.par_chunks_mut(group_blocks))
        .enumerate()
        .try_for_each(|(g, ((group, scales), nonzero))| {
            let mut pair = [0u8; RUNTIME_PAIR];
            for (i, (scales, nonzero)) in scales
                .chunks_mut(per_row)
                .zip(nonzero.chunks_mut(per_row))
                .enumerate()
            {
                let r = g * ROW_GROUP + i;
                for b in 0..per_row {
                    let at = (r * per_row + b) * block_bytes;
                    let block = &data[at..at + block_bytes];
                    scales[b] = block_to_runtime(block, &mut pair).map_err(|what| {
                        Error::InvalidInput(format!(
                            "block {} (row {r}) holds {what}",
                            r * per_row + b
                        ))
                    })?;
                    nonzero[b] = pair.iter().any(|&v| v != ZERO_BYTE);
                    for (h, half) in pair.chunks_exact(BLOCK_BYTES).enumerate() {
                        let o = block_offset(row_bytes, i, 2 * b + h);
                        group[o..o + BLOCK_BYTES].copy_from_slice(half);
                    }
                }
            }
            Ok::<(), Error>(())
        })?;
    Ok(RepackedTq {
        matrix: TernaryMatrix::from_storage(Storage::heap(buf), rows, cols)?,
        scales,
        nonzero,
    })
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

    /// The repacked matrix holds the decoded codes, with the same scales.
    fn check_repack(r: &RepackedTq, d: &BlockTernary) {
        assert_eq!(r.matrix.to_codes(), d.codes);
        assert_eq!(r.scales, d.scales);
        let nz: Vec<bool> = d
            .codes
            .chunks_exact(TQ_BLOCK)
            .map(|c| c.iter().any(|&v| v != 0))
            .collect();
        assert_eq!(r.nonzero, nz);
    }

    #[test]
    fn repacking_equals_decoding() {
        for (rows, blocks) in [(1, 1), (3, 2), (5, 1), (8, 3)] {
            let cols = blocks * TQ_BLOCK;
            let mut s = (rows * 31 + blocks) as u64;
            let mut codes: Vec<i8> = (0..rows * cols)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 33) % 3) as i8 - 1
                })
                .collect();
            // One all-zero block, whose scale must not count.
            codes[..TQ_BLOCK].fill(0);
            let scales: Vec<f32> = (0..rows * blocks).map(|i| 0.5 + i as f32).collect();
            let tq2 = encode_tq2_0(&codes, &scales, rows, cols).unwrap();
            check_repack(
                &repack_tq2_0(&tq2, rows, cols).unwrap(),
                &decode_tq2_0(&tq2, rows, cols).unwrap(),
            );
            let tq1 = encode_tq1_0(&codes, &scales, rows, cols).unwrap();
            check_repack(
                &repack_tq1_0(&tq1, rows, cols).unwrap(),
                &decode_tq1_0(&tq1, rows, cols).unwrap(),
            );
        }
        // Code 3 is refused, naming the block; so are bad shapes.
        let mut tq2 = encode_tq2_0(&[0i8; 512], &[1.0, 1.0], 1, 512).unwrap();
        tq2[66 + 5] = 0b11;
        let e = repack_tq2_0(&tq2, 1, 512).unwrap_err().to_string();
        assert!(e.contains("block 1") && e.contains("code 3"), "{e}");
        assert!(repack_tq2_0(&tq2[..65], 1, 256).is_err());
        assert!(repack_tq1_0(&tq2, 1, 128).is_err());
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
