//! bitnet.cpp's I2_S format (FORMATS.md section 4): 2-bit codes `w + 1` over the whole tensor
//! (rows end to end), then one f32 scale in the 32 bytes after the `n / 4` code bytes.
//!
//! The block layout depends on the build that wrote the file, and the type id does not say
//! which: x86 builds use blocks of 128 weights in 32 bytes (byte `j` holds weights `j`, `j+32`,
//! `j+64`, `j+96` in bits 7-6, 5-4, 3-2, 1-0), ARM builds blocks of 64 weights in 16 bytes
//! (byte `j` holds `j`, `j+16`, `j+32`, `j+48`).

use crate::{Error, Result};

/// Which bitnet.cpp build's block layout an I2_S tensor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum I2sLayout {
    /// x86 builds (the official 2B-4T file): 128 weights per 32-byte block.
    #[default]
    X86,
    /// ARM builds: 64 weights per 16-byte block.
    Arm,
}

impl I2sLayout {
    /// Weights per block.
    pub const fn block_elems(self) -> usize {
        match self {
            I2sLayout::X86 => 128,
            I2sLayout::Arm => 64,
        }
    }

    /// Parses `x86` or `arm`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "x86" => Ok(I2sLayout::X86),
            "arm" => Ok(I2sLayout::Arm),
            other => Err(Error::InvalidInput(format!(
                "unknown I2_S layout `{other}` (expected x86 or arm)"
            ))),
        }
    }

    /// Byte within the block and bit shift of weight `k` of a block.
    #[inline]
    fn position(self, k: usize) -> (usize, u32) {
        let group = self.block_elems() / 4;
        (k % group, 6 - 2 * (k / group) as u32)
    }
}

fn check_len(n: usize, layout: I2sLayout) -> Result<()> {
    if !n.is_multiple_of(layout.block_elems()) {
        return Err(Error::InvalidInput(format!(
            "an I2_S tensor ({layout:?} layout) needs a multiple of {} weights, got {n}",
            layout.block_elems()
        )));
    }
    Ok(())
}

/// Decodes the `n / 4` code bytes of an I2_S tensor of `n` weights into codes in {-1, 0, 1}.
pub fn decode_i2s(codes_bytes: &[u8], n: usize, layout: I2sLayout) -> Result<Vec<i8>> {
    check_len(n, layout)?;
    if codes_bytes.len() != n / 4 {
        return Err(Error::InvalidInput(format!(
            "an I2_S tensor of {n} weights has {} code bytes, got {}",
            n / 4,
            codes_bytes.len()
        )));
    }
    let be = layout.block_elems();
    let mut out = vec![0i8; n];
    for (b, (block, dst)) in codes_bytes
        .chunks_exact(be / 4)
        .zip(out.chunks_exact_mut(be))
        .enumerate()
    {
        for (k, o) in dst.iter_mut().enumerate() {
            let (byte, shift) = layout.position(k);
            let c = (block[byte] >> shift) & 3;
            if c == 3 {
                return Err(Error::InvalidInput(format!(
                    "I2_S block {b} holds the unused code 3 (is the layout {layout:?} right?)"
                )));
            }
            *o = c as i8 - 1;
        }
    }
    Ok(out)
}

/// Encodes codes in {-1, 0, 1} as I2_S code bytes (`n / 4` of them, without the scale).
pub fn encode_i2s(codes: &[i8], layout: I2sLayout) -> Result<Vec<u8>> {
    check_len(codes.len(), layout)?;
    let be = layout.block_elems();
    let mut out = vec![0u8; codes.len() / 4];
    for (dst, src) in out.chunks_exact_mut(be / 4).zip(codes.chunks_exact(be)) {
        for (k, &t) in src.iter().enumerate() {
            if !(-1..=1).contains(&t) {
                return Err(Error::InvalidInput(format!("code {t} is not ternary")));
            }
            let (byte, shift) = layout.position(k);
            dst[byte] |= ((t + 1) as u8) << shift;
        }
    }
    Ok(out)
}

/// The 32-byte I2_S trailer holding `scale` (little-endian f32, then zeros).
pub fn i2s_trailer(scale: f32) -> [u8; 32] {
    let mut t = [0u8; 32];
    t[..4].copy_from_slice(&scale.to_le_bytes());
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layouts_match_bitnet_cpp_by_hand() {
        // x86: weight j -> byte j bits 7-6, weight j+32 -> bits 5-4, j+96 -> bits 1-0.
        let mut codes = vec![0i8; 128];
        codes[0] = 1;
        codes[32] = -1;
        codes[97] = 1;
        let b = encode_i2s(&codes, I2sLayout::X86).unwrap();
        assert_eq!(b.len(), 32);
        assert_eq!(b[0], 0b10_00_01_01);
        assert_eq!(b[1], 0b01_01_01_10);
        assert_eq!(b[2], 0b0101_0101);
        // ARM: weight j -> byte j bits 7-6, j+16 -> bits 5-4; 64 weights per 16 bytes.
        let b = encode_i2s(&codes, I2sLayout::Arm).unwrap();
        assert_eq!(b.len(), 32);
        // Byte 0 holds weights 0 (+1), 16 (0), 32 (-1), 48 (0).
        assert_eq!(b[0], 0b10_01_00_01);
        assert_eq!(decode_i2s(&b, 128, I2sLayout::Arm).unwrap(), codes);
        assert!(decode_i2s(&b, 64, I2sLayout::Arm).is_err());
        assert!(encode_i2s(&[0; 100], I2sLayout::X86).is_err());
        assert!(decode_i2s(&[0xff; 32], 128, I2sLayout::X86).is_err());
    }

    proptest! {
        #[test]
        fn i2s_round_trips(blocks in 1usize..6, arm in any::<bool>(), seed in any::<u64>()) {
            let layout = if arm { I2sLayout::Arm } else { I2sLayout::X86 };
            let n = blocks * layout.block_elems();
            let mut s = seed;
            let codes: Vec<i8> = (0..n).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) % 3) as i8 - 1
            }).collect();
            let b = encode_i2s(&codes, layout).unwrap();
            prop_assert_eq!(decode_i2s(&b, n, layout).unwrap(), codes);
        }
    }
}
