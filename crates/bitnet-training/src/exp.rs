//! The exponential of the softmaxes (attention, cross-entropy), vectorizable.

/// `e^x` for `x <= 0` (a softmax's shifted scores), within 2 ulp of [`f32::exp`] down to
/// `e^-87`, and `e^-87` (1.6e-38) below it (which no probability notices). Unlike `f32::exp`, a libm call
/// per value, it is branch-free arithmetic the compiler vectorizes: `x = n ln 2 + r` with `n`
/// rounded by the `1.5 * 2^23` trick and `ln 2` split in two (Cody and Waite) so `r` is exact,
/// then a degree-7 Taylor polynomial of `e^r` (`|r| <= ln 2 / 2`), scaled by `2^n` built in the
/// exponent bits.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 355 / 512: n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.max(-87.0);
    let shifted = x * LOG2E + MAGIC;
    let n = shifted - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // The low bits of `shifted` hold `n` (offset by MAGIC's): `n + 127` in the exponent field.
    let n_bits = shifted.to_bits().wrapping_sub(MAGIC.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = 0f32;
        while x > -87.0 {
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x -= 0.000_731;
        }
        for x in [0.0f32, -1e-30, -0.346_573_6, -0.346_573_7, -1.0, -86.999] {
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst <= 2.0 * f32::EPSILON as f64, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-1000.0), exp_nonpositive(-87.0));
        assert!(exp_nonpositive(-87.0) < 1.7e-38);
    }
}
