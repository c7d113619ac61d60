//! NEON kernels for the dense (base-3) layout, with and without the dot-product extension.
//!
//! Two 16-byte loads of a block hold five pairs of vectors of 16 weights (see
//! [`crate::base3`]). The digit of each byte `m` is `[m > 85] + [m > 170]` (two unsigned
//! comparisons, each -1 or 0, added and negated), and the next `m` is `3 m` in wrapping byte
//! arithmetic. The digits `c = t + 1` in {0, 1, 2} then meet the activations as the 2-bit
//! kernels' codes do (`smlal` into i16 lanes, or `sdot` into i32 lanes), and the activation
//! sum is subtracted once per row and call.
//!
//! # No overflow
//!
//! One product `c * x` lies in `[-256, 254]`. In the `neon` tile each of the two i16
//! accumulators takes two products per lane from each of the five vectors of its half of a
//! block, 10 per block, so `FLUSH_BLOCKS` = 12 blocks stay within `[-30720, 30480]`. The
//! `sdot` lanes are i32 and wrap like the scalar reference's sums.

use std::arch::aarch64::*;
use std::arch::is_aarch64_feature_detected;

use super::neon::{products, sdot, Layout};
use crate::base3::{BASE3_BLOCK_BYTES, BASE3_BLOCK_ELEMS, BASE3_DIGITS};
use crate::kernels::{checked_gemm_rows, checked_rows, scalar};
use crate::ternary::ROW_GROUP;

/// Blocks accumulated in i16 lanes before they are widened to i32 (see the module docs).
const FLUSH_BLOCKS: usize = 12;

// Worst case of one i16 lane after FLUSH_BLOCKS blocks: 10 products of -256 per block.
const _: () = assert!(FLUSH_BLOCKS * 2 * BASE3_DIGITS * 256 <= i16::MAX as usize);

/// Bytes from one block of a row to its next: the blocks of a group's rows are interleaved.
const BLOCK_STEP: usize = ROW_GROUP * BASE3_BLOCK_BYTES;

/// NEON matrix-vector product in the dense layout; see [`crate::kernels::GemvFn`]. Exactly
/// equal to [`scalar::gemv_base3`]; on a CPU without NEON it calls it.
pub fn gemv(w: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
    if !is_aarch64_feature_detected!("neon") {
        return scalar::gemv_base3(w, row_bytes, x, out);
    }
    let rows = checked_rows(w, row_bytes, x.len(), 1, BASE3_DIGITS).min(out.len());
    // SAFETY: NEON was detected just above and `DOT` is false. `checked_rows` asserted that
    // `row_bytes` is a positive multiple of 32, that `w` is whole row groups and that `x`
    // holds `row_bytes * 5` activations; `rows` rows and outputs fit in `w` and `out`.
    unsafe { products::<Digits, false>(w, row_bytes, rows, x, 1, out) }
}

/// NEON matrix-matrix product in the dense layout; see [`crate::kernels::GemmFn`]. Exactly
/// equal to [`scalar::gemm_base3`]; on a CPU without NEON it calls it.
pub fn gemm(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]) {
    if !is_aarch64_feature_detected!("neon") {
        return scalar::gemm_base3(w, row_bytes, x, tokens, out);
    }
    if tokens == 0 {
        return;
    }
    let rows = checked_gemm_rows(w, row_bytes, x.len(), tokens, out.len(), BASE3_DIGITS);
    // SAFETY: NEON was detected just above and `DOT` is false; the checks guarantee that `w`
    // is whole row groups holding `rows` rows of `row_bytes` (a positive multiple of 32), `x`
    // holds `tokens` rows of `row_bytes * 5` activations and `out` `tokens * rows` outputs.
    unsafe { products::<Digits, false>(w, row_bytes, rows, x, tokens, out) }
}

/// NEON + dotprod matrix-vector product in the dense layout; see [`crate::kernels::GemvFn`].
/// Exactly equal to [`scalar::gemv_base3`]; on a CPU without dotprod it calls [`gemv`].
pub fn gemv_dotprod(w: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
    if !(is_aarch64_feature_detected!("neon") && is_aarch64_feature_detected!("dotprod")) {
        return gemv(w, row_bytes, x, out);
    }
    let rows = checked_rows(w, row_bytes, x.len(), 1, BASE3_DIGITS).min(out.len());
    // SAFETY: NEON and dotprod were detected just above, so `DOT` may be true; the rest as in
    // `gemv`.
    unsafe { products::<Digits, true>(w, row_bytes, rows, x, 1, out) }
}

/// NEON + dotprod matrix-matrix product in the dense layout; see [`crate::kernels::GemmFn`].
/// Exactly equal to [`scalar::gemm_base3`]; on a CPU without dotprod it calls [`gemm`].
pub fn gemm_dotprod(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]) {
    if !(is_aarch64_feature_detected!("neon") && is_aarch64_feature_detected!("dotprod")) {
        return gemm(w, row_bytes, x, tokens, out);
    }
    if tokens == 0 {
        return;
    }
    let rows = checked_gemm_rows(w, row_bytes, x.len(), tokens, out.len(), BASE3_DIGITS);
    // SAFETY: NEON and dotprod were detected just above, so `DOT` may be true; the rest as in
    // `gemm`.
    unsafe { products::<Digits, true>(w, row_bytes, rows, x, tokens, out) }
}

/// The dense layout for the NEON driver ([`products`]).
struct Digits;

impl Layout for Digits {
    const ELEMS: usize = BASE3_BLOCK_ELEMS;

    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn tile<const DOT: bool, const R: usize, const T: usize>(
        w: *const u8,
        x: *const i8,
        x_stride: usize,
        blocks: usize,
    ) -> [[i32; T]; R] {
        if DOT {
            // SAFETY: the trait's contract, dotprod included.
            tile_dot::<R, T>(w, x, x_stride, blocks)
        } else {
            // SAFETY: the trait's contract.
            tile::<false, R, T>(w, x, x_stride, blocks)
        }
    }
}

/// [`tile`] with `sdot`, in a function compiled for dotprod.
///
/// # Safety
///
/// As [`tile`], and dotprod must be available.
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn tile_dot<const R: usize, const T: usize>(
    w: *const u8,
    x: *const i8,
    x_stride: usize,
    blocks: usize,
) -> [[i32; T]; R] {
    // SAFETY: the caller's guarantees.
    tile::<true, R, T>(w, x, x_stride, blocks)
}

/// The five digit vectors of one half (16 bytes) of a block.
///
/// # Safety
///
/// NEON must be available and the 16 bytes from `p` readable.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn digits(p: *const u8) -> [int8x16_t; BASE3_DIGITS] {
    let (low, high) = (vdupq_n_u8(85), vdupq_n_u8(170));
    // SAFETY: 16 readable bytes by the contract.
    let mut m = vld1q_u8(p);
    std::array::from_fn(|_| {
        let carries = vaddq_s8(
            vreinterpretq_s8_u8(vcgtq_u8(m, low)),
            vreinterpretq_s8_u8(vcgtq_u8(m, high)),
        );
        m = vaddq_u8(vaddq_u8(m, m), m);
        vnegq_s8(carries)
    })
}

/// `sum_k c[r, k] * x[t, k]` (digits, not weights) for `R` consecutive rows of one row group,
/// the first starting at `w`, and `T` activation rows `x_stride` apart, over `blocks` blocks;
/// with `sdot` if `DOT`, else `smlal` into i16 lanes widened every [`FLUSH_BLOCKS`] blocks.
///
/// # Safety
///
/// NEON must be available, and dotprod too if `DOT`; for every `r < R` and `b < blocks` the
/// 32 bytes from `w + b * BLOCK_STEP + r * 32`, and for every `t < T` the `blocks * 160`
/// bytes from `x + t * x_stride`, must be readable.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn tile<const DOT: bool, const R: usize, const T: usize>(
    w: *const u8,
    x: *const i8,
    x_stride: usize,
    blocks: usize,
) -> [[i32; T]; R] {
    let mut wp = [w; R];
    for (r, p) in wp.iter_mut().enumerate() {
        // SAFETY: the first block of row `r < R`, inside the readable range by the contract.
        *p = w.add(r * BASE3_BLOCK_BYTES);
    }
    let mut xp = [x; T];
    for (t, p) in xp.iter_mut().enumerate() {
        // SAFETY: the start of activation row `t < T`, readable by the contract.
        *p = x.add(t * x_stride);
    }
    let mut acc = [[vdupq_n_s32(0); T]; R];
    let mut b0 = 0;
    while b0 < blocks {
        let b1 = (b0 + FLUSH_BLOCKS).min(blocks);
        // One i16 accumulator per half of a block, per row and token (`smlal` only).
        let mut acc16 = [[[vdupq_n_s16(0); 2]; T]; R];
        for _ in b0..b1 {
            for ((p, accr), acc16r) in wp.iter_mut().zip(acc.iter_mut()).zip(acc16.iter_mut()) {
                for half in 0..2 {
                    // SAFETY: half of one of the `blocks` blocks of a row: readable by the
                    // contract.
                    let ds = digits(p.add(16 * half));
                    for ((&xb, a), a16) in xp.iter().zip(accr.iter_mut()).zip(acc16r.iter_mut()) {
                        for (i, &d) in ds.iter().enumerate() {
                            // SAFETY: activations `32 i + 16 half..` of the current block.
                            let xv = vld1q_s8(xb.add(32 * i + 16 * half));
                            if DOT {
                                // SAFETY: dotprod is available by the contract when `DOT`.
                                *a = sdot(*a, d, xv);
                            } else {
                                let h = &mut a16[half];
                                *h = vmlal_s8(*h, vget_low_s8(d), vget_low_s8(xv));
                                *h = vmlal_high_s8(*h, d, xv);
                            }
                        }
                    }
                }
                // At most one step past the row's last block.
                *p = p.wrapping_add(BLOCK_STEP);
            }
            for p in xp.iter_mut() {
                // SAFETY: at most one past the row's `blocks * 160` activations.
                *p = p.add(BASE3_BLOCK_ELEMS);
            }
        }
        if !DOT {
            for (accr, acc16r) in acc.iter_mut().zip(&acc16) {
                for (a, a16) in accr.iter_mut().zip(acc16r) {
                    *a = vpadalq_s16(vpadalq_s16(*a, a16[0]), a16[1]);
                }
            }
        }
        b0 = b1;
    }
    let mut out = [[0i32; T]; R];
    for (o, a) in out.iter_mut().zip(&acc) {
        for (ov, &av) in o.iter_mut().zip(a) {
            *ov = vaddvq_s32(av);
        }
    }
    out
}
