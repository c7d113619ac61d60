//! NEON RMSNorm fused with the activation quantizer, shared by both AArch64 sets: the same
//! three register passes as the x86 kernel (the f64 sum of squares in eight vectors of two
//! running sums, the scalar reference's sixteen; the largest `|w * (x * r)|`; the codes), in
//! the reference's order, so the bits agree.

use std::arch::aarch64::*;
use std::arch::is_aarch64_feature_detected;

use crate::kernels::{combine_square_sums, inv_rms, scalar, SQUARE_SUMS};
use crate::quantize::{activation_code, activation_scale};

/// RMSNorm and int8 quantization of one row; see [`crate::kernels::RmsNormQuantizeFn`].
/// Exactly equal to [`scalar::rms_norm_quantize`]; without NEON it calls it.
pub fn rms_norm_quantize(x: &[f32], w: &[f32], eps: f32, q: &mut [i8]) -> f32 {
    if !is_aarch64_feature_detected!("neon") {
        return scalar::rms_norm_quantize(x, w, eps, q);
    }
    assert!(
        w.len() == x.len() && q.len() >= x.len(),
        "rms_norm_quantize: row lengths"
    );
    // SAFETY: NEON was detected just above; `w` is as long as `x` and `q` at least as long,
    // which is all the function relies on.
    unsafe { rms_norm_quantize_neon(x, w, eps, q) }
}

/// Safety: NEON present, `w.len() == x.len() <= q.len()`.
#[target_feature(enable = "neon")]
unsafe fn rms_norm_quantize_neon(x: &[f32], w: &[f32], eps: f32, q: &mut [i8]) -> f32 {
    let n = x.len();
    // SAFETY: the caller's contract, passed on.
    let r = inv_rms(unsafe { sum_squares(x) }, n, eps);
    let rv = vdupq_n_f32(r);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    // `w * (x * r)` for the four values at `i`, rounded as the reference rounds them.
    let normed = |i: usize| {
        // SAFETY: every caller passes `i + 4 <= n`, inside `x` and `w`.
        let (xv, wv) = unsafe { (vld1q_f32(xp.add(i)), vld1q_f32(wp.add(i))) };
        vmulq_f32(wv, vmulq_f32(xv, rv))
    };

    // The largest magnitude: `fmaxnm` returns the number when one operand is NaN, as
    // `f32::max` does in the reference; the maximum does not depend on the order.
    let mut most = [vdupq_n_f32(0.0); 4];
    let (full16, full4) = (n / 16 * 16, n / 4 * 4);
    let mut i = 0;
    while i < full16 {
        for (k, m) in most.iter_mut().enumerate() {
            *m = vmaxnmq_f32(*m, vabsq_f32(normed(i + 4 * k)));
        }
        i += 16;
    }
    while i < full4 {
        most[0] = vmaxnmq_f32(most[0], vabsq_f32(normed(i)));
        i += 4;
    }
    let most = vmaxnmq_f32(vmaxnmq_f32(most[0], most[1]), vmaxnmq_f32(most[2], most[3]));
    let tail_normed = |i: usize| w[i] * (x[i] * r);
    let amax = (full4..n).fold(vmaxnmvq_f32(most), |m, i| m.max(tail_normed(i).abs()));

    // The codes, 16 at a time: `fcvtns` rounds half to even and gives 0 for NaN, saturating
    // at the i32 range; the clamp and the saturating narrowing then match the reference.
    let s = activation_scale(amax);
    let sv = vdupq_n_f32(s);
    let (lo, hi) = (vdupq_n_s32(-128), vdupq_n_s32(127));
    let codes = |i: usize| {
        let c = vcvtnq_s32_f32(vmulq_f32(normed(i), sv));
        vqmovn_s32(vminq_s32(vmaxq_s32(c, lo), hi))
    };
    let qp = q.as_mut_ptr();
    let mut i = 0;
    while i < full16 {
        let ab = vcombine_s16(codes(i), codes(i + 4));
        let cd = vcombine_s16(codes(i + 8), codes(i + 12));
        // SAFETY: i + 16 <= n <= q.len().
        unsafe { vst1q_s8(qp.add(i), vcombine_s8(vqmovn_s16(ab), vqmovn_s16(cd))) };
        i += 16;
    }
    for (i, qi) in q[..n].iter_mut().enumerate().skip(full16) {
        *qi = activation_code(tail_normed(i) * s);
    }
    q[n..].fill(0);
    s
}

/// [`scalar::sum_squares`] with its sixteen running sums in eight vectors (lane `l` of vector
/// `k` is sum `2 k + l`). Safety: NEON present.
#[target_feature(enable = "neon")]
unsafe fn sum_squares(x: &[f32]) -> f64 {
    let full = x.len() / SQUARE_SUMS * SQUARE_SUMS;
    let mut acc = [vdupq_n_f64(0.0); 8];
    let mut i = 0;
    while i < full {
        for k in 0..4 {
            // SAFETY: i + 16 <= full <= x.len(), so the four values at i + 4k are inside `x`.
            let v = unsafe { vld1q_f32(x.as_ptr().add(i + 4 * k)) };
            let (lo, hi) = (vcvt_f64_f32(vget_low_f32(v)), vcvt_high_f64_f32(v));
            // The square of an f32 is exact in f64: multiply and add round as the reference's.
            acc[2 * k] = vaddq_f64(acc[2 * k], vmulq_f64(lo, lo));
            acc[2 * k + 1] = vaddq_f64(acc[2 * k + 1], vmulq_f64(hi, hi));
        }
        i += SQUARE_SUMS;
    }
    let mut sums = [0f64; SQUARE_SUMS];
    for (k, a) in acc.iter().enumerate() {
        // SAFETY: `sums[2k..2k + 2]` lies inside the sixteen.
        unsafe { vst1q_f64(sums.as_mut_ptr().add(2 * k), *a) };
    }
    for (s, &v) in sums.iter_mut().zip(&x[full..]) {
        *s += v as f64 * v as f64;
    }
    combine_square_sums(&sums)
}
