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

use super::avx2::{maddubs_tile, products, Codes, Tile, MAX_CODE_VECTORS};
use crate::base3::{BASE3_BLOCK_BYTES, BASE3_BLOCK_ELEMS, BASE3_DIGITS};
use crate::kernels::{checked_gemm_rows, checked_rows, scalar};

/// Blocks accumulated in i16 lanes before they are widened to i32 (see the module docs).
const FLUSH_BLOCKS: usize = 12;

// Worst case of one i16 lane after FLUSH_BLOCKS blocks: five products of -512 per block.
const _: () = assert!(FLUSH_BLOCKS * BASE3_DIGITS * 512 <= i16::MAX as usize);

// The 2-bit layout's tile applies: its blocks are 32 bytes too.
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

/// The dense layout's digits for the AVX2 tile ([`maddubs_tile`]), by comparisons and
/// additions.
struct Digits;

impl Codes for Digits {
    const VECTORS: usize = BASE3_DIGITS;
    const FLUSH_BLOCKS: usize = FLUSH_BLOCKS;

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn decode(p: *const u8) -> [__m256i; MAX_CODE_VECTORS] {
        let bias = _mm256_set1_epi8(-128);
        let (low, high) = (_mm256_set1_epi8(-43), _mm256_set1_epi8(42));
        // SAFETY: 32 readable bytes by the contract.
        let mut m = _mm256_xor_si256(unsafe { _mm256_loadu_si256(p as *const __m256i) }, bias);
        std::array::from_fn(|i| {
            let carries = _mm256_add_epi8(_mm256_cmpgt_epi8(m, low), _mm256_cmpgt_epi8(m, high));
            if i + 1 < BASE3_DIGITS {
                m = _mm256_add_epi8(opaque(_mm256_add_epi8(m, m)), m);
            }
            _mm256_abs_epi8(carries)
        })
    }
}

impl Tile for Digits {
    const ELEMS: usize = BASE3_BLOCK_ELEMS;

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn tile<const R: usize, const T: usize>(
        w: *const u8,
        x: *const i8,
        x_stride: usize,
        blocks: usize,
    ) -> [[i32; T]; R] {
        // SAFETY: the trait's contract, with 160 activations per block.
        unsafe { maddubs_tile::<Self, R, T>(w, x, x_stride, blocks) }
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
