//! ggml's Q8_0 block format (blocks of 32 int8 values with one f16 scale, 34 bytes), used for
//! embeddings and output heads.

use half::f16;

use crate::{Error, Result};

/// Values per block.
pub const Q8_0_BLOCK: usize = 32;
/// Bytes per block.
pub const Q8_0_BYTES: usize = 34;

/// Quantizes `x` (a multiple of 32 values) as ggml does: `d = max|x| / 127`,
/// `q = round(x / d)` with halves away from zero, `d` stored as f16.
pub fn quantize_q8_0(x: &[f32]) -> Result<Vec<u8>> {
    if !x.len().is_multiple_of(Q8_0_BLOCK) {
        return Err(Error::InvalidInput(format!(
            "Q8_0 needs a multiple of {Q8_0_BLOCK} values, got {}",
            x.len()
        )));
    }
    let mut out = Vec::with_capacity(x.len() / Q8_0_BLOCK * Q8_0_BYTES);
    for block in x.chunks_exact(Q8_0_BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    Ok(out)
}

/// Quantizes the activations a Q8_0 head multiplies, block by block of 32 values: `d[b] =
/// max|x| / 127` (kept in f32, unlike the stored weights' f16), `q = round(x / d)`, halves to
/// even, in `[-127, 127]` (the kernels rely on that range). `x` must be `32 * d.len()` long
/// and `q` as long as `x`.
pub fn quantize_q8_0_activations(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    debug_assert_eq!(x.len(), Q8_0_BLOCK * d.len());
    for ((xb, qb), db) in x
        .chunks_exact(Q8_0_BLOCK)
        .zip(q.chunks_exact_mut(Q8_0_BLOCK))
        .zip(d.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        *db = amax / 127.0;
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (qv, &v) in qb.iter_mut().zip(xb) {
            *qv = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_blocks_scale_by_absmax() {
        let mut x = [0f32; 64];
        x[0] = -2.54;
        x[1] = 1.27;
        x[2] = 0.01; // 0.5 after scaling: to even, 0
        x[3] = 0.03; // 1.5: to even, 2
        let (mut q, mut d) = ([0i8; 64], [0f32; 2]);
        quantize_q8_0_activations(&x, &mut q, &mut d);
        assert_eq!(d, [2.54 / 127.0, 0.0]);
        assert_eq!(&q[..4], &[-127, 64, 0, 2]);
        assert!(q[32..].iter().all(|&v| v == 0));
    }

    #[test]
    fn blocks_scale_by_absmax() {
        let mut x = [0f32; 32];
        x[0] = 1.27;
        x[1] = -0.635;
        x[2] = 0.005; // rounds half away from zero: 0.5 -> 1
        let b = quantize_q8_0(&x).unwrap();
        assert_eq!(b.len(), 34);
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        assert!((d - 0.01).abs() < 1e-5);
        assert_eq!(b[2] as i8, 127);
        assert_eq!(b[3] as i8, -64);
        assert_eq!(b[4] as i8, 1);
        assert!(quantize_q8_0(&[0.0; 31]).is_err());
        assert!(quantize_q8_0(&[0.0; 32]).unwrap()[2..]
            .iter()
            .all(|&q| q == 0));
    }
}
