//! AVX2 kernels for the dense (base-3) layout, shared by every x86 set.
//!
//! A 32-byte load of a block holds five vectors of 32 weights (see [`crate::base3`]). With
//! `m' = m ^ 0x80` read as signed bytes, the digit of each byte is
//! `[m' > -43] + [m' > 42]` (two signed comparisons, each -1 or 0, added and made positive
//! with `vpabsb`), and the next `m'` is `3 m'` in wrapping byte arithmetic (the bias of 128
//! survives: `3 (m + 128) = 3 m + 128 mod 256`). The digits `c = t + 1` in {0, 1, 2} then meet
//! the activations in `vpmaddubsw` exactly as the 2-bit codes do, and the activation sum is
//! subtracted once per row and call. That is eight vector operations per 32 weights against
//! about four in the 2-bit layout, for 20% fewer bytes: it wins only where decoding waits on
//! memory (README, "the dense layout").
//!
//! # No overflow
//!
//! One `vpmaddubsw` lane lies in `[-512, 508]` (as in the 2-bit kernels); a block adds five of
//! them, so `FLUSH_BLOCKS` = 12 blocks stay within `[-30720, 30480]`, inside i16, before
//! `vpmaddwd` widens them to i32, whose wrapping sums are exact whenever the scalar reference's
//! are.
//!
//! The AVX-VNNI, AVX-512 and AMX sets use these kernels too. A 512-bit version would about
//! halve the decoding work per weight; it is not written because no machine at hand could
//! test it.

use std::arch::x86_64::*;

use super::avx2::{hsum, products, Tile, BLOCK_STEP, PREFETCH_BYTES};
use crate::base3::{BASE3_BLOCK_BYTES, BASE3_BLOCK_ELEMS, BASE3_DIGITS};
use crate::kernels::{checked_gemm_rows, checked_rows, scalar};
use crate::ternary::ROW_GROUP;

/// Blocks accumulated in i16 lanes before they are widened to i32 (see the module docs).
const FLUSH_BLOCKS: usize = 12;

// Worst case of one i16 lane after FLUSH_BLOCKS blocks: five products of -512 per block.
const _: () = assert!(FLUSH_BLOCKS * BASE3_DIGITS * 512 <= i16::MAX as usize);

// The 2-bit layout's stride and prefetch distance apply: its blocks are 32 bytes too.
const _: () = assert!(BASE3_BLOCK_BYTES == crate::ternary::BLOCK_BYTES);

/// Matrix-vector product in the dense layout; see [`crate::kernels::GemvFn`]. Exactly equal
/// to [`scalar::gemv_base3`]; on a CPU without AVX2 it calls it.
pub fn gemv(w: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
    if !is_x86_feature_detected!("avx2") {
        return scalar::gemv_base3(w, row_bytes, x, out);
    }
    let rows = checked_rows(w, row_bytes, x.len(), 1, BASE3_DIGITS).min(out.len());
    // SAFETY: AVX2 was detected just above. `checked_rows` asserted that `row_bytes` is a
    // positive multiple of 32, that `w` is whole row groups and that `x` holds `row_bytes * 5`
    // activations; `rows` rows fit in `w` and `rows` outputs fit in `out`.
    unsafe { products::<Digits>(w, row_bytes, rows, x, 1, out) }
}

/// Matrix-matrix product in the dense layout; see [`crate::kernels::GemmFn`]. Exactly equal
/// to [`scalar::gemm_base3`]; on a CPU without AVX2 it calls it.
pub fn gemm(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]) {
    if !is_x86_feature_detected!("avx2") {
        return scalar::gemm_base3(w, row_bytes, x, tokens, out);
    }
    if tokens == 0 {
        return;
    }
    let rows = checked_gemm_rows(w, row_bytes, x.len(), tokens, out.len(), BASE3_DIGITS);
    // SAFETY: AVX2 was detected just above; the checks guarantee that `w` is whole row groups
    // holding `rows` rows of `row_bytes` (a positive multiple of 32), `x` holds `tokens` rows
    // of `row_bytes * 5` activations and `out` holds `tokens * rows` outputs.
    unsafe { products::<Digits>(w, row_bytes, rows, x, tokens, out) }
}

/// The dense layout's tile for the AVX2 driver ([`products`]): digits decoded by comparisons
/// and additions, multiplied by `vpmaddubsw` into i16 lanes widened every [`FLUSH_BLOCKS`]
/// blocks.
struct Digits;

impl Tile for Digits {
    const ELEMS: usize = BASE3_BLOCK_ELEMS;

    /// Decodes each block's five digit vectors per row and meets them with the activations.
    ///
    /// # Safety
    ///
    /// The trait's contract, with 160 activations per block.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn tile<const R: usize, const T: usize>(
        w: *const u8,
        x: *const i8,
        x_stride: usize,
        blocks: usize,
    ) -> [[i32; T]; R] {
        let bias = _mm256_set1_epi8(-128);
        let low = _mm256_set1_epi8(-43);
        let high = _mm256_set1_epi8(42);
        let ones = _mm256_set1_epi16(1);
        let mut wp = [w; R];
        for (r, p) in wp.iter_mut().enumerate() {
            // SAFETY: the first block of row `r < R`, inside the readable range by the contract.
            *p = w.add(r * BASE3_BLOCK_BYTES);
        }
        let mut xp = [x as *const __m256i; T];
        for (t, p) in xp.iter_mut().enumerate() {
            // SAFETY: the start of activation row `t < T`, readable by the contract.
            *p = x.add(t * x_stride) as *const __m256i;
        }
        let mut acc = [[_mm256_setzero_si256(); T]; R];
        let mut b0 = 0;
        while b0 < blocks {
            let b1 = (b0 + FLUSH_BLOCKS).min(blocks);
            let mut acc16 = [[_mm256_setzero_si256(); T]; R];
            for _ in b0..b1 {
                if R == ROW_GROUP {
                    // A hint only: prefetching past the end is harmless, and `wrapping_add` keeps
                    // the address computation itself defined.
                    let ahead = wp[0].wrapping_add(PREFETCH_BYTES) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                }
                for (p, acc16r) in wp.iter_mut().zip(acc16.iter_mut()) {
                    // SAFETY: one of the `blocks` blocks of a row: readable by the contract. The
                    // bumped pointer is at most one step past the row's last block.
                    let mut m = _mm256_xor_si256(_mm256_loadu_si256(*p as *const __m256i), bias);
                    *p = p.wrapping_add(BLOCK_STEP);
                    for i in 0..BASE3_DIGITS {
                        let carries =
                            _mm256_add_epi8(_mm256_cmpgt_epi8(m, low), _mm256_cmpgt_epi8(m, high));
                        let digit = _mm256_abs_epi8(carries);
                        if i + 1 < BASE3_DIGITS {
                            m = _mm256_add_epi8(opaque(_mm256_add_epi8(m, m)), m);
                        }
                        for (&xb, a) in xp.iter().zip(acc16r.iter_mut()) {
                            // SAFETY: activations `32 i..32 i + 32` of the current block.
                            let xv = _mm256_loadu_si256(xb.add(i));
                            *a = _mm256_add_epi16(*a, _mm256_maddubs_epi16(digit, xv));
                        }
                    }
                }
                for p in xp.iter_mut() {
                    // SAFETY: at most one past the row's `blocks * 160` activations.
                    *p = p.add(BASE3_BLOCK_ELEMS / 32);
                }
            }
            for (accr, acc16r) in acc.iter_mut().zip(&acc16) {
                for (a, &a16) in accr.iter_mut().zip(acc16r) {
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(a16, ones));
                }
            }
            b0 = b1;
        }
        let mut out = [[0i32; T]; R];
        for (o, a) in out.iter_mut().zip(&acc) {
            for (ov, &av) in o.iter_mut().zip(a) {
                *ov = hsum(av);
            }
        }
        out
    }
}

/// `v`, unchanged, where the compiler cannot see it: otherwise it folds `m + m + m` into a
/// byte multiply by 3, which x86 lacks and which it emulates with 16-bit multiplies, shifts,
/// masks and a pack (measured 2.6x slower than the two additions).
#[target_feature(enable = "avx2")]
#[inline]
fn opaque(mut v: __m256i) -> __m256i {
    // SAFETY: an empty instruction sequence that only claims to modify one register.
    unsafe {
        std::arch::asm!("/* {0} */", inout(ymm_reg) v, options(pure, nomem, nostack, preserves_flags));
    }
    v
}
