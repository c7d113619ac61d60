//! Attention over the KV cache (AVX with F16C; FMA for the scores, AVX2 for the softmax),
//! shared by every x86 set: the scores of one query against a run of key rows, their softmax, and the weighted
//! sum of a run of value rows, for f32 and f16 caches, in the scalar kernels' order (see
//! [`crate::kernels::ScoreRowsFn`], [`crate::kernels::SoftmaxFn`] and
//! [`crate::kernels::MixRowsFn`]), so the bits agree. The trainer's cross-entropy shares the
//! softmax's exponential ([`crate::kernels::ExpSumFn`], [`crate::kernels::ExpScaledFn`]).
//!
//! One call covers a run of rows, so the feature check, the call and the setup are paid once
//! per run rather than once per cached position (per-row calls cost more than the arithmetic
//! at head sizes of 64-128). The scores take eight rows per query load, one vector of sums
//! each; the weighted sum keeps up to 64 outputs in eight registers while it walks all the
//! rows, instead of loading and storing them once per row.

use std::arch::x86_64::*;

use super::avx2::store_sums;
use crate::kernels::scalar::{self, CacheElem, EXP_MIN, EXP_POLY, LN2_SPLIT};
use crate::kernels::{combine_lanes, mix_blocks, rows_span, SCORE_SUMS, SOFTMAX_SUMS};

/// A cache element the vector loops can load eight at a time as f32.
pub trait Lanes8: CacheElem {
    /// The eight values from `p`, as f32.
    ///
    /// # Safety
    ///
    /// AVX and F16C must be available and the eight values from `p` readable.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Lanes8 for f32 {
    #[target_feature(enable = "avx,f16c")]
    #[inline]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Lanes8 for half::f16 {
    #[target_feature(enable = "avx,f16c")]
    #[inline]
    unsafe fn load8(p: *const half::f16) -> __m256 {
        // SAFETY: the caller's contract; eight f16 are the 16 bytes loaded.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

fn detected() -> bool {
    is_x86_feature_detected!("avx") && is_x86_feature_detected!("f16c")
}

/// Key rows one score tile takes at once: eight chains of fused steps in flight, enough to
/// cover the latency of `vfmadd` with eight of the sixteen registers.
const SCORE_TILE: usize = 8;

/// Attention scores; see [`crate::kernels::ScoreRowsFn`]. Falls back to the scalar kernel
/// without AVX, F16C and FMA.
pub fn score_rows<E: Lanes8>(q: &[f32], keys: &[E], stride: usize, scores: &mut [f32]) {
    if !(detected() && is_x86_feature_detected!("fma")) {
        return scalar::score_rows(q, keys, stride, scores);
    }
    let need = rows_span(scores.len(), stride, q.len());
    assert!(keys.len() >= need, "{} keys, {need} needed", keys.len());
    // SAFETY: AVX, F16C and FMA were just detected; every row `j < scores.len()` reads
    // `q.len()` values from `j * stride`, inside `keys` by the assert.
    unsafe { score_rows_fma(q, keys, stride, scores) }
}

#[target_feature(enable = "avx,f16c,fma")]
unsafe fn score_rows_fma<E: Lanes8>(q: &[f32], keys: &[E], stride: usize, scores: &mut [f32]) {
    let mut tiles = scores.chunks_exact_mut(SCORE_TILE);
    let mut j = 0;
    for out in &mut tiles {
        // SAFETY (for both calls): rows j.. of the tile lie in `keys` (the caller's bounds).
        unsafe { score_tile::<E, SCORE_TILE>(q, keys, stride, j, out) };
        j += SCORE_TILE;
    }
    for out in tiles.into_remainder().chunks_exact_mut(1) {
        // SAFETY: as above, for one row.
        unsafe { score_tile::<E, 1>(q, keys, stride, j, out) };
        j += 1;
    }
}

/// The scores of the `R` rows from row `j0` into `out`: one vector of running sums per row,
/// each query vector loaded once for all `R` rows.
///
/// # Safety
///
/// AVX, F16C and FMA must be available; `out.len() == R`, and rows `j0..j0 + R` (`q.len()`
/// values each, `stride` apart) must lie in `keys`.
#[target_feature(enable = "avx,f16c,fma")]
#[inline]
unsafe fn score_tile<E: Lanes8, const R: usize>(
    q: &[f32],
    keys: &[E],
    stride: usize,
    j0: usize,
    out: &mut [f32],
) {
    let n = q.len();
    let full = n / SCORE_SUMS * SCORE_SUMS;
    // SAFETY: row j0 starts inside `keys` by the contract; the pointer is only offset within
    // the tile's rows below.
    let base = unsafe { keys.as_ptr().add(j0 * stride) };
    let mut acc = [_mm256_setzero_ps(); R];
    for k in (0..full).step_by(SCORE_SUMS) {
        // SAFETY: k + 8 <= full <= n: eight values of `q`, and of each row r < R at k.
        let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(k)) };
        for (r, a) in acc.iter_mut().enumerate() {
            // SAFETY: as just said, row r of the tile at k.
            let kv = unsafe { E::load8(base.add(r * stride + k)) };
            *a = _mm256_fmadd_ps(qv, kv, *a);
        }
    }
    if let (Ok(acc), true) = (<&[__m256; SCORE_TILE]>::try_from(&acc[..]), full == n) {
        // A whole tile and no tail: all eight combinations at once, across registers.
        // SAFETY: `out` holds R = 8 scores; AVX is enabled here.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), combine8(acc)) };
        return;
    }
    for (r, (a, o)) in acc.iter().zip(out.iter_mut()).enumerate() {
        // SAFETY: AVX is enabled here; the function only stores a register.
        let mut sums: [f32; SCORE_SUMS] = unsafe { store_sums(&[*a]) };
        let row = &keys[(j0 + r) * stride + full..(j0 + r) * stride + n];
        for (s, (x, y)) in sums.iter_mut().zip(q[full..].iter().zip(row)) {
            *s = x.mul_add(y.to_f32(), *s);
        }
        *o = combine_lanes(&sums);
    }
}

/// [`combine_lanes`] of eight vectors at once: lane `r` of the result is that of `a[r]`,
/// from the same additions in the same order (`a_i + a_{i+4}` lane-wise across the two
/// halves, then the pairs and the pairs' sums by horizontal additions), so the bits agree;
/// about 15 vector operations instead of some 80 scalar ones for a tile's eight scores.
#[target_feature(enable = "avx")]
#[inline]
fn combine8(a: &[__m256; SCORE_TILE]) -> __m256 {
    // Rows r and r + 1: [a_r[i] + a_r[i + 4] for i < 4, the same for a_{r+1}].
    let halves = |r: usize| {
        let lo = _mm256_permute2f128_ps::<0x20>(a[r], a[r + 1]);
        let hi = _mm256_permute2f128_ps::<0x31>(a[r], a[r + 1]);
        _mm256_add_ps(lo, hi)
    };
    // Per 128-bit lane, `hadd(x, y)` = [x0 + x1, x2 + x3, y0 + y1, y2 + y3]: first the pairs
    // (rows 0, 2 | 1, 3 and 4, 6 | 5, 7), then their sums.
    let pairs_low = _mm256_hadd_ps(halves(0), halves(2));
    let pairs_high = _mm256_hadd_ps(halves(4), halves(6));
    // [r0, r2, r4, r6 | r1, r3, r5, r7], put back in row order.
    let h = _mm256_hadd_ps(pairs_low, pairs_high);
    let swapped = _mm256_permute2f128_ps::<0x01>(h, h);
    let first = _mm256_unpacklo_ps(h, swapped); // [r0, r1, r2, r3 | ..]
    let second = _mm256_unpackhi_ps(h, swapped); // [r4, r5, r6, r7 | ..]
    _mm256_permute2f128_ps::<0x20>(first, second)
}

/// Weighted sum of value rows; see [`crate::kernels::MixRowsFn`]. Falls back to the scalar
/// kernel without AVX and F16C.
pub fn mix_rows<E: Lanes8>(out: &mut [f32], w: &[f32], values: &[E], stride: usize) {
    if !detected() {
        return scalar::mix_rows(out, w, values, stride);
    }
    let need = rows_span(w.len(), stride, out.len());
    assert!(
        values.len() >= need,
        "{} values, {need} needed",
        values.len()
    );
    // SAFETY: AVX and F16C were just detected; every row `j < w.len()` reads `out.len()`
    // values from `j * stride`, inside `values` by the assert.
    unsafe { mix_rows_avx(out, w, values, stride) }
}

#[target_feature(enable = "avx,f16c")]
unsafe fn mix_rows_avx<E: Lanes8>(out: &mut [f32], w: &[f32], values: &[E], stride: usize) {
    for (b0, regs) in mix_blocks(out.len()) {
        // SAFETY (for these calls): outputs b0..b0 + 8 regs lie in `out`, and every row's
        // values at b0.. in `values` (the caller's bounds, with b0 + 8 regs <= out.len()).
        unsafe {
            match regs {
                8 => mix_block::<E, 8>(out, b0, w, values, stride),
                7 => mix_block::<E, 7>(out, b0, w, values, stride),
                6 => mix_block::<E, 6>(out, b0, w, values, stride),
                5 => mix_block::<E, 5>(out, b0, w, values, stride),
                4 => mix_block::<E, 4>(out, b0, w, values, stride),
                3 => mix_block::<E, 3>(out, b0, w, values, stride),
                2 => mix_block::<E, 2>(out, b0, w, values, stride),
                _ => mix_block::<E, 1>(out, b0, w, values, stride),
            }
        }
    }
    scalar::mix_rows_from(out, out.len() / 8 * 8, w, values, stride);
}

/// Outputs `b0..b0 + 8 R`, held in `R` registers through every row.
///
/// # Safety
///
/// AVX and F16C must be available; `b0 + 8 R <= out.len()`, and `values` must hold
/// `(w.len() - 1) * stride + b0 + 8 R` values when `w` is not empty.
#[target_feature(enable = "avx,f16c")]
#[inline]
unsafe fn mix_block<E: Lanes8, const R: usize>(
    out: &mut [f32],
    b0: usize,
    w: &[f32],
    values: &[E],
    stride: usize,
) {
    let mut acc = [_mm256_setzero_ps(); R];
    for (r, a) in acc.iter_mut().enumerate() {
        // SAFETY: b0 + 8r + 8 <= b0 + 8R <= out.len().
        *a = unsafe { _mm256_loadu_ps(out.as_ptr().add(b0 + 8 * r)) };
    }
    for (j, &wj) in w.iter().enumerate() {
        let wv = _mm256_set1_ps(wj);
        // SAFETY: row j's values b0.. lie in `values` by the contract; the pointer is only
        // offset within them.
        let row = unsafe { values.as_ptr().add(j * stride + b0) };
        for (r, a) in acc.iter_mut().enumerate() {
            // SAFETY: values b0 + 8r.. b0 + 8r + 8 of row j, inside by the contract.
            let v = unsafe { E::load8(row.add(8 * r)) };
            *a = _mm256_add_ps(*a, _mm256_mul_ps(wv, v));
        }
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: as for the loads above.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(b0 + 8 * r), *a) };
    }
}

/// Softmax of a row of scores; see [`crate::kernels::SoftmaxFn`]. Falls back to the scalar
/// kernel without AVX2.
pub fn softmax(x: &mut [f32], scale: f32) {
    if !is_x86_feature_detected!("avx2") {
        return scalar::softmax(x, scale);
    }
    // SAFETY: AVX2 was just detected; the kernel reads and writes `x` only.
    unsafe { softmax_avx2(x, scale) }
}

#[target_feature(enable = "avx2")]
unsafe fn softmax_avx2(x: &mut [f32], scale: f32) {
    let n = x.len();
    let full = n / 8 * 8;
    let p = x.as_mut_ptr();
    let sv = _mm256_set1_ps(scale);
    let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(8) {
        // SAFETY (for the loads and stores of these loops): i + 8 <= full <= n.
        unsafe {
            let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), sv);
            _mm256_storeu_ps(p.add(i), v);
            mv = _mm256_max_ps(mv, v);
        }
    }
    // SAFETY: AVX is enabled here (AVX2 implies it); the function only stores registers.
    let lanes: [f32; 8] = unsafe { store_sums(&[mv]) };
    let mut m = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for v in x[full..].iter_mut() {
        *v *= scale;
        m = m.max(*v);
    }
    let mm = _mm256_set1_ps(m);
    let mut acc = _mm256_setzero_ps();
    for i in (0..full).step_by(8) {
        // SAFETY: as above.
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mm));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
        }
    }
    // SAFETY: as above.
    let mut sums: [f32; SOFTMAX_SUMS] = unsafe { store_sums(&[acc]) };
    for (j, v) in x[full..].iter_mut().enumerate() {
        *v = scalar::exp_nonpositive(*v - m);
        sums[j] += *v;
    }
    let inv = 1.0 / combine_lanes(&sums);
    let iv = _mm256_set1_ps(inv);
    for i in (0..full).step_by(8) {
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), iv)) };
    }
    for v in x[full..].iter_mut() {
        *v *= inv;
    }
}

/// Sum of shifted exponentials; see [`crate::kernels::ExpSumFn`]. Falls back to the scalar
/// kernel without AVX2.
pub fn exp_sum(x: &[f32], shift: f32) -> f32 {
    if !is_x86_feature_detected!("avx2") {
        return scalar::exp_sum(x, shift);
    }
    // SAFETY: AVX2 was just detected; the kernel reads `x` only.
    unsafe { exp_sum_avx2(x, shift) }
}

#[target_feature(enable = "avx2")]
unsafe fn exp_sum_avx2(x: &[f32], shift: f32) -> f32 {
    let full = x.len() / 8 * 8;
    let sv = _mm256_set1_ps(shift);
    let mut acc = _mm256_setzero_ps();
    for i in (0..full).step_by(8) {
        // SAFETY: i + 8 <= full <= x.len().
        let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
        acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(v, sv)));
    }
    // SAFETY: AVX is enabled here (AVX2 implies it); the function only stores registers.
    let mut sums: [f32; SOFTMAX_SUMS] = unsafe { store_sums(&[acc]) };
    for (j, &v) in x[full..].iter().enumerate() {
        sums[j] += scalar::exp_nonpositive(v - shift);
    }
    combine_lanes(&sums)
}

/// Scaled shifted exponentials; see [`crate::kernels::ExpScaledFn`]. Falls back to the scalar
/// kernel without AVX2.
pub fn exp_scaled(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
    let out = &mut out[..x.len()];
    if !is_x86_feature_detected!("avx2") {
        return scalar::exp_scaled(x, shift, scale, out);
    }
    // SAFETY: AVX2 was just detected; `out` is as long as `x`, the only memory touched.
    unsafe { exp_scaled_avx2(x, shift, scale, out) }
}

#[target_feature(enable = "avx2")]
unsafe fn exp_scaled_avx2(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
    let full = x.len() / 8 * 8;
    let (sv, kv) = (_mm256_set1_ps(shift), _mm256_set1_ps(scale));
    for i in (0..full).step_by(8) {
        // SAFETY: i + 8 <= full <= x.len() = out.len().
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), sv));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(e, kv));
        }
    }
    scalar::exp_scaled(&x[full..], shift, scale, &mut out[full..]);
}

/// [`scalar::exp_nonpositive`] of eight values, with the same operations in the same order.
#[target_feature(enable = "avx2")]
#[inline]
fn exp8(d: __m256) -> __m256 {
    let (ln2_hi, ln2_lo) = LN2_SPLIT;
    let min = _mm256_set1_ps(EXP_MIN);
    let below = _mm256_cmp_ps::<_CMP_LT_OQ>(d, min);
    // Clamped into range so that 2^n stays a normal number; those lanes are zeroed at the
    // end. `max_ps` returns its second operand when one is NaN, so NaN goes through.
    let d = _mm256_max_ps(min, d);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        d,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_sub_ps(
        _mm256_sub_ps(d, _mm256_mul_ps(n, _mm256_set1_ps(ln2_hi))),
        _mm256_mul_ps(n, _mm256_set1_ps(ln2_lo)),
    );
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
    }
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_andnot_ps(below, _mm256_mul_ps(p, _mm256_castsi256_ps(e)))
}
