//! AVX2 kernels for the runtime layout.
//!
//! With codes `c = t + 1` in {0, 1, 2}, `sum_k t_k x_k = sum_k c_k x_k - sum_k x_k`. The first
//! sum is what `vpmaddubsw` computes (unsigned bytes times signed bytes, adjacent pairs added
//! into i16 lanes); the second depends on the activation row only, so it is computed once per
//! row and call. One 32-byte load of a block, three shifts and four masks give the codes of its
//! 128 weights as four vectors that line up with the 128 activations (see [`crate::ternary`]).
//!
//! # No overflow
//!
//! One `vpmaddubsw` lane is `c * x + c * x` with `c <= 2` and `-128 <= x <= 127`, so it lies in
//! `[-512, 508]` and never saturates. The four products of one block add up to `[-2048, 2032]`
//! per i16 lane, and `FLUSH_BLOCKS` = 8 blocks of them to `[-16384, 16256]`, well inside
//! i16. Then `vpmaddwd` against ones widens them to i32 lanes. The i32 totals are exact as long
//! as `|sum_k c_k x_k| <= 256 * k < 2^31`, that is for rows of fewer than 2^23 inputs; past that
//! the scalar reference would overflow too.
//!
//! # Weight reuse
//!
//! Every product is computed by `tile`, which streams a tile of `R` weight rows against `T`
//! activation rows: each block of weights is loaded and unpacked once and used for `T` tokens,
//! and each activation vector is loaded once per `R` rows. `gemv` uses 4 rows x 1 token; `gemm`
//! uses 1 row x 4 tokens (prefill is compute-bound, so unpacking each weight block once per 4
//! tokens matters), 1 row x 8 tokens for rows of at most `SHORT_ROW_BLOCKS` blocks, and
//! smaller tiles for the 1 to 3 tokens left over. Tiles of 2 rows x 4
//! tokens measured slower, and sweeping the token groups over L2-sized bands of rows measured
//! no faster (the product is compute-bound, not bound by streaming the weights from L3).
//!
//! # Streaming (decode)
//!
//! A 4-row tile is one row group of the layout, so it reads one sequential stream, and it
//! prefetches `PREFETCH_BYTES` ahead of it. Measured on an AMD EPYC (Zen, one thread, 521 MB
//! of 2B-4T matrices): four separate row streams ran at 6.2 GB/s, one interleaved stream at
//! 10.5 GB/s, and with the prefetch at 14.2 GB/s, against 14.9 GB/s for a plain read loop.

use std::arch::x86_64::*;

use crate::kernels::{
    checked_gemm_rows, checked_rows, combine_q8_sums, combine_sums, scalar, DOT_SUMS, Q8_DOT_SUMS,
};
use crate::q6_k::{Q6_K_BLOCK, Q6_K_BYTES};
use crate::q8_0::{Q8_0_BLOCK, Q8_0_BYTES};
use crate::ternary::{block_offset, BLOCK_BYTES, BLOCK_ELEMS, ROW_GROUP};

/// Blocks accumulated in i16 lanes before they are widened to i32 (see the module docs).
const FLUSH_BLOCKS: usize = 8;

// Worst case of one i16 lane after FLUSH_BLOCKS blocks: 4 products of -512 per block.
const _: () = assert!(FLUSH_BLOCKS * 4 * 512 <= i16::MAX as usize);

/// The most code vectors a 32-byte block decodes into (the dense layout's five).
pub(super) const MAX_CODE_VECTORS: usize = 5;

/// Blocks per row up to which `gemm` takes 8 tokens per tile instead of 4: rows this short
/// (1024 inputs; the trainer's are 256 and 768) flush their i16 sums once, so the eight
/// tokens' sums fit the registers beside the codes, and a tile's fixed work (horizontal sums,
/// stores, pointer set-up) is shared by twice the tokens. Single-thread, alternating builds,
/// best of 40: 256 x 256 with 1024 tokens 73 -> 90-95 G multiply-adds/s, 768 x 256 70 -> 83,
/// 256 x 768 105 -> 120-128.
const SHORT_ROW_BLOCKS: usize = FLUSH_BLOCKS;

/// Rows of weights per tile when streaming one token (decode): one whole row group.
pub(super) const GEMV_ROWS: usize = ROW_GROUP;

/// How far ahead of a row group's stream its tile prefetches (see the module docs; 1 KB
/// measured 12.5 GB/s, 2 KB 14.2, 4 KB 13.8).
pub(super) const PREFETCH_BYTES: usize = 2048;

/// How far ahead of its rows the f16 head's dot product prefetches. On an AMD EPYC the hint
/// gains nothing (the hardware prefetcher keeps up there). On a Xeon with AMX (Sapphire
/// Rapids class, 2026-11, synthetic 2B-4T, `bitnet bench -p 0`, alternating builds) the head
/// without it had read 7.1 GB/s on one thread against 10.5 for the ternary layers, and
/// generation went from 11.4 to 16.2 tokens/s on two threads with a 2 KB hint; 4 KB then gave
/// one thread 9.2 and 9.6 tokens/s against 8.6 and 8.5 (two threads: 15.9 against 16.2).
pub(super) const HEAD_PREFETCH_BYTES: usize = 4096;

/// Bytes from one block of a row to its next: the blocks of a group's rows are interleaved.
pub(super) const BLOCK_STEP: usize = ROW_GROUP * BLOCK_BYTES;

/// AVX2 matrix-vector product; see [`crate::kernels::GemvFn`]. Exactly equal to
/// [`scalar::gemv`]; on a CPU without AVX2 it calls it.
pub fn gemv(w: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
    if !is_x86_feature_detected!("avx2") {
        return scalar::gemv(w, row_bytes, x, out);
    }
    debug_assert_eq!(x.len(), row_bytes * 4);
    let rows = checked_rows(w, row_bytes, x.len(), 1, 4).min(out.len());
    // SAFETY: AVX2 was detected just above. `checked_rows` asserted that `row_bytes` is a
    // positive multiple of 32, that `w` is whole row groups and that `x` holds `row_bytes * 4`
    // activations; `rows` rows fit in `w` and `rows` outputs fit in `out`, which is all
    // `products` reads and writes.
    unsafe { products::<Maddubs>(w, row_bytes, rows, x, 1, out) }
}

/// AVX2 matrix-matrix product; see [`crate::kernels::GemmFn`]. Exactly equal to
/// [`scalar::gemm`]; on a CPU without AVX2 it calls it.
pub fn gemm(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]) {
    if !is_x86_feature_detected!("avx2") {
        return scalar::gemm(w, row_bytes, x, tokens, out);
    }
    if tokens == 0 {
        return;
    }
    let rows = checked_gemm_rows(w, row_bytes, x.len(), tokens, out.len(), 4);
    // SAFETY: AVX2 was detected just above; `checked_rows` and the assert above guarantee
    // that `w` is whole row groups holding `rows` rows of `row_bytes` (a positive multiple of
    // 32), `x` holds `tokens` rows of `row_bytes * 4` activations and `out` holds
    // `tokens * rows` outputs.
    unsafe { products::<Maddubs>(w, row_bytes, rows, x, tokens, out) }
}

/// The inner loop of the products: `sum_k c[r, k] * x[t, k]` for a tile of `R` rows of one row
/// group and `T` activation rows. AVX2 has one ([`Maddubs`]); the AVX-VNNI set has another,
/// and shares the rest of this module's products.
pub(super) trait Tile {
    /// Activations per 32-byte block of weights: 128 in the 2-bit layout, 160 in the dense
    /// one ([`crate::base3`]), whose kernels share this module's driver.
    const ELEMS: usize = BLOCK_ELEMS;

    /// `sum_k c[r, k] * x[t, k]` (codes, not weights) for `R` consecutive rows of one row
    /// group, the first of which starts at `w`, and `T` activation rows from `x`, `x_stride`
    /// apart, over `blocks` blocks (codes are digits in the dense layout).
    ///
    /// # Safety
    ///
    /// The implementor's features must be available; for every `r < R` and `b < blocks` the
    /// 32 bytes from `w + b * BLOCK_STEP + r * 32`, and for every `t < T` the
    /// `blocks * ELEMS` bytes from `x + t * x_stride`, must be readable.
    unsafe fn tile<const R: usize, const T: usize>(
        w: *const u8,
        x: *const i8,
        x_stride: usize,
        blocks: usize,
    ) -> [[i32; T]; R];
}

/// How a layout's 32-byte block becomes vectors of 32 codes in {0, 1, 2}, vector `i` lining up
/// with the block's activations `32 i..32 i + 32`, for [`maddubs_tile`].
pub(super) trait Codes {
    /// Code vectors per block (at most [`MAX_CODE_VECTORS`]).
    const VECTORS: usize;
    /// Blocks whose `vpmaddubsw` products (each lane in `[-512, 508]`, `VECTORS` per block)
    /// an i16 lane holds before it is widened.
    const FLUSH_BLOCKS: usize;

    /// The code vectors of the block at `p` (the first [`Self::VECTORS`]; the rest unused).
    ///
    /// # Safety
    ///
    /// AVX2 must be available and the 32 bytes from `p` readable.
    unsafe fn decode(p: *const u8) -> [__m256i; MAX_CODE_VECTORS];
}

/// AVX2's tile for the 2-bit layout: four 2-bit fields per byte, by shifts and a mask.
pub(super) struct Maddubs;

impl Codes for Maddubs {
    const VECTORS: usize = BLOCK_ELEMS / 32;
    const FLUSH_BLOCKS: usize = FLUSH_BLOCKS;

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn decode(p: *const u8) -> [__m256i; MAX_CODE_VECTORS] {
        let mask = _mm256_set1_epi8(3);
        // SAFETY: 32 readable bytes by the contract.
        let wv = unsafe { _mm256_loadu_si256(p as *const __m256i) };
        [
            _mm256_and_si256(_mm256_srli_epi16::<6>(wv), mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(wv), mask),
            _mm256_and_si256(_mm256_srli_epi16::<2>(wv), mask),
            _mm256_and_si256(wv, mask),
            _mm256_setzero_si256(),
        ]
    }
}

impl Tile for Maddubs {
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn tile<const R: usize, const T: usize>(
        w: *const u8,
        x: *const i8,
        x_stride: usize,
        blocks: usize,
    ) -> [[i32; T]; R] {
        // SAFETY: the trait's contract.
        unsafe { maddubs_tile::<Self, R, T>(w, x, x_stride, blocks) }
    }
}

/// The `vpmaddubsw` tile of any layout whose blocks `C` decodes: codes times activations into
/// i16 lanes, widened every `C::FLUSH_BLOCKS` blocks.
///
/// # Safety
///
/// As [`Tile::tile`], with `C::VECTORS * 32` activations per block.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn maddubs_tile<C: Codes, const R: usize, const T: usize>(
    w: *const u8,
    x: *const i8,
    x_stride: usize,
    blocks: usize,
) -> [[i32; T]; R] {
    const { assert!(C::VECTORS == 4 || C::VECTORS == MAX_CODE_VECTORS) };
    let ones = _mm256_set1_epi16(1);
    // Running pointers to the current block of each weight row and activation row (pointer
    // bumps rather than index arithmetic, which stays cheap with overflow checks on).
    let mut wp = [w; R];
    for (r, p) in wp.iter_mut().enumerate() {
        // SAFETY: the first block of row `r < R`, inside the readable range by the contract.
        *p = unsafe { w.add(r * BLOCK_BYTES) };
    }
    let mut xp = [x as *const __m256i; T];
    for (t, p) in xp.iter_mut().enumerate() {
        // SAFETY: the start of activation row `t < T`, readable by the contract.
        *p = unsafe { x.add(t * x_stride) } as *const __m256i;
    }
    let mut acc = [[_mm256_setzero_si256(); T]; R];
    let mut b0 = 0;
    while b0 < blocks {
        let b1 = (b0 + C::FLUSH_BLOCKS).min(blocks);
        let mut acc16 = [[_mm256_setzero_si256(); T]; R];
        for _ in b0..b1 {
            if R == ROW_GROUP {
                // A hint only: prefetching past the end of the weights is harmless, and
                // `wrapping_add` keeps the address computation itself defined.
                let ahead = wp[0].wrapping_add(PREFETCH_BYTES) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            }
            for (p, acc16r) in wp.iter_mut().zip(acc16.iter_mut()) {
                // SAFETY: one of the `blocks` blocks of a row: readable by the contract.
                // The bumped pointer is at most one step past the row's last block.
                let codes = unsafe { C::decode(*p) };
                *p = p.wrapping_add(BLOCK_STEP);
                for (&xb, a) in xp.iter().zip(acc16r.iter_mut()) {
                    let p: [__m256i; MAX_CODE_VECTORS] = std::array::from_fn(|i| {
                        if i < C::VECTORS {
                            // SAFETY: activations `32 i..32 i + 32` of the same block of an
                            // activation row: readable by the contract.
                            let xv = unsafe { _mm256_loadu_si256(xb.add(i)) };
                            _mm256_maddubs_epi16(codes[i], xv)
                        } else {
                            _mm256_setzero_si256()
                        }
                    });
                    // A tree of additions (shorter chains than one after another).
                    let mut sum = _mm256_add_epi16(
                        _mm256_add_epi16(p[0], p[1]),
                        _mm256_add_epi16(p[2], p[3]),
                    );
                    if C::VECTORS > 4 {
                        sum = _mm256_add_epi16(sum, p[4]);
                    }
                    *a = _mm256_add_epi16(*a, sum);
                }
            }
            for p in xp.iter_mut() {
                // SAFETY: at most one past the row's `blocks * VECTORS * 32` activations.
                *p = unsafe { p.add(C::VECTORS) };
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
        if T.is_multiple_of(4) {
            for (o4, a4) in o.chunks_exact_mut(4).zip(a.chunks_exact(4)) {
                o4.copy_from_slice(&hsum4([a4[0], a4[1], a4[2], a4[3]]));
            }
        } else {
            for (ov, &av) in o.iter_mut().zip(a) {
                *ov = hsum(av);
            }
        }
    }
    out
}

/// The lane sums of four vectors (wrapping, like the lanes), by a tree of horizontal
/// additions: a third of the instructions of four [`hsum`]s.
#[target_feature(enable = "avx2")]
#[inline]
fn hsum4(v: [__m256i; 4]) -> [i32; 4] {
    let pairs = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(pairs),
        _mm256_extracti128_si256::<1>(pairs),
    );
    let mut out = [0i32; 4];
    // SAFETY: `out` is 16 writable bytes.
    unsafe { _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, s) };
    out
}

/// `out[t * rows + r] = sum_k t[r, k] * x[t, k]` for `r < rows`, `t < tokens`, with the tiles
/// of `K`.
///
/// # Safety
///
/// AVX2 and the features of `K` must be available. `row_bytes` must be a positive multiple of
/// [`BLOCK_BYTES`], `w` must hold whole row groups of at least `rows` rows of `row_bytes`
/// bytes, `x` at least `tokens * row_bytes / 32 * K::ELEMS` activations, and `out` at least
/// `tokens * rows` values.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn products<K: Tile>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    x: &[i8],
    tokens: usize,
    out: &mut [i32],
) {
    debug_assert!(row_bytes > 0 && row_bytes.is_multiple_of(BLOCK_BYTES));
    debug_assert!(w.len() >= rows * row_bytes);
    debug_assert!(x.len() >= tokens * row_bytes / BLOCK_BYTES * K::ELEMS);
    debug_assert!(out.len() >= tokens * rows);
    // Each group of tokens streams all the weights once (see the module docs).
    let mut t0 = 0;
    if row_bytes / BLOCK_BYTES <= SHORT_ROW_BLOCKS {
        while t0 + 8 <= tokens {
            // SAFETY (for these calls): the caller's guarantees, with `t0 + T <= tokens`.
            group::<K, 1, 8>(w, row_bytes, rows, x, t0, out);
            t0 += 8;
        }
    }
    while t0 + 4 <= tokens {
        // SAFETY (for these calls): the caller's guarantees, with `t0 + T <= tokens`.
        group::<K, 1, 4>(w, row_bytes, rows, x, t0, out);
        t0 += 4;
    }
    match tokens - t0 {
        0 => {}
        1 => group::<K, GEMV_ROWS, 1>(w, row_bytes, rows, x, t0, out),
        2 => group::<K, 2, 2>(w, row_bytes, rows, x, t0, out),
        _ => group::<K, 1, 3>(w, row_bytes, rows, x, t0, out),
    }
}

/// The products of all `rows` rows with the `T` activation rows starting at token `t0`, in
/// tiles of `R` rows (and single rows for the rest), into `out[t * rows + r]`. `R` divides
/// [`ROW_GROUP`], so a tile never straddles two row groups.
///
/// # Safety
///
/// As [`products`], with `t0 + T <= tokens`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn group<K: Tile, const R: usize, const T: usize>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    x: &[i8],
    t0: usize,
    out: &mut [i32],
) {
    let blocks = row_bytes / BLOCK_BYTES;
    let k = blocks * K::ELEMS;
    let (xs, sums) = token_rows::<T>(x, t0, k);
    const { assert!(ROW_GROUP.is_multiple_of(R)) };
    let mut r = 0;
    while r + R <= rows {
        // SAFETY: rows `r..r + R` (`r` a multiple of `R`, so inside one row group) lie in `w`,
        // and the `T` activation rows of `xs` are `k` apart and `k` long.
        let d = K::tile::<R, T>(
            w[block_offset(row_bytes, r, 0)..].as_ptr(),
            xs.as_ptr(),
            k,
            blocks,
        );
        for (i, di) in d.iter().enumerate() {
            for (t, &v) in di.iter().enumerate() {
                out[(t0 + t) * rows + r + i] = v.wrapping_sub(sums[t]);
            }
        }
        r += R;
    }
    while r < rows {
        // SAFETY: as above, for the single row `r < rows`.
        let d = K::tile::<1, T>(
            w[block_offset(row_bytes, r, 0)..].as_ptr(),
            xs.as_ptr(),
            k,
            blocks,
        );
        for (t, &v) in d[0].iter().enumerate() {
            out[(t0 + t) * rows + r] = v.wrapping_sub(sums[t]);
        }
        r += 1;
    }
}

/// The `T` activation rows of `k` values from token `t0` and the sum of each. Panics if `x`
/// holds fewer than `t0 + T` rows.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn token_rows<const T: usize>(x: &[i8], t0: usize, k: usize) -> (&[i8], [i32; T]) {
    let xs = &x[t0 * k..(t0 + T) * k];
    let sums = std::array::from_fn(|t| sum_x(&xs[t * k..(t + 1) * k]));
    (xs, sums)
}

/// `sum_k x[k]` over a padded activation row (a whole number of 32-byte vectors).
#[target_feature(enable = "avx2")]
#[inline]
fn sum_x(x: &[i8]) -> i32 {
    let ones8 = _mm256_set1_epi8(1);
    let ones16 = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_si256();
    for v in x.chunks_exact(32) {
        // SAFETY: `v` is 32 readable bytes.
        let xv = unsafe { _mm256_loadu_si256(v.as_ptr() as *const __m256i) };
        // Each i16 lane is x + x in [-256, 254]; widened at once.
        acc = _mm256_add_epi32(
            acc,
            _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, xv), ones16),
        );
    }
    hsum(acc)
}

/// The sum of the eight i32 lanes (wrapping, like the lanes themselves).
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn hsum(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// f16 x f32 dot product with F16C conversion; falls back to the scalar kernel on CPUs
/// without AVX or F16C. Same summation order as [`crate::kernels::scalar::dot_f16`]: lane `j`
/// of vector accumulator `v` is running sum `8 v + j`, and multiply and add are rounded
/// separately (no FMA), so the bits agree.
pub fn dot_f16(w: &[half::f16], x: &[f32]) -> f32 {
    if !(is_x86_feature_detected!("avx") && is_x86_feature_detected!("f16c")) {
        return crate::kernels::scalar::dot_f16(w, x);
    }
    // SAFETY: AVX and F16C were just detected; `dot_f16_avx` reads only within both slices.
    unsafe { dot_f16_avx(w, x) }
}

#[target_feature(enable = "avx,f16c")]
unsafe fn dot_f16_avx(w: &[half::f16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let full = n / DOT_SUMS * DOT_SUMS;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut k = 0;
    while k < full {
        // A hint for the weights HEAD_PREFETCH_BYTES ahead, one per 64-byte line (past the
        // row's end they are the next row's, which the head reads next; `wrapping_add` keeps
        // the address computation defined anywhere).
        _mm_prefetch::<_MM_HINT_T0>(
            w.as_ptr()
                .wrapping_add(k)
                .cast::<i8>()
                .wrapping_add(HEAD_PREFETCH_BYTES),
        );
        for (v, a) in acc.iter_mut().enumerate() {
            // SAFETY: k + 32 <= full <= n, so both 8-element loads at k + 8v are inside their
            // slices; f16 is a 2-byte plain value, as `_mm_loadu_si128` reads 16 bytes.
            let (wv, xv) = unsafe {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(k + 8 * v) as *const __m128i)),
                    _mm256_loadu_ps(x.as_ptr().add(k + 8 * v)),
                )
            };
            *a = _mm256_add_ps(*a, _mm256_mul_ps(wv, xv));
        }
        k += DOT_SUMS;
    }
    let mut sums: [f32; DOT_SUMS] = store_sums(&acc);
    for (j, (wv, xv)) in w[full..n].iter().zip(&x[full..n]).enumerate() {
        sums[j] += wv.to_f32() * xv;
    }
    combine_sums(&sums)
}

/// `V` vector accumulators as `N = 8 V` running sums, sum `8 v + j` from lane `j` of `v`.
#[target_feature(enable = "avx")]
#[inline]
pub(super) unsafe fn store_sums<const V: usize, const N: usize>(acc: &[__m256; V]) -> [f32; N] {
    const { assert!(8 * V == N) };
    let mut sums = [0f32; N];
    for (v, a) in acc.iter().enumerate() {
        // SAFETY: `sums[8 v..8 v + 8]` is 8 f32 inside the array (8 V = N).
        unsafe { _mm256_storeu_ps(sums.as_mut_ptr().add(8 * v), *a) };
    }
    sums
}

/// Q8_0 x Q8_0-activation dot product; falls back to the scalar kernel without AVX2 and F16C.
/// Same order as [`crate::kernels::scalar::dot_q8_0`]: lane `j` of accumulator `b mod 2` is
/// running sum `8 (b mod 2) + j`, multiply and add rounded separately (no FMA).
pub fn dot_q8_0(row: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")) {
        return scalar::dot_q8_0(row, xq, xd);
    }
    let blocks = (row.len() / Q8_0_BYTES)
        .min(xq.len() / Q8_0_BLOCK)
        .min(xd.len());
    // SAFETY: AVX2 and F16C were just detected; `dot_q8_0_avx2` reads `blocks` whole blocks of
    // `row`, `blocks * 32` values of `xq` and `blocks` of `xd`, inside the slices by the line
    // above.
    let sums = unsafe { dot_q8_0_avx2(row, xq, xd, blocks) };
    combine_q8_sums(&sums)
}

/// The products of one block: `|w|` times `x` with the sign of `w` is `w * x`, which
/// `vpmaddubsw` (unsigned by signed bytes) can form; a pair of them is at most `2 * 128 * 127`,
/// so no i16 lane saturates, and `x` is never -128, whose sign cannot be flipped.
#[target_feature(enable = "avx2,f16c")]
unsafe fn dot_q8_0_avx2(row: &[u8], xq: &[i8], xd: &[f32], blocks: usize) -> [f32; Q8_DOT_SUMS] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 2];
    for b in 0..blocks {
        // A hint for the weights PREFETCH_BYTES ahead (past the row's end they are the next
        // row's, which the head reads next), one per 34-byte block, so every 64-byte line is
        // asked for once or twice: on an AMD EPYC, one thread, 8.8 -> 11.5 GiB/s, against
        // 10.9 for the f16 head, which gained nothing from the same hint (`wrapping_add` keeps
        // the address computation defined wherever it points).
        _mm_prefetch::<_MM_HINT_T0>(
            row.as_ptr().wrapping_add(b * Q8_0_BYTES + PREFETCH_BYTES) as *const i8
        );
        // SAFETY: block `b < blocks` of `row` (34 bytes from b * 34) and values b * 32.. of
        // `xq` lie inside the slices, and `b < xd.len()`.
        let (d_w, w, x, d_x) = unsafe {
            let blk = row.as_ptr().add(b * Q8_0_BYTES);
            let bits = u16::from_le_bytes([*blk, *blk.add(1)]);
            (
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))),
                _mm256_loadu_si256(blk.add(2) as *const __m256i),
                _mm256_loadu_si256(xq.as_ptr().add(b * Q8_0_BLOCK) as *const __m256i),
                *xd.get_unchecked(b),
            )
        };
        let d = _mm256_set1_ps(d_w * d_x);
        let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        let p32 = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        acc[b % 2] = _mm256_add_ps(acc[b % 2], _mm256_mul_ps(d, p32));
    }
    store_sums(&acc)
}

/// Same order as [`crate::kernels::scalar::dot_q6_k`]: lane `j` of accumulator `b mod 2` is
/// running sum `8 (b mod 2) + j`, multiply and add rounded separately (no FMA).
pub fn dot_q6_k(row: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")) {
        return scalar::dot_q6_k(row, xq, xd);
    }
    let blocks = (row.len() / Q6_K_BYTES)
        .min(xq.len() / Q6_K_BLOCK)
        .min(xd.len() / 8);
    // SAFETY: AVX2 and F16C were just detected; `dot_q6_k_avx2` reads `blocks` whole blocks of
    // `row`, `blocks * 256` values of `xq` and `blocks * 8` of `xd`, inside the slices by the
    // line above.
    let sums = unsafe { dot_q6_k_avx2(row, xq, xd, blocks) };
    combine_q8_sums(&sums)
}

/// Each run of 32 codes is rebuilt from one 32-byte load of `ql` (a nibble) and one of `qh`
/// (two bits) and made signed (`c - 32`, at most 32 in magnitude); `vpmaddubsw` then multiplies
/// `|c - 32|` by the activations with the code's sign (pairs at most `2 * 32 * 127`, no
/// saturation) and `vpmaddwd` by the two 16-value scales adds the pairs into four-value groups.
#[target_feature(enable = "avx2,f16c")]
unsafe fn dot_q6_k_avx2(row: &[u8], xq: &[i8], xd: &[f32], blocks: usize) -> [f32; Q8_DOT_SUMS] {
    let low4 = _mm256_set1_epi8(0x0f);
    let bit45 = _mm256_set1_epi8(0x30);
    let bias = _mm256_set1_epi8(32);
    // Run m's scales: i16 lane 2m of the half's scales across the low 128 bits (its first 16
    // values), lane 2m + 1 across the high 128 bits.
    let pick: [__m256i; 4] = std::array::from_fn(|m| {
        let idx: [u8; 32] = std::array::from_fn(|i| (4 * m + 2 * (i / 16) + i % 2) as u8);
        // SAFETY: `idx` holds the 32 bytes loaded.
        unsafe { _mm256_loadu_si256(idx.as_ptr() as *const __m256i) }
    });
    let mut acc = [_mm256_setzero_ps(); 2];
    for s in 0..blocks {
        // SAFETY: block `s < blocks` of `row` (210 bytes from s * 210) lies inside `row`.
        let blk = unsafe { row.as_ptr().add(s * Q6_K_BYTES) };
        // SAFETY: bytes 208 and 209 of the block are inside it.
        let d_w = unsafe {
            let bits = u16::from_le_bytes([*blk.add(208), *blk.add(209)]);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        };
        for h in 0..2 {
            // SAFETY: `ql` runs at 64h and 64h + 32 and `qh` at 128 + 32h, 32 bytes each, are
            // inside the block.
            // The half's eight scales (bytes 192 + 8h..) go to i16 lanes 0..8 of both halves.
            let (ql0, ql1, qh, scales) = unsafe {
                (
                    _mm256_loadu_si256(blk.add(64 * h) as *const __m256i),
                    _mm256_loadu_si256(blk.add(64 * h + 32) as *const __m256i),
                    _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i),
                    _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64(
                        blk.add(192 + 8 * h) as *const __m128i,
                    ))),
                )
            };
            // Codes of runs m = 0..4: the nibble, then qh's bits 2m, 2m + 1 moved to bits 4, 5
            // (16-bit shifts; the mask drops what crosses from the neighbouring byte).
            let codes = [
                _mm256_or_si256(
                    _mm256_and_si256(ql0, low4),
                    _mm256_and_si256(_mm256_slli_epi16(qh, 4), bit45),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, low4),
                    _mm256_and_si256(_mm256_slli_epi16(qh, 2), bit45),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                    _mm256_and_si256(qh, bit45),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), bit45),
                ),
            ];
            for (m, &c) in codes.iter().enumerate() {
                let run = 4 * h + m;
                let b = 8 * s + run;
                // SAFETY: values 32b..32b + 32 of `xq` and `xd[b]` are inside the slices
                // (b < 8 * blocks).
                let (x, d_x) = unsafe {
                    (
                        _mm256_loadu_si256(xq.as_ptr().add(32 * b) as *const __m256i),
                        *xd.get_unchecked(b),
                    )
                };
                let w = _mm256_sub_epi8(c, bias);
                let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
                let sc = _mm256_shuffle_epi8(scales, pick[m]);
                let p32 = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, sc));
                let d = _mm256_set1_ps(d_w * d_x);
                acc[m % 2] = _mm256_add_ps(acc[m % 2], _mm256_mul_ps(d, p32));
            }
        }
    }
    store_sums(&acc)
}
