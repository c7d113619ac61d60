//! The model's float operations, written to follow the reference's f32 arithmetic order.

use bitnet_quant::kernels::{inv_rms, scalar};

/// RMSNorm: `y = w * (x * rsqrt(mean(x^2) + eps))`, with the `r` of the layers' fused
/// RMSNorm and quantizer ([`bitnet_quant::kernels::RmsNormQuantizeFn`]).
///
/// The sum of squares is accumulated in f64 and rounded once, which gives the correctly rounded
/// mean that PyTorch's cascaded f32 reduction reaches in practice.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let r = inv_rms(scalar::sum_squares(x), x.len(), eps);
    for ((o, &xi), &wi) in y.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * r);
    }
}

/// The inverse frequencies of rotate-half RoPE: `1 / theta^(2i / d)` for `i < d/2`, in f32
/// like transformers' default rotary embedding.
pub fn rope_inv_freq(theta: f32, head_dim: usize, out: &mut [f32]) {
    for (i, f) in out.iter_mut().enumerate() {
        let e = (2 * i) as f32 / head_dim as f32;
        *f = 1.0 / ((theta as f64).powf(e as f64) as f32);
    }
}

/// Writes `cos` and `sin` of the RoPE angles of position `pos` into `cs` (`[cos.., sin..]`,
/// `d/2` each).
pub fn rope_angles(inv_freq: &[f32], pos: usize, cs: &mut [f32]) {
    let half = inv_freq.len();
    let (c, s) = cs.split_at_mut(half);
    for ((ci, si), &f) in c.iter_mut().zip(s.iter_mut()).zip(inv_freq) {
        let a = pos as f32 * f;
        *ci = (a as f64).cos() as f32;
        *si = (a as f64).sin() as f32;
    }
}

/// Rotates one head in place: `x' = x * cos + rotate_half(x) * sin` with
/// `rotate_half(x) = [-x2, x1]` (NeoX convention, no Q/K permutation).
pub fn rope_apply(x: &mut [f32], cs: &[f32]) {
    let half = x.len() / 2;
    let (c, s) = cs.split_at(half);
    let (x1, x2) = x.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (x1[i], x2[i]);
        x1[i] = a * c[i] + (-b) * s[i];
        x2[i] = b * c[i] + a * s[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_closed_form() {
        let x = [3.0f32, 4.0];
        let mut y = [0.0; 2];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut y);
        // mean(x^2) = 12.5, rsqrt = 0.28284...
        let r = 1.0 / 12.5f32.sqrt();
        assert_eq!(y, [3.0 * r, 2.0 * (4.0 * r)]);
    }

    #[test]
    fn rope_rotates_pairs_and_preserves_norm() {
        let mut f = [0.0f32; 2];
        rope_inv_freq(10000.0, 4, &mut f);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 0.01).abs() < 1e-9);
        let mut cs = [0.0f32; 4];
        rope_angles(&f, 0, &mut cs);
        assert_eq!(cs, [1.0, 1.0, 0.0, 0.0]);
        rope_angles(&f, 3, &mut cs);
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        rope_apply(&mut x, &cs);
        // Pair (x0, x2) rotated by 3 rad, pair (x1, x3) by 0.03 rad.
        assert!((x[0] - (3f32.cos() - 3.0 * 3f32.sin())).abs() < 1e-6);
        assert!((x[2] - (3.0 * 3f32.cos() + 3f32.sin())).abs() < 1e-6);
        let n: f32 = x.iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-4);
    }
}
