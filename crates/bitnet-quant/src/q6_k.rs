//! ggml's Q6_K block format, the type llama.cpp's quantizer gives output heads and tied
//! embeddings: super-blocks of 256 values in 210 bytes (6.5625 bits per value).
//!
//! A block holds `ql[128]` (low four bits), `qh[64]` (high two bits), 16 int8 `scales` (one per
//! 16 values) and an f16 `d`. Value `i = 128 h + 32 m + l` (`h < 2`, `m < 4`, `l < 32`) has
//! the 6-bit code `c = nibble | (bits << 4)`, where `nibble` is the low (`m < 2`) or high
//! (`m >= 2`) half of `ql[64 h + 32 (m mod 2) + l]` and `bits` is bits `2m, 2m + 1` of
//! `qh[32 h + l]`; the value is `d * scales[i / 16] * (c - 32)`. So every 32 values `(h, m)`
//! come from one 32-byte run of `ql` and one of `qh`, which the kernels load whole.

use half::f16;

use crate::{Error, Result};

/// Values per super-block.
pub const Q6_K_BLOCK: usize = 256;
/// Bytes per super-block.
pub const Q6_K_BYTES: usize = 210;
/// Offset of `qh` in a block.
const QH: usize = 128;
/// Offset of the scales in a block.
const SCALES: usize = 192;
/// Offset of `d` in a block.
const D: usize = 208;

/// The super-block scale `d` of a block.
#[inline]
pub fn block_d(blk: &[u8]) -> f32 {
    f16::from_le_bytes([blk[D], blk[D + 1]]).to_f32()
}

/// The 16 sub-block scales of a block.
#[inline]
pub fn block_scales(blk: &[u8]) -> &[u8] {
    &blk[SCALES..SCALES + 16]
}

/// The signed 6-bit codes (`c - 32`, in `[-32, 31]`) of the 32 values of run `run = 4 h + m`
/// (values `32 run..32 run + 32`) of a block.
#[inline]
pub fn run_codes(blk: &[u8], run: usize) -> [i8; 32] {
    let (h, m) = (run / 4, run % 4);
    let ql = &blk[64 * h + 32 * (m % 2)..][..32];
    let qh = &blk[QH + 32 * h..][..32];
    std::array::from_fn(|l| {
        let nibble = if m < 2 { ql[l] & 0x0f } else { ql[l] >> 4 };
        let bits = (qh[l] >> (2 * m)) & 3;
        (nibble | (bits << 4)) as i8 - 32
    })
}

/// Decodes whole blocks into `out` (`256` values per block): `d * scale * (c - 32)`, the scale
/// product rounded first as ggml does.
pub fn dequantize_q6_k(blocks: &[u8], out: &mut [f32]) {
    for (blk, o) in blocks
        .chunks_exact(Q6_K_BYTES)
        .zip(out.chunks_exact_mut(Q6_K_BLOCK))
    {
        let d = block_d(blk);
        let scales = block_scales(blk);
        for (run, o) in o.chunks_exact_mut(32).enumerate() {
            let codes = run_codes(blk, run);
            for (half, (o, c)) in o
                .chunks_exact_mut(16)
                .zip(codes.chunks_exact(16))
                .enumerate()
            {
                let s = d * (scales[2 * run + half] as i8) as f32;
                for (v, &q) in o.iter_mut().zip(c) {
                    *v = s * q as f32;
                }
            }
        }
    }
}

/// Quantizes `x` (a multiple of 256 values) to Q6_K: each 16 values get the scale that maps
/// their largest magnitude to code -32 (sign included, so that value uses the longer side of
/// `[-32, 31]`), stored as an int8 multiple of `d >= max|scale| / 127` rounded away from zero,
/// so no value falls outside the codes; each value takes the nearest code under its stored
/// scale (within half a step, or one step for a value of the opposite sign as large as the
/// extreme, which code +32 would need). llama.cpp searches nearby scales for the least squared
/// error instead; this is the plain rounding.
pub fn quantize_q6_k(x: &[f32]) -> Result<Vec<u8>> {
    if !x.len().is_multiple_of(Q6_K_BLOCK) {
        return Err(Error::InvalidInput(format!(
            "Q6_K needs a multiple of {Q6_K_BLOCK} values, got {}",
            x.len()
        )));
    }
    let mut out = vec![0u8; x.len() / Q6_K_BLOCK * Q6_K_BYTES];
    for (v, blk) in x
        .chunks_exact(Q6_K_BLOCK)
        .zip(out.chunks_exact_mut(Q6_K_BYTES))
    {
        let sub: [f32; 16] = std::array::from_fn(|s| {
            let m = v[16 * s..16 * s + 16]
                .iter()
                .fold(0f32, |m, &a| if a.abs() > m.abs() { a } else { m });
            m / -32.0
        });
        let smax = sub.iter().fold(0f32, |m, &s| m.max(s.abs()));
        let mut d = f16::from_f32(smax / 127.0);
        if d.to_f32() * 127.0 < smax {
            d = f16::from_bits(d.to_bits() + 1); // the next f16 up: scales stay within 127 steps
        }
        blk[D..D + 2].copy_from_slice(&d.to_le_bytes());
        let d = d.to_f32();
        let mut codes = [0u8; Q6_K_BLOCK];
        for (s, &sv) in sub.iter().enumerate() {
            let sc = if d > 0.0 {
                ((sv.abs() / d).ceil().min(127.0) * sv.signum()) as i8
            } else {
                0
            };
            blk[SCALES + s] = sc as u8;
            let step = d * sc as f32;
            for (c, &a) in codes[16 * s..16 * s + 16]
                .iter_mut()
                .zip(&v[16 * s..16 * s + 16])
            {
                let q = if step != 0.0 { (a / step).round() } else { 0.0 };
                *c = (q.clamp(-32.0, 31.0) as i32 + 32) as u8;
            }
        }
        for (i, &c) in codes.iter().enumerate() {
            let (h, m, l) = (i / 128, (i / 32) % 4, i % 32);
            let ql = 64 * h + 32 * (m % 2) + l;
            blk[ql] |= if m < 2 { c & 0x0f } else { (c & 0x0f) << 4 };
            blk[QH + 32 * h + l] |= (c >> 4) << (2 * m);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block whose bytes follow a fixed pattern, with `d` = 0.5.
    fn pattern_block() -> Vec<u8> {
        let mut b: Vec<u8> = (0..Q6_K_BYTES)
            .map(|i| ((i * 37 + 11) % 256) as u8)
            .collect();
        b[D..D + 2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b
    }

    /// Values of [`pattern_block`] as gguf-py 0.19 (`gguf.quants.dequantize`, the Python
    /// reader of llama.cpp's project) decodes them: one index in each run of 32, both nibble
    /// halves and all four `qh` bit pairs.
    #[test]
    fn decoding_matches_gguf_py() {
        let want: [(usize, f32); 10] = [
            (0, -715.5),
            (17, 256.0),
            (40, -304.5),
            (70, 665.0),
            (100, 1261.5),
            (127, 750.0),
            (128, -175.5),
            (170, 884.5),
            (200, 544.5),
            (255, -30.0),
        ];
        let mut out = [0f32; Q6_K_BLOCK];
        dequantize_q6_k(&pattern_block(), &mut out);
        for (i, v) in want {
            assert_eq!(out[i], v, "value {i}");
        }
    }

    #[test]
    fn quantized_values_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..2 * Q6_K_BLOCK)
            .map(|i| {
                ((i * 7919 % 1000) as f32 - 500.0) * 0.003 * if i % 37 == 0 { 8.0 } else { 1.0 }
            })
            .collect();
        let b = quantize_q6_k(&x).unwrap();
        assert_eq!(b.len(), 2 * Q6_K_BYTES);
        let mut y = vec![0f32; x.len()];
        dequantize_q6_k(&b, &mut y);
        for (blk, (xb, yb)) in b
            .chunks_exact(Q6_K_BYTES)
            .zip(x.chunks_exact(Q6_K_BLOCK).zip(y.chunks_exact(Q6_K_BLOCK)))
        {
            let d = block_d(blk);
            for (s, (xs, ys)) in xb.chunks_exact(16).zip(yb.chunks_exact(16)).enumerate() {
                let step = (d * (block_scales(blk)[s] as i8) as f32).abs();
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                // The step covers the extreme and exceeds amax / 32 by at most one step of d.
                assert!(
                    step * 32.0 >= amax && step - amax / 32.0 <= d * 1.001,
                    "sub-block {s}"
                );
                for (a, b) in xs.iter().zip(ys) {
                    let bound = if (a / step).abs() <= 31.5 { 0.5 } else { 1.0 };
                    assert!((a - b).abs() <= step * bound * 1.0001, "{a} vs {b}");
                }
            }
        }
        assert!(quantize_q6_k(&[0.0; 255]).is_err());
        let zero = quantize_q6_k(&[0.0; 256]).unwrap();
        let mut z = [1f32; 256];
        dequantize_q6_k(&zero, &mut z);
        assert!(z.iter().all(|&v| v == 0.0));
    }
}
