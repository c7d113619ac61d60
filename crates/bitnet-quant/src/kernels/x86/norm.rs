//! AVX2 RMSNorm fused with the activation quantizer, shared by every x86 set.
//!
//! Three passes over one row, each in registers: the f64 sum of squares in four vectors of
//! four running sums (the scalar reference's sixteen, so the same bits), the largest
//! `|w * (x * r)|`, and the codes. The normalised row is never written out: recomputing it
//! costs two multiplications per value where a store and a reload would cost a pass over
//! memory. The reference's single f64 running sum waited four cycles on each addition, which
//! made this step a tenth of a 2B-4T prefill on a Xeon with AMX (measured there, 2026-11).

use std::arch::x86_64::*;

use crate::kernels::{combine_square_sums, inv_rms, scalar, SQUARE_SUMS};
use crate::quantize::{activation_code, activation_scale};

/// RMSNorm and int8 quantization of one row; see [`crate::kernels::RmsNormQuantizeFn`].
/// Exactly equal to [`scalar::rms_norm_quantize`]; on a CPU without AVX2 it calls it.
pub fn rms_norm_quantize(x: &[f32], w: &[f32], eps: f32, q: &mut [i8]) -> f32 {
    if !is_x86_feature_detected!("avx2") {
        return scalar::rms_norm_quantize(x, w, eps, q);
    }
    assert!(
        w.len() == x.len() && q.len() >= x.len(),
        "rms_norm_quantize: row lengths"
    );
    // SAFETY: AVX2 was detected just above; `w` is as long as `x` and `q` at least as long,
    // which is all the function relies on.
    unsafe { rms_norm_quantize_avx2(x, w, eps, q) }
}

/// Safety: AVX2 present, `w.len() == x.len() <= q.len()`.
#[target_feature(enable = "avx2")]
unsafe fn rms_norm_quantize_avx2(x: &[f32], w: &[f32], eps: f32, q: &mut [i8]) -> f32 {
    let n = x.len();
    // SAFETY: the caller's contract, passed on.
    let r = inv_rms(unsafe { sum_squares(x) }, n, eps);
    let rv = _mm256_set1_ps(r);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    // `w * (x * r)` for the eight values at `i`, rounded as the reference rounds them.
    let normed = |i: usize| {
        // SAFETY: every caller passes `i + 8 <= n`, inside `x` and `w`.
        let (xv, wv) = unsafe { (_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(wp.add(i))) };
        _mm256_mul_ps(wv, _mm256_mul_ps(xv, rv))
    };

    // The largest magnitude. `vmaxps` returns its second operand when either is NaN, so the
    // running maxima (never NaN) skip a NaN value as `f32::max` does in the reference; the
    // maximum does not depend on the order, so four of them keep four comparisons in flight.
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut most = [_mm256_setzero_ps(); 4];
    let (full32, full8) = (n / 32 * 32, n / 8 * 8);
    let mut i = 0;
    while i < full32 {
        for (k, m) in most.iter_mut().enumerate() {
            *m = _mm256_max_ps(_mm256_and_ps(normed(i + 8 * k), abs), *m);
        }
        i += 32;
    }
    while i < full8 {
        most[0] = _mm256_max_ps(_mm256_and_ps(normed(i), abs), most[0]);
        i += 8;
    }
    let most = _mm256_max_ps(
        _mm256_max_ps(most[0], most[1]),
        _mm256_max_ps(most[2], most[3]),
    );
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds eight f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), most) };
    let tail_normed = |i: usize| w[i] * (x[i] * r);
    let amax = (full8..n).fold(lanes.into_iter().fold(0f32, f32::max), |m, i| {
        m.max(tail_normed(i).abs())
    });

    // The codes, 32 at a time: rounded half to even by `vroundps` (the reference's rounding,
    // exactly, for every value the clamp keeps), NaN to 0 by a mask, clamped, converted and
    // narrowed with saturating packs (which then change nothing).
    let s = activation_scale(amax);
    let sv = _mm256_set1_ps(s);
    let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    let codes = |i: usize| {
        let v = _mm256_mul_ps(normed(i), sv);
        let rounded = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        let rounded = _mm256_and_ps(rounded, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
        _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(rounded, lo), hi))
    };
    // `vpackssdw` and `vpacksswb` interleave their inputs by 128-bit lane; this puts the
    // four-byte groups back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let qp = q.as_mut_ptr();
    let mut i = 0;
    while i < full32 {
        let ab = _mm256_packs_epi32(codes(i), codes(i + 8));
        let cd = _mm256_packs_epi32(codes(i + 16), codes(i + 24));
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
        // SAFETY: i + 32 <= n <= q.len().
        unsafe { _mm256_storeu_si256(qp.add(i) as *mut __m256i, bytes) };
        i += 32;
    }
    for (i, qi) in q[..n].iter_mut().enumerate().skip(full32) {
        *qi = activation_code(tail_normed(i) * s);
    }
    q[n..].fill(0);
    s
}

/// [`scalar::sum_squares`] with its sixteen running sums in four vectors (lane `l` of vector
/// `k` is sum `4 k + l`). Safety: AVX2 present.
#[target_feature(enable = "avx2")]
unsafe fn sum_squares(x: &[f32]) -> f64 {
    let full = x.len() / SQUARE_SUMS * SQUARE_SUMS;
    let mut acc = [_mm256_setzero_pd(); 4];
    let mut i = 0;
    while i < full {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: i + 16 <= full <= x.len(), so the four values at i + 4k are inside `x`.
            let v = _mm256_cvtps_pd(unsafe { _mm_loadu_ps(x.as_ptr().add(i + 4 * k)) });
            // The square of an f32 is exact in f64: multiply and add round as the reference's.
            *a = _mm256_add_pd(*a, _mm256_mul_pd(v, v));
        }
        i += SQUARE_SUMS;
    }
    let mut sums = [0f64; SQUARE_SUMS];
    for (k, a) in acc.iter().enumerate() {
        // SAFETY: `sums[4k..4k + 4]` lies inside the sixteen.
        unsafe { _mm256_storeu_pd(sums.as_mut_ptr().add(4 * k), *a) };
    }
    for (s, &v) in sums.iter_mut().zip(&x[full..]) {
        *s += v as f64 * v as f64;
    }
    combine_square_sums(&sums)
}
