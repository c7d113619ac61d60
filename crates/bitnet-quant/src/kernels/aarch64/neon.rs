//! NEON kernels for the runtime layout, with and without the dot-product extension, and for the
//! f16, Q8_0 and Q6_K output heads (both sets share those: they need no extension).
//!
//! As in the AVX2 set, with codes `c = t + 1` in {0, 1, 2}, `sum_k t_k x_k = sum_k c_k x_k -
//! sum_k x_k`: the kernels multiply codes, and the second sum, which depends on the activation
//! row only, is computed once per row and call. Two 16-byte loads of a block, shifts and masks
//! give the codes of its 128 weights as eight vectors of 16 that line up with the block's eight
//! 16-byte activation vectors (see [`crate::ternary`]).
//!
//! - `neon` (every AArch64 CPU): `smlal` / `smlal2` multiply the bytes and add the products into
//!   i16 lanes, which `sadalp` adds pairwise into i32 lanes every `FLUSH_BLOCKS` blocks.
//! - `neon-dotprod` (the Armv8.2 `dotprod` extension): `sdot` adds four products at a time into
//!   i32 lanes. Its intrinsic `vdotq_s32` is not stable in Rust yet, so `sdot` is one
//!   instruction of inline assembly. The codes in bits 5-4 and 3-2 are not shifted down but only
//!   masked, so they are `16 * c` and `4 * c` (still at most 32, a valid signed byte); their
//!   products go to accumulators of their own, which are shifted right by 4 and 2 (exact: every
//!   lane is a multiple of 16 or 4) into the main one every `DOT_FLUSH_BLOCKS` blocks. That is
//!   one operation per code vector instead of two.
//!
//! # No overflow
//!
//! One product `c * x` lies in `[-256, 254]`. In the `neon` set each i16 lane takes 8 products
//! per block (the low and high halves of four vectors), in `[-2048, 2032]`, so `FLUSH_BLOCKS` =
//! 8 blocks of them stay within `[-16384, 16256]`, inside i16. In the `neon-dotprod` set a lane of
//! the scaled accumulators takes 8 products per block of at most `32 * 128 = 4096` in magnitude,
//! so `DOT_FLUSH_BLOCKS` = 1024 blocks stay within 2^25, far inside i32, and the shifts are exact.
//! Everything else is i32 lanes whose additions wrap modulo 2^32, so the horizontal sums minus
//! the activation sum equal the exact `sum_k t_k x_k` whenever that fits in i32, which is
//! whenever the scalar reference does not overflow either, however long the rows.
//!
//! # Weight reuse
//!
//! As in the AVX2 set, every product is computed by a tile of `R` weight rows against `T`
//! activation rows: each block of weights is loaded and unpacked once and used for `T` tokens,
//! and each activation vector is loaded once per `R` rows. `gemv` uses 4 rows x 1 token and
//! `gemm` 1 row x 4 tokens, with smaller tiles for the 1 to 3 tokens left over. These are the
//! AVX2 set's shapes; they have not been tuned on Arm hardware.

use std::arch::aarch64::*;
use std::arch::asm;
use std::arch::is_aarch64_feature_detected;

use crate::kernels::{
    checked_gemm_rows, checked_rows, combine_q8_sums, combine_sums, scalar, DOT_SUMS, Q8_DOT_SUMS,
};
use crate::q6_k::{self, Q6_K_BLOCK, Q6_K_BYTES};
use crate::q8_0::{Q8_0_BLOCK, Q8_0_BYTES};
use crate::ternary::{block_offset, BLOCK_BYTES, BLOCK_ELEMS, ROW_GROUP};

/// Blocks accumulated in i16 lanes before they are widened to i32 (see the module docs).
const FLUSH_BLOCKS: usize = 8;

// Worst case of one i16 lane after FLUSH_BLOCKS blocks: 8 products of -256 per block.
const _: () = assert!(FLUSH_BLOCKS * 8 * 256 <= i16::MAX as usize);

/// Blocks accumulated in the scaled `sdot` accumulators before they are shifted into the main
/// one (see the module docs).
const DOT_FLUSH_BLOCKS: usize = 1024;

// Worst case of one scaled i32 lane after DOT_FLUSH_BLOCKS blocks: 8 products of 32 * 128.
const _: () = assert!(DOT_FLUSH_BLOCKS * 8 * 32 * 128 <= i32::MAX as usize);

/// Rows of weights per tile when streaming one token (decode): one whole row group, so one
/// sequential stream (see [`crate::ternary`]).
const GEMV_ROWS: usize = ROW_GROUP;

/// Bytes from one block of a row to its next: the blocks of a group's rows are interleaved.
const BLOCK_STEP: usize = ROW_GROUP * BLOCK_BYTES;

/// NEON matrix-vector product; see [`crate::kernels::GemvFn`]. Exactly equal to
/// [`scalar::gemv`]; on a CPU without NEON it calls it.
pub fn gemv(w: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
    if !is_aarch64_feature_detected!("neon") {
        return scalar::gemv(w, row_bytes, x, out);
    }
    debug_assert_eq!(x.len(), row_bytes * 4);
    let rows = checked_rows(w, row_bytes, x.len(), 1, 4).min(out.len());
    // SAFETY: NEON was detected just above and `DOT` is false. `checked_rows` asserted that
    // `row_bytes` is a positive multiple of 32 and that `x` holds `row_bytes * 4` activations;
    // `rows` rows of `row_bytes` fit in `w` and `rows` outputs fit in `out`, which is all
    // `products` reads and writes.
    unsafe { products::<TwoBit, false>(w, row_bytes, rows, x, 1, out) }
}

/// NEON matrix-matrix product; see [`crate::kernels::GemmFn`]. Exactly equal to
/// [`scalar::gemm`]; on a CPU without NEON it calls it.
pub fn gemm(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]) {
    if !is_aarch64_feature_detected!("neon") {
        return scalar::gemm(w, row_bytes, x, tokens, out);
    }
    if tokens == 0 {
        return;
    }
    let rows = checked_gemm_rows(w, row_bytes, x.len(), tokens, out.len(), 4);
    // SAFETY: NEON was detected just above and `DOT` is false; `checked_rows` and the assert
    // above guarantee that `w` is whole row groups holding `rows` rows of `row_bytes` (a
    // positive multiple of 32), `x` holds `tokens` rows of `row_bytes * 4` activations and
    // `out` holds `tokens * rows` outputs.
    unsafe { products::<TwoBit, false>(w, row_bytes, rows, x, tokens, out) }
}

/// NEON + dotprod matrix-vector product; see [`crate::kernels::GemvFn`]. Exactly equal to
/// [`scalar::gemv`]; on a CPU without dotprod it calls [`gemv`].
pub fn gemv_dotprod(w: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
    if !(is_aarch64_feature_detected!("neon") && is_aarch64_feature_detected!("dotprod")) {
        return gemv(w, row_bytes, x, out);
    }
    debug_assert_eq!(x.len(), row_bytes * 4);
    let rows = checked_rows(w, row_bytes, x.len(), 1, 4).min(out.len());
    // SAFETY: NEON and dotprod were detected just above, so `DOT` may be true. `checked_rows`
    // asserted that `row_bytes` is a positive multiple of 32 and that `x` holds
    // `row_bytes * 4` activations; `rows` rows of `row_bytes` fit in `w` and `rows` outputs fit
    // in `out`, which is all `products` reads and writes.
    unsafe { products::<TwoBit, true>(w, row_bytes, rows, x, 1, out) }
}

/// NEON + dotprod matrix-matrix product; see [`crate::kernels::GemmFn`]. Exactly equal to
/// [`scalar::gemm`]; on a CPU without dotprod it calls [`gemm`].
pub fn gemm_dotprod(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]) {
    if !(is_aarch64_feature_detected!("neon") && is_aarch64_feature_detected!("dotprod")) {
        return gemm(w, row_bytes, x, tokens, out);
    }
    if tokens == 0 {
        return;
    }
    let rows = checked_gemm_rows(w, row_bytes, x.len(), tokens, out.len(), 4);
    // SAFETY: NEON and dotprod were detected just above, so `DOT` may be true; `checked_rows`
    // and the assert above guarantee that `w` is whole row groups holding `rows` rows of
    // `row_bytes` (a positive multiple of 32), `x` holds `tokens` rows of `row_bytes * 4`
    // activations and `out` holds `tokens * rows` outputs.
    unsafe { products::<TwoBit, true>(w, row_bytes, rows, x, tokens, out) }
}

/// `out[t * rows + r] = sum_k t[r, k] * x[t, k]` for `r < rows`, `t < tokens`, with `sdot` if
/// `DOT` and `smlal` otherwise.
///
/// # Safety
///
/// NEON must be available, and dotprod too if `DOT`. `row_bytes` must be a positive multiple
/// of [`BLOCK_BYTES`], `w` must hold whole row groups of at least `rows` rows, `x` at least
/// `tokens * row_bytes / 32 * L::ELEMS` activations, and `out` at least `tokens * rows`
/// values.
#[target_feature(enable = "neon")]
pub(super) unsafe fn products<L: Layout, const DOT: bool>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    x: &[i8],
    tokens: usize,
    out: &mut [i32],
) {
    debug_assert!(row_bytes > 0 && row_bytes.is_multiple_of(BLOCK_BYTES));
    debug_assert!(w.len() >= rows * row_bytes);
    debug_assert!(x.len() >= tokens * row_bytes / BLOCK_BYTES * L::ELEMS);
    debug_assert!(out.len() >= tokens * rows);
    // Each group of tokens streams all the weights once (see the module docs).
    let mut t0 = 0;
    while t0 + 4 <= tokens {
        // SAFETY (for these calls): the caller's guarantees, with `t0 + T <= tokens`.
        group::<L, DOT, 1, 4>(w, row_bytes, rows, x, t0, out);
        t0 += 4;
    }
    match tokens - t0 {
        0 => {}
        1 => group::<L, DOT, GEMV_ROWS, 1>(w, row_bytes, rows, x, t0, out),
        2 => group::<L, DOT, 2, 2>(w, row_bytes, rows, x, t0, out),
        _ => group::<L, DOT, 1, 3>(w, row_bytes, rows, x, t0, out),
    }
}

/// A runtime layout's inner loop for [`products`]: the 2-bit layout's ([`TwoBit`]) or the
/// dense one's (`base3::Digits`).
pub(super) trait Layout {
    /// Activations per 32-byte block of weights.
    const ELEMS: usize;

    /// `sum_k c[r, k] * x[t, k]` (codes or digits, not weights) for `R` consecutive rows of
    /// one row group, the first starting at `w`, and `T` activation rows `x_stride` apart,
    /// over `blocks` blocks; with `sdot` if `DOT`.
    ///
    /// # Safety
    ///
    /// NEON must be available, and dotprod too if `DOT`; for every `r < R` and `b < blocks`
    /// the 32 bytes from `w + b * BLOCK_STEP + r * 32`, and for every `t < T` the
    /// `blocks * ELEMS` bytes from `x + t * x_stride`, must be readable.
    unsafe fn tile<const DOT: bool, const R: usize, const T: usize>(
        w: *const u8,
        x: *const i8,
        x_stride: usize,
        blocks: usize,
    ) -> [[i32; T]; R];
}

/// The 2-bit layout ([`crate::ternary`]).
struct TwoBit;

impl Layout for TwoBit {
    const ELEMS: usize = BLOCK_ELEMS;

    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn tile<const DOT: bool, const R: usize, const T: usize>(
        w: *const u8,
        x: *const i8,
        x_stride: usize,
        blocks: usize,
    ) -> [[i32; T]; R] {
        // SAFETY: the trait's contract; a row group's rows start one block apart.
        tile::<DOT, R, T>(w, BLOCK_BYTES, x, x_stride, blocks)
    }
}

/// The products of all `rows` rows with the `T` activation rows starting at token `t0`, in
/// tiles of `R` rows (and single rows for the rest), into `out[t * rows + r]`. `R` divides
/// [`ROW_GROUP`], so a tile never straddles two row groups.
///
/// # Safety
///
/// As [`products`], with `t0 + T <= tokens`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn group<L: Layout, const DOT: bool, const R: usize, const T: usize>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    x: &[i8],
    t0: usize,
    out: &mut [i32],
) {
    let blocks = row_bytes / BLOCK_BYTES;
    let k = blocks * L::ELEMS;
    // In bounds: `x` holds at least `(t0 + T) * k` activations.
    let xs = &x[t0 * k..(t0 + T) * k];
    let sums: [i32; T] = std::array::from_fn(|t| sum_x(&xs[t * k..(t + 1) * k]));
    const { assert!(ROW_GROUP.is_multiple_of(R)) };
    let mut store = |r: usize, d: &[[i32; T]]| {
        for (i, di) in d.iter().enumerate() {
            for (t, &v) in di.iter().enumerate() {
                out[(t0 + t) * rows + r + i] = v.wrapping_sub(sums[t]);
            }
        }
    };
    let mut r = 0;
    while r + R <= rows {
        // SAFETY: rows `r..r + R` (`r` a multiple of `R`, so inside one row group) lie in `w`,
        // the `T` activation rows of `xs` are `k` apart and `k` long, and dotprod is available
        // if `DOT`.
        let p = w[block_offset(row_bytes, r, 0)..].as_ptr();
        store(r, &L::tile::<DOT, R, T>(p, xs.as_ptr(), k, blocks));
        r += R;
    }
    while r < rows {
        // SAFETY: as above, for the single row `r < rows`.
        let p = w[block_offset(row_bytes, r, 0)..].as_ptr();
        store(r, &L::tile::<DOT, 1, T>(p, xs.as_ptr(), k, blocks));
        r += 1;
    }
}

/// `sum_k c[r, k] * x[t, k]` (codes, not weights) for `R` rows of one row group, whose first
/// blocks start at `w` and `row_stride` apart and whose next blocks follow [`BLOCK_STEP`] on,
/// and `T` activation rows from `x`, `x_stride` apart, over `blocks` blocks: [`tile_dot`] if
/// `DOT`, else [`tile_mla`].
///
/// # Safety
///
/// As [`tile_mla`], and dotprod must be available if `DOT`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn tile<const DOT: bool, const R: usize, const T: usize>(
    w: *const u8,
    row_stride: usize,
    x: *const i8,
    x_stride: usize,
    blocks: usize,
) -> [[i32; T]; R] {
    if DOT {
        // SAFETY: the caller's guarantees, dotprod included.
        tile_dot::<R, T>(w, row_stride, x, x_stride, blocks)
    } else {
        // SAFETY: the caller's guarantees.
        tile_mla::<R, T>(w, row_stride, x, x_stride, blocks)
    }
}

/// [`tile`] with `smlal` into i16 lanes, widened into i32 lanes every [`FLUSH_BLOCKS`] blocks.
///
/// # Safety
///
/// NEON must be available; for every `r < R` and `b < blocks` the 32 bytes from
/// `w + r * row_stride + b * BLOCK_STEP`,
/// and for every `t < T` the `blocks * 128` bytes from `x + t * x_stride`, must be readable.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn tile_mla<const R: usize, const T: usize>(
    w: *const u8,
    row_stride: usize,
    x: *const i8,
    x_stride: usize,
    blocks: usize,
) -> [[i32; T]; R] {
    // Running pointers to the current block of each weight row and activation row.
    let mut wp = [w; R];
    for (r, p) in wp.iter_mut().enumerate() {
        // SAFETY: the start of row `r < R`, inside the readable range by the contract.
        *p = w.add(r * row_stride);
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
        // Two i16 accumulators per row and token, for the even and odd vectors of a block.
        let mut acc16 = [[[vdupq_n_s16(0); 2]; T]; R];
        for _ in b0..b1 {
            for (p, acc16r) in wp.iter_mut().zip(acc16.iter_mut()) {
                // SAFETY: one of the `blocks` blocks of a row: readable by the contract.
                // The bumped pointer is at most one past the row's `blocks * 32` bytes.
                let wv = codes(*p);
                *p = p.wrapping_add(BLOCK_STEP);
                for (&xb, a) in xp.iter().zip(acc16r.iter_mut()) {
                    for (i, &cv) in wv.iter().enumerate() {
                        // SAFETY: vector `i < 8` of the 128 activations of the same block of
                        // an activation row: readable by the contract.
                        let xv = vld1q_s8(xb.add(16 * i));
                        let h = &mut a[i % 2];
                        *h = vmlal_s8(*h, vget_low_s8(cv), vget_low_s8(xv));
                        *h = vmlal_high_s8(*h, cv, xv);
                    }
                }
            }
            for p in xp.iter_mut() {
                // SAFETY: at most one past the row's `blocks * 128` activations.
                *p = p.add(BLOCK_ELEMS);
            }
        }
        for (accr, acc16r) in acc.iter_mut().zip(&acc16) {
            for (a, a16) in accr.iter_mut().zip(acc16r) {
                *a = vpadalq_s16(vpadalq_s16(*a, a16[0]), a16[1]);
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

/// [`tile`] with `sdot` into i32 lanes, the codes of bits 5-4 and 3-2 scaled by 16 and 4 in
/// accumulators of their own (see the module docs).
///
/// # Safety
///
/// As [`tile_mla`], and dotprod must be available.
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn tile_dot<const R: usize, const T: usize>(
    w: *const u8,
    row_stride: usize,
    x: *const i8,
    x_stride: usize,
    blocks: usize,
) -> [[i32; T]; R] {
    let mut wp = [w; R];
    for (r, p) in wp.iter_mut().enumerate() {
        // SAFETY: the start of row `r < R`, inside the readable range by the contract.
        *p = w.add(r * row_stride);
    }
    let mut xp = [x; T];
    for (t, p) in xp.iter_mut().enumerate() {
        // SAFETY: the start of activation row `t < T`, readable by the contract.
        *p = x.add(t * x_stride);
    }
    // Per row and token: the products of the unscaled codes (bits 7-6 and 1-0), and those of
    // the codes scaled by 16 (bits 5-4) and by 4 (bits 3-2).
    let mut acc = [[[vdupq_n_s32(0); 3]; T]; R];
    let mut b0 = 0;
    while b0 < blocks {
        let b1 = (b0 + DOT_FLUSH_BLOCKS).min(blocks);
        for _ in b0..b1 {
            for (p, accr) in wp.iter_mut().zip(acc.iter_mut()) {
                // SAFETY: one of the `blocks` blocks of a row: readable by the contract.
                // The bumped pointer is at most one past the row's `blocks * 32` bytes.
                let wv = scaled_codes(*p);
                *p = p.wrapping_add(BLOCK_STEP);
                for (&xb, a) in xp.iter().zip(accr.iter_mut()) {
                    for (i, &cv) in wv.iter().enumerate() {
                        // SAFETY: vector `i < 8` of the 128 activations of the same block of
                        // an activation row: readable by the contract. dotprod is available.
                        let xv = vld1q_s8(xb.add(16 * i));
                        let slot = &mut a[SCALED_SLOT[i]];
                        *slot = sdot(*slot, cv, xv);
                    }
                }
            }
            for p in xp.iter_mut() {
                // SAFETY: at most one past the row's `blocks * 128` activations.
                *p = p.add(BLOCK_ELEMS);
            }
        }
        // (Nested loops: a flattened iterator here keeps `acc` in memory, not in registers.)
        for accr in acc.iter_mut() {
            for a in accr.iter_mut() {
                // Exact: the lanes of a[1] and a[2] are multiples of 16 and 4, not overflowed.
                a[0] = vsraq_n_s32::<4>(a[0], a[1]);
                a[0] = vsraq_n_s32::<2>(a[0], a[2]);
                a[1] = vdupq_n_s32(0);
                a[2] = vdupq_n_s32(0);
            }
        }
        b0 = b1;
    }
    let mut out = [[0i32; T]; R];
    for (o, a) in out.iter_mut().zip(&acc) {
        for (ov, av) in o.iter_mut().zip(a) {
            *ov = vaddvq_s32(av[0]);
        }
    }
    out
}

/// The accumulator of [`tile_dot`] that takes the products of code vector `i` of
/// [`scaled_codes`]: 0 unscaled, 1 scaled by 16, 2 scaled by 4.
const SCALED_SLOT: [usize; 8] = [0, 0, 1, 1, 2, 2, 0, 0];

/// The codes of the block at `p` as [`codes`] gives them, except that vectors 2 and 3 hold
/// `16 * c` and vectors 4 and 5 hold `4 * c` (masked in place, not shifted down).
///
/// # Safety
///
/// NEON must be available and the 32 bytes from `p` readable.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn scaled_codes(p: *const u8) -> [int8x16_t; 8] {
    // SAFETY: the block's 32 bytes are readable by the contract.
    let lo = vld1q_u8(p);
    let hi = vld1q_u8(p.add(16));
    let (m5_4, m3_2, m1_0) = (vdupq_n_u8(0x30), vdupq_n_u8(0x0C), vdupq_n_u8(0x03));
    let c = [
        vshrq_n_u8::<6>(lo),
        vshrq_n_u8::<6>(hi),
        vandq_u8(lo, m5_4),
        vandq_u8(hi, m5_4),
        vandq_u8(lo, m3_2),
        vandq_u8(hi, m3_2),
        vandq_u8(lo, m1_0),
        vandq_u8(hi, m1_0),
    ];
    let mut out = [vdupq_n_s8(0); 8];
    for (o, c) in out.iter_mut().zip(c) {
        *o = vreinterpretq_s8_u8(c);
    }
    out
}

/// The codes of the 128 weights of the block at `p` as eight vectors of bytes in {0, 1, 2}:
/// vector `i` holds those of weights `16 * i .. 16 * i + 16`, lined up with the block's
/// activation vector `i`.
///
/// # Safety
///
/// NEON must be available and the 32 bytes from `p` readable.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn codes(p: *const u8) -> [int8x16_t; 8] {
    let mask = vdupq_n_u8(3);
    // SAFETY: the block's 32 bytes are readable by the contract.
    let lo = vld1q_u8(p);
    let hi = vld1q_u8(p.add(16));
    // Bits 7-6 of byte j hold weight j, bits 5-4 weight j + 32, and so on: lane `l` of the
    // bytes shifted right by `6 - 2 * l` (and masked) covers weights `32 * l .. 32 * l + 32`,
    // the first 16 from `lo` and the next 16 from `hi`.
    let c = [
        vshrq_n_u8::<6>(lo),
        vshrq_n_u8::<6>(hi),
        vandq_u8(vshrq_n_u8::<4>(lo), mask),
        vandq_u8(vshrq_n_u8::<4>(hi), mask),
        vandq_u8(vshrq_n_u8::<2>(lo), mask),
        vandq_u8(vshrq_n_u8::<2>(hi), mask),
        vandq_u8(lo, mask),
        vandq_u8(hi, mask),
    ];
    let mut out = [vdupq_n_s8(0); 8];
    for (o, c) in out.iter_mut().zip(c) {
        *o = vreinterpretq_s8_u8(c);
    }
    out
}

/// `sum_k x[k]` over a padded activation row (a whole number of 16-byte vectors; wrapping,
/// like the kernels' lanes).
#[target_feature(enable = "neon")]
#[inline]
fn sum_x(x: &[i8]) -> i32 {
    let mut acc = vdupq_n_s32(0);
    for v in x.chunks_exact(16) {
        // SAFETY: `v` is 16 readable bytes.
        let xv = unsafe { vld1q_s8(v.as_ptr()) };
        acc = vpadalq_s16(acc, vpaddlq_s8(xv));
    }
    vaddvq_s32(acc)
}

/// `acc + ` the dot products of each group of four bytes of `a` and `b`, per i32 lane (the
/// `sdot` instruction; exact but for the wrapping of the i32 lanes).
///
/// # Safety
///
/// dotprod must be available.
#[target_feature(enable = "neon,dotprod")]
#[inline]
pub(super) unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: `sdot` only reads and writes these vector registers; dotprod is available by the
    // contract.
    asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// NEON f16 dot product of an output-head row; see [`crate::kernels::DotF16Fn`]. The same
/// bits as [`scalar::dot_f16`]: eight 4-lane vectors are the 32 running sums, multiply and add
/// rounded separately (no fused multiply-add), the last `len mod 32` values added in scalar
/// code to the same sums.
pub fn dot_f16(w: &[half::f16], x: &[f32]) -> f32 {
    if !is_aarch64_feature_detected!("neon") {
        return scalar::dot_f16(w, x);
    }
    let n = w.len().min(x.len());
    let chunks = n / DOT_SUMS;
    // SAFETY: NEON was detected; `dot_f16_neon` reads `chunks * 32` values of `w` and `x`,
    // which both hold.
    let mut acc = unsafe { dot_f16_neon(w.as_ptr() as *const u16, x.as_ptr(), chunks) };
    for k in chunks * DOT_SUMS..n {
        acc[k % DOT_SUMS] += w[k].to_f32() * x[k];
    }
    combine_sums(&acc)
}

/// # Safety
///
/// NEON must be available; `w` and `x` must hold `chunks * 32` values.
#[target_feature(enable = "neon")]
unsafe fn dot_f16_neon(w: *const u16, x: *const f32, chunks: usize) -> [f32; DOT_SUMS] {
    let mut acc = [vdupq_n_f32(0.0); DOT_SUMS / 4];
    for c in 0..chunks {
        for v in 0..4 {
            let at = DOT_SUMS * c + 8 * v;
            // SAFETY: values `at..at + 8` lie in the first `chunks * 32` (the contract).
            let (h, x0, x1) = unsafe {
                (
                    vld1q_u16(w.add(at)),
                    vld1q_f32(x.add(at)),
                    vld1q_f32(x.add(at + 4)),
                )
            };
            let (lo, hi) = widen_f16(h);
            acc[2 * v] = vaddq_f32(acc[2 * v], vmulq_f32(lo, x0));
            acc[2 * v + 1] = vaddq_f32(acc[2 * v + 1], vmulq_f32(hi, x1));
        }
    }
    store_sums(&acc)
}

/// The eight f16 values of `h` (as bits) widened to f32, exactly (`fcvtl`, `fcvtl2`: part of
/// every AArch64 NEON unit; the f16 vector types of their intrinsics are newer than our
/// minimum Rust, so this is two instructions of inline assembly).
#[target_feature(enable = "neon")]
#[inline]
pub(super) unsafe fn widen_f16(h: uint16x8_t) -> (float32x4_t, float32x4_t) {
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: the two conversions only read and write these vector registers.
    asm!(
        "fcvtl {lo:v}.4s, {h:v}.4h",
        "fcvtl2 {hi:v}.4s, {h:v}.8h",
        h = in(vreg) h,
        lo = out(vreg) lo,
        hi = out(vreg) hi,
        options(pure, nomem, nostack, preserves_flags)
    );
    (lo, hi)
}

/// The lanes of `V` vectors in order: running sum `4i + l` is lane `l` of vector `i`.
#[target_feature(enable = "neon")]
#[inline]
pub(super) unsafe fn store_sums<const V: usize, const N: usize>(
    acc: &[float32x4_t; V],
) -> [f32; N] {
    let mut out = [0f32; N];
    for (i, v) in acc.iter().enumerate() {
        // SAFETY: `N = 4 V` at every call, so lanes `4i..4i + 4` lie in `out`.
        unsafe { vst1q_f32(out.as_mut_ptr().add(4 * i), *v) };
    }
    out
}

/// The exact sums of each group of four products `a_k * b_k` of 32 signed bytes (two vectors
/// each), as groups 0-3 and 4-7: `smull` products fit i16 (at most `128 * 128`), `saddlp` adds
/// pairs into i32, `addp` pairs of pairs.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn group_sums(a: [int8x16_t; 2], b: [int8x16_t; 2]) -> [int32x4_t; 2] {
    let pairs = |a: int8x16_t, b: int8x16_t| {
        (
            vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b))),
            vpaddlq_s16(vmull_high_s8(a, b)),
        )
    };
    let (p0, p1) = pairs(a[0], b[0]);
    let (p2, p3) = pairs(a[1], b[1]);
    [vpaddq_s32(p0, p1), vpaddq_s32(p2, p3)]
}

/// NEON Q8_0 dot product; see [`crate::kernels::DotQ8_0Fn`]. The same bits as
/// [`scalar::dot_q8_0`]: vectors `2 (b mod 2)` and `2 (b mod 2) + 1` are running sums
/// `8 (b mod 2) + j`, multiply and add rounded separately.
pub fn dot_q8_0(row: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    if !is_aarch64_feature_detected!("neon") {
        return scalar::dot_q8_0(row, xq, xd);
    }
    let blocks = (row.len() / Q8_0_BYTES)
        .min(xq.len() / Q8_0_BLOCK)
        .min(xd.len());
    // SAFETY: NEON was detected; `dot_q8_0_neon` reads `blocks` whole blocks of `row`,
    // `blocks * 32` values of `xq` and `blocks` of `xd`, inside the slices by the line above.
    combine_q8_sums(&unsafe { dot_q8_0_neon(row, xq, xd, blocks) })
}

/// # Safety
///
/// NEON must be available; `row`, `xq` and `xd` must hold `blocks` blocks.
#[target_feature(enable = "neon")]
unsafe fn dot_q8_0_neon(row: &[u8], xq: &[i8], xd: &[f32], blocks: usize) -> [f32; Q8_DOT_SUMS] {
    let mut acc = [vdupq_n_f32(0.0); Q8_DOT_SUMS / 4];
    for (b, blk) in row.chunks_exact(Q8_0_BYTES).take(blocks).enumerate() {
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32() * xd[b];
        // SAFETY: the block's 32 values follow its scale; values `32b..32b + 32` of `xq` lie
        // inside it (the contract).
        let (w, x) = unsafe {
            let (w, x) = (blk.as_ptr().add(2) as *const i8, xq.as_ptr().add(32 * b));
            (
                [vld1q_s8(w), vld1q_s8(w.add(16))],
                [vld1q_s8(x), vld1q_s8(x.add(16))],
            )
        };
        add_groups(&mut acc, b % 2, group_sums(w, x), [1, 1], d);
    }
    store_sums(&acc)
}

/// Adds the group sums `g` (groups 0-3 times `scale[0]`, 4-7 times `scale[1]`, exact in i32),
/// as f32 times `d`, to the running sums of parity `parity`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn add_groups(
    acc: &mut [float32x4_t; 4],
    parity: usize,
    g: [int32x4_t; 2],
    scale: [i32; 2],
    d: f32,
) {
    for h in 0..2 {
        let v = vcvtq_f32_s32(vmulq_n_s32(g[h], scale[h]));
        acc[2 * parity + h] = vaddq_f32(acc[2 * parity + h], vmulq_n_f32(v, d));
    }
}

/// NEON Q6_K dot product; see [`crate::kernels::DotQ6KFn`]. The same bits as
/// [`scalar::dot_q6_k`], with the running sums of [`dot_q8_0`].
pub fn dot_q6_k(row: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    if !is_aarch64_feature_detected!("neon") {
        return scalar::dot_q6_k(row, xq, xd);
    }
    let blocks = (row.len() / Q6_K_BYTES)
        .min(xq.len() / Q6_K_BLOCK)
        .min(xd.len() / 8);
    // SAFETY: NEON was detected; `dot_q6_k_neon` reads `blocks` whole blocks of `row`,
    // `blocks * 256` values of `xq` and `blocks * 8` of `xd`, inside the slices by the line
    // above.
    combine_q8_sums(&unsafe { dot_q6_k_neon(row, xq, xd, blocks) })
}

/// # Safety
///
/// NEON must be available; `row`, `xq` and `xd` must hold `blocks` super-blocks.
#[target_feature(enable = "neon")]
unsafe fn dot_q6_k_neon(row: &[u8], xq: &[i8], xd: &[f32], blocks: usize) -> [f32; Q8_DOT_SUMS] {
    let mut acc = [vdupq_n_f32(0.0); Q8_DOT_SUMS / 4];
    let (low4, three, bias) = (vdupq_n_u8(0x0f), vdupq_n_u8(3), vdupq_n_s8(32));
    for (s, blk) in row.chunks_exact(Q6_K_BYTES).take(blocks).enumerate() {
        let d_w = q6_k::block_d(blk);
        let scales = q6_k::block_scales(blk);
        for h in 0..2 {
            // SAFETY: the 32-byte runs of `ql` at 64h and 64h + 32 and of `qh` at 128 + 32h lie
            // inside the block.
            let [ql0, ql1, qh] = [64 * h, 64 * h + 32, 128 + 32 * h].map(|at| unsafe {
                let p = blk.as_ptr().add(at);
                [vld1q_u8(p), vld1q_u8(p.add(16))]
            });
            for m in 0..4 {
                let run = 4 * h + m;
                let b = 8 * s + run;
                let w = [0, 1].map(|i| {
                    let ql = if m % 2 == 0 { ql0[i] } else { ql1[i] };
                    let nibble = if m < 2 {
                        vandq_u8(ql, low4)
                    } else {
                        vshrq_n_u8::<4>(ql)
                    };
                    let bits = match m {
                        0 => qh[i],
                        1 => vshrq_n_u8::<2>(qh[i]),
                        2 => vshrq_n_u8::<4>(qh[i]),
                        _ => vshrq_n_u8::<6>(qh[i]),
                    };
                    let code = vorrq_u8(nibble, vshlq_n_u8::<4>(vandq_u8(bits, three)));
                    vsubq_s8(vreinterpretq_s8_u8(code), bias)
                });
                // SAFETY: values `32b..32b + 32` of `xq` lie inside it (the contract).
                let x = unsafe {
                    let p = xq.as_ptr().add(32 * b);
                    [vld1q_s8(p), vld1q_s8(p.add(16))]
                };
                let sc = [
                    scales[2 * run] as i8 as i32,
                    scales[2 * run + 1] as i8 as i32,
                ];
                add_groups(&mut acc, run % 2, group_sums(w, x), sc, d_w * xd[b]);
            }
        }
    }
    store_sums(&acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TernaryMatrix;

    /// Block counts around both flushes, with the largest sums of both signs and with mixed
    /// codes and activations, through every entry point (the dotprod ones fall back to the NEON
    /// ones on CPUs without dotprod).
    #[test]
    fn flush_boundaries_and_extremes() {
        let sets: [(&str, crate::kernels::GemvFn, crate::kernels::GemmFn); 2] = [
            ("neon", gemv, gemm),
            ("neon-dotprod", gemv_dotprod, gemm_dotprod),
        ];
        let (rows, tokens) = (5, 6);
        for blocks in [
            1,
            FLUSH_BLOCKS - 1,
            FLUSH_BLOCKS,
            FLUSH_BLOCKS + 1,
            2 * FLUSH_BLOCKS + 1,
            DOT_FLUSH_BLOCKS - 1,
            DOT_FLUSH_BLOCKS,
            DOT_FLUSH_BLOCKS + 1,
            2 * DOT_FLUSH_BLOCKS + 3,
        ] {
            let cols = blocks * BLOCK_ELEMS;
            // Constant codes and activations (the extremes), then a mixed pattern.
            let fills = [(-1i8, -128i8), (1, -128), (-1, 127), (1, 127), (0, 0)];
            for (fill, &(code, xv)) in fills.iter().enumerate() {
                let mixed = fill == fills.len() - 1;
                let codes: Vec<i8> = (0..rows * cols)
                    .map(|i| if mixed { (i * 7 % 3) as i8 - 1 } else { code })
                    .collect();
                let x: Vec<i8> = (0..tokens * cols)
                    .map(|i| {
                        if mixed {
                            (i * 37 % 256) as u8 as i8
                        } else {
                            xv
                        }
                    })
                    .collect();
                let m = TernaryMatrix::from_codes(&codes, rows, cols).unwrap();
                let mut want = vec![0i32; rows * tokens];
                scalar::gemm(m.bytes(), m.row_bytes(), &x, tokens, &mut want);
                if !mixed {
                    assert!(want
                        .iter()
                        .all(|&v| v == code as i32 * xv as i32 * cols as i32));
                }
                for (name, gemv, gemm) in sets {
                    let mut out = vec![0x5A5A_5A5A; rows];
                    gemv(m.bytes(), m.row_bytes(), &x[..cols], &mut out);
                    assert_eq!(
                        out,
                        want[..rows],
                        "{name} gemv {blocks} blocks, fill {fill}"
                    );
                    let mut out = vec![0x5A5A_5A5A; rows * tokens];
                    gemm(m.bytes(), m.row_bytes(), &x, tokens, &mut out);
                    assert_eq!(out, want, "{name} gemm {blocks} blocks, fill {fill}");
                }
            }
        }
    }
}
