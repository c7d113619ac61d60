//! Attention over the KV cache (NEON), shared by both AArch64 sets: the scores of one query
//! against a run of key rows, their softmax, and the weighted sum of a run of value rows, for
//! f32 and f16 caches, in the scalar kernels' order (see [`crate::kernels::ScoreRowsFn`],
//! [`crate::kernels::SoftmaxFn`] and [`crate::kernels::MixRowsFn`]), so the bits agree. As on
//! x86, one call covers a run of rows, the scores take eight rows per query load, and the
//! weighted sum keeps up to 64 outputs in registers through all the rows. The trainer's
//! cross-entropy shares the softmax's exponential ([`crate::kernels::ExpSumFn`],
//! [`crate::kernels::ExpScaledFn`]).

use std::arch::aarch64::*;
use std::arch::is_aarch64_feature_detected;

use super::neon::{store_sums, widen_f16};
use crate::kernels::scalar::{self, CacheElem, EXP_MIN, EXP_POLY, LN2_SPLIT};
use crate::kernels::{combine_lanes, mix_blocks, rows_span, SCORE_SUMS, SOFTMAX_SUMS};

/// A cache element the vector loops can load eight at a time as f32.
pub trait Lanes8: CacheElem {
    /// The eight values from `p`, as f32, in two vectors.
    ///
    /// # Safety
    ///
    /// NEON must be available and the eight values from `p` readable.
    unsafe fn load8(p: *const Self) -> (float32x4_t, float32x4_t);
}

impl Lanes8 for f32 {
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn load8(p: *const f32) -> (float32x4_t, float32x4_t) {
        // SAFETY: the caller's contract.
        unsafe { (vld1q_f32(p), vld1q_f32(p.add(4))) }
    }
}

impl Lanes8 for half::f16 {
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn load8(p: *const half::f16) -> (float32x4_t, float32x4_t) {
        // SAFETY: the caller's contract; f16 is two bytes, read as its bits.
        unsafe { widen_f16(vld1q_u16(p as *const u16)) }
    }
}

/// Key rows one score tile takes at once: eight rows of two accumulators each, sixteen
/// chains of fused steps in flight in half of the 32 registers.
const SCORE_TILE: usize = 8;

/// Attention scores; see [`crate::kernels::ScoreRowsFn`]. Falls back to the scalar kernel
/// without NEON.
pub fn score_rows<E: Lanes8>(q: &[f32], keys: &[E], stride: usize, scores: &mut [f32]) {
    if !is_aarch64_feature_detected!("neon") {
        return scalar::score_rows(q, keys, stride, scores);
    }
    let need = rows_span(scores.len(), stride, q.len());
    assert!(keys.len() >= need, "{} keys, {need} needed", keys.len());
    // SAFETY: NEON was just detected; every row `j < scores.len()` reads `q.len()` values
    // from `j * stride`, inside `keys` by the assert.
    unsafe { score_rows_neon(q, keys, stride, scores) }
}

#[target_feature(enable = "neon")]
unsafe fn score_rows_neon<E: Lanes8>(q: &[f32], keys: &[E], stride: usize, scores: &mut [f32]) {
    let mut tiles = scores.chunks_exact_mut(SCORE_TILE);
    let mut j = 0;
    for out in &mut tiles {
        // SAFETY: rows j.. of the tile lie in `keys` (the caller's bounds).
        unsafe { score_tile::<E, SCORE_TILE>(q, keys, stride, j, out) };
        j += SCORE_TILE;
    }
    for out in tiles.into_remainder().chunks_exact_mut(1) {
        // SAFETY: as above, for one row.
        unsafe { score_tile::<E, 1>(q, keys, stride, j, out) };
        j += 1;
    }
}

/// The scores of the `R` rows from row `j0` into `out`: running sums 0-3 and 4-7 of each row
/// in two vectors, each query vector loaded once for all `R` rows.
///
/// # Safety
///
/// NEON must be available; `out.len() == R`, and rows `j0..j0 + R` (`q.len()` values each,
/// `stride` apart) must lie in `keys`.
#[target_feature(enable = "neon")]
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
    let mut lo = [vdupq_n_f32(0.0); R];
    let mut hi = [vdupq_n_f32(0.0); R];
    for k in (0..full).step_by(SCORE_SUMS) {
        // SAFETY: k + 8 <= full <= n: eight values of `q`, and of each row r < R at k.
        let (q0, q1) = unsafe {
            (
                vld1q_f32(q.as_ptr().add(k)),
                vld1q_f32(q.as_ptr().add(k + 4)),
            )
        };
        for r in 0..R {
            // SAFETY: as just said, row r of the tile at k.
            let (k0, k1) = unsafe { E::load8(base.add(r * stride + k)) };
            lo[r] = vfmaq_f32(lo[r], q0, k0);
            hi[r] = vfmaq_f32(hi[r], q1, k1);
        }
    }
    if R == SCORE_TILE && full == n {
        // A whole tile and no tail: the combinations across registers, four rows per store.
        // Lane i of `lo + hi` is a_i + a_{i+4}; `faddp` of two rows' vectors gives each row's
        // (a0 + a4) + (a1 + a5) and (a2 + a6) + (a3 + a7), and `faddp` of two such vectors
        // their sums in row order: the additions of `combine_lanes`, in its order.
        let b: [float32x4_t; R] = std::array::from_fn(|r| vaddq_f32(lo[r], hi[r]));
        for (g, o) in out.chunks_exact_mut(4).enumerate() {
            let p0 = vpaddq_f32(b[4 * g], b[4 * g + 1]);
            let p1 = vpaddq_f32(b[4 * g + 2], b[4 * g + 3]);
            // SAFETY: `o` is four writable scores.
            unsafe { vst1q_f32(o.as_mut_ptr(), vpaddq_f32(p0, p1)) };
        }
        return;
    }
    for (r, o) in out.iter_mut().enumerate() {
        // SAFETY: NEON is enabled here; the function only stores registers.
        let mut sums: [f32; SCORE_SUMS] = unsafe { store_sums(&[lo[r], hi[r]]) };
        let row = &keys[(j0 + r) * stride + full..(j0 + r) * stride + n];
        for (s, (x, y)) in sums.iter_mut().zip(q[full..].iter().zip(row)) {
            *s = x.mul_add(y.to_f32(), *s);
        }
        *o = combine_lanes(&sums);
    }
}

/// Weighted sum of value rows; see [`crate::kernels::MixRowsFn`]. Falls back to the scalar
/// kernel without NEON.
pub fn mix_rows<E: Lanes8>(out: &mut [f32], w: &[f32], values: &[E], stride: usize) {
    if !is_aarch64_feature_detected!("neon") {
        return scalar::mix_rows(out, w, values, stride);
    }
    let need = rows_span(w.len(), stride, out.len());
    assert!(
        values.len() >= need,
        "{} values, {need} needed",
        values.len()
    );
    // SAFETY: NEON was just detected; every row `j < w.len()` reads `out.len()` values from
    // `j * stride`, inside `values` by the assert.
    unsafe { mix_rows_neon(out, w, values, stride) }
}

#[target_feature(enable = "neon")]
unsafe fn mix_rows_neon<E: Lanes8>(out: &mut [f32], w: &[f32], values: &[E], stride: usize) {
    for (b0, groups) in mix_blocks(out.len()) {
        // SAFETY (for these calls): outputs b0..b0 + 8 groups lie in `out`, and every row's
        // values at b0.. in `values` (the caller's bounds, with b0 + 8 groups <= out.len()).
        unsafe {
            match groups {
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

/// Outputs `b0..b0 + 8 G`, held in `2 G` registers through every row.
///
/// # Safety
///
/// NEON must be available; `b0 + 8 G <= out.len()`, and `values` must hold
/// `(w.len() - 1) * stride + b0 + 8 G` values when `w` is not empty.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn mix_block<E: Lanes8, const G: usize>(
    out: &mut [f32],
    b0: usize,
    w: &[f32],
    values: &[E],
    stride: usize,
) {
    let mut acc = [[vdupq_n_f32(0.0); 2]; G];
    for (g, a) in acc.iter_mut().enumerate() {
        // SAFETY: b0 + 8g + 8 <= b0 + 8G <= out.len().
        unsafe {
            let p = out.as_ptr().add(b0 + 8 * g);
            *a = [vld1q_f32(p), vld1q_f32(p.add(4))];
        }
    }
    for (j, &wj) in w.iter().enumerate() {
        let wv = vdupq_n_f32(wj);
        // SAFETY: row j's values b0.. lie in `values` by the contract.
        let row = unsafe { values.as_ptr().add(j * stride + b0) };
        for (g, a) in acc.iter_mut().enumerate() {
            // SAFETY: values b0 + 8g..b0 + 8g + 8 of row j, inside by the contract.
            let (v0, v1) = unsafe { E::load8(row.add(8 * g)) };
            a[0] = vaddq_f32(a[0], vmulq_f32(wv, v0));
            a[1] = vaddq_f32(a[1], vmulq_f32(wv, v1));
        }
    }
    for (g, a) in acc.iter().enumerate() {
        // SAFETY: as for the loads above.
        unsafe {
            let p = out.as_mut_ptr().add(b0 + 8 * g);
            vst1q_f32(p, a[0]);
            vst1q_f32(p.add(4), a[1]);
        }
    }
}

/// Softmax of a row of scores; see [`crate::kernels::SoftmaxFn`]. Falls back to the scalar
/// kernel without NEON.
pub fn softmax(x: &mut [f32], scale: f32) {
    if !is_aarch64_feature_detected!("neon") {
        return scalar::softmax(x, scale);
    }
    // SAFETY: NEON was just detected; the kernel reads and writes `x` only.
    unsafe { softmax_neon(x, scale) }
}

#[target_feature(enable = "neon")]
unsafe fn softmax_neon(x: &mut [f32], scale: f32) {
    let n = x.len();
    let full = n / 8 * 8;
    let p = x.as_mut_ptr();
    let sv = vdupq_n_f32(scale);
    let mut mv = vdupq_n_f32(f32::NEG_INFINITY);
    for i in (0..full).step_by(4) {
        // SAFETY (for the loads and stores of these loops): i + 4 <= full <= n.
        unsafe {
            let v = vmulq_f32(vld1q_f32(p.add(i)), sv);
            vst1q_f32(p.add(i), v);
            mv = vmaxq_f32(mv, v);
        }
    }
    let mut m = vmaxvq_f32(mv);
    for v in x[full..].iter_mut() {
        *v *= scale;
        m = m.max(*v);
    }
    let mm = vdupq_n_f32(m);
    // Sums 0-3 in `lo`, 4-7 in `hi`: lane j of the scalar kernel's eight.
    let (mut lo, mut hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    for i in (0..full).step_by(8) {
        // SAFETY: as above, i + 8 <= full.
        unsafe {
            let e0 = exp4(vsubq_f32(vld1q_f32(p.add(i)), mm));
            let e1 = exp4(vsubq_f32(vld1q_f32(p.add(i + 4)), mm));
            vst1q_f32(p.add(i), e0);
            vst1q_f32(p.add(i + 4), e1);
            lo = vaddq_f32(lo, e0);
            hi = vaddq_f32(hi, e1);
        }
    }
    // SAFETY: NEON is enabled here; the function only stores registers.
    let mut sums: [f32; SOFTMAX_SUMS] = unsafe { store_sums(&[lo, hi]) };
    for (j, v) in x[full..].iter_mut().enumerate() {
        *v = scalar::exp_nonpositive(*v - m);
        sums[j] += *v;
    }
    let inv = 1.0 / combine_lanes(&sums);
    let iv = vdupq_n_f32(inv);
    for i in (0..full).step_by(4) {
        // SAFETY: as above.
        unsafe { vst1q_f32(p.add(i), vmulq_f32(vld1q_f32(p.add(i)), iv)) };
    }
    for v in x[full..].iter_mut() {
        *v *= inv;
    }
}

/// Sum of shifted exponentials; see [`crate::kernels::ExpSumFn`]. Falls back to the scalar
/// kernel without NEON.
pub fn exp_sum(x: &[f32], shift: f32) -> f32 {
    if !is_aarch64_feature_detected!("neon") {
        return scalar::exp_sum(x, shift);
    }
    // SAFETY: NEON was just detected; the kernel reads `x` only.
    unsafe { exp_sum_neon(x, shift) }
}

#[target_feature(enable = "neon")]
unsafe fn exp_sum_neon(x: &[f32], shift: f32) -> f32 {
    let full = x.len() / 8 * 8;
    let p = x.as_ptr();
    let sv = vdupq_n_f32(shift);
    // Sums 0-3 in `lo`, 4-7 in `hi`: lane j of the scalar kernel's eight.
    let (mut lo, mut hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    for i in (0..full).step_by(8) {
        // SAFETY: i + 8 <= full <= x.len().
        unsafe {
            lo = vaddq_f32(lo, exp4(vsubq_f32(vld1q_f32(p.add(i)), sv)));
            hi = vaddq_f32(hi, exp4(vsubq_f32(vld1q_f32(p.add(i + 4)), sv)));
        }
    }
    // SAFETY: NEON is enabled here; the function only stores registers.
    let mut sums: [f32; SOFTMAX_SUMS] = unsafe { store_sums(&[lo, hi]) };
    for (j, &v) in x[full..].iter().enumerate() {
        sums[j] += scalar::exp_nonpositive(v - shift);
    }
    combine_lanes(&sums)
}

/// Scaled shifted exponentials; see [`crate::kernels::ExpScaledFn`]. Falls back to the scalar
/// kernel without NEON.
pub fn exp_scaled(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
    let out = &mut out[..x.len()];
    if !is_aarch64_feature_detected!("neon") {
        return scalar::exp_scaled(x, shift, scale, out);
    }
    // SAFETY: NEON was just detected; `out` is as long as `x`, the only memory touched.
    unsafe { exp_scaled_neon(x, shift, scale, out) }
}

#[target_feature(enable = "neon")]
unsafe fn exp_scaled_neon(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
    let full = x.len() / 4 * 4;
    let (sv, kv) = (vdupq_n_f32(shift), vdupq_n_f32(scale));
    for i in (0..full).step_by(4) {
        // SAFETY: i + 4 <= full <= x.len() = out.len().
        unsafe {
            let e = exp4(vsubq_f32(vld1q_f32(x.as_ptr().add(i)), sv));
            vst1q_f32(out.as_mut_ptr().add(i), vmulq_f32(e, kv));
        }
    }
    scalar::exp_scaled(&x[full..], shift, scale, &mut out[full..]);
}

/// [`scalar::exp_nonpositive`] of four values, with the same operations in the same order.
#[target_feature(enable = "neon")]
#[inline]
fn exp4(d: float32x4_t) -> float32x4_t {
    let (ln2_hi, ln2_lo) = LN2_SPLIT;
    let min = vdupq_n_f32(EXP_MIN);
    let below = vcltq_f32(d, min);
    // Clamped into range so that 2^n stays a normal number; those lanes are zeroed at the
    // end. A select on `below` (false for NaN) lets NaN through.
    let d = vbslq_f32(below, min, d);
    let n = vrndnq_f32(vmulq_f32(d, vdupq_n_f32(std::f32::consts::LOG2_E)));
    let r = vsubq_f32(
        vsubq_f32(d, vmulq_f32(n, vdupq_n_f32(ln2_hi))),
        vmulq_f32(n, vdupq_n_f32(ln2_lo)),
    );
    let mut p = vdupq_n_f32(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(c));
    }
    let e = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
    let v = vmulq_f32(p, vreinterpretq_f32_s32(e));
    vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(v), below))
}
