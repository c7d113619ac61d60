//! AVX-512 VNNI kernels for the runtime layout.
//!
//! The same identity as the AVX2 set (`sum_k t_k x_k = sum_k c_k x_k - sum_k x_k` with codes
//! `c = t + 1`), with two changes the wider registers and VNNI allow:
//!
//! - One block of a row group is 128 contiguous bytes (see [`crate::ternary`]), so two 64-byte
//!   loads hold it, rows 0 and 1 in the halves of the first and rows 2 and 3 in the halves of
//!   the second. Each 32-byte activation vector is broadcast to both halves
//!   (`vbroadcasti64x4`, a load), so one instruction serves two rows.
//! - `vpdpbusd` multiplies unsigned codes by signed activations and adds four products into
//!   each i32 lane directly: no i16 stage, nothing to flush and no saturation. A lane gains at
//!   most `4 * 2 * 128` per block, so the i32 totals are exact for the same rows as the
//!   scalar reference (fewer than 2^23 inputs).
//!
//! Every product streams whole row groups (the layout pads rows to a group, so the padding
//! rows are there to read; their results are dropped). `gemv` takes one token per tile and
//! prefetches ahead of the group's stream like the AVX2 set; `gemm` takes `GEMM_TOKENS` (4) tokens
//! per tile, so each weight block is unpacked once for all of them. Each accumulator chain
//! takes every other activation vector (two chains per row pair and token), so two `vpdpbusd`
//! latencies overlap even when one token leaves little else to do.
//!
//! CPUs with AVX-512 but without VNNI (Skylake-SP and -X) use the AVX2 set: emulating
//! `vpdpbusd` with `vpmaddubsw` gains little there, and a function compiled with VNNI enabled
//! may be given VNNI instructions by the compiler even where the source names none.

use std::arch::x86_64::*;

use crate::kernels::x86::avx2;
use crate::kernels::{checked_gemm_rows, checked_rows};
use crate::ternary::{BLOCK_BYTES, BLOCK_ELEMS, ROW_GROUP};

/// Bytes of one block of a whole row group (four rows' blocks, interleaved).
const GROUP_BLOCK: usize = ROW_GROUP * BLOCK_BYTES;

/// Activation rows per tile in `gemm`.
const GEMM_TOKENS: usize = 4;

/// How far ahead of a row group's stream `gemv` prefetches (the AVX2 set's measured best).
const PREFETCH_BYTES: usize = 2048;

/// Whether this CPU runs the set: AVX-512 F and BW for the loads, shifts and masks, VNNI for
/// `vpdpbusd`, and AVX2 for the shared activation sums.
pub fn detected() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx2")
}

/// AVX-512 VNNI matrix-vector product; see [`crate::kernels::GemvFn`]. Exactly equal to
/// [`crate::kernels::scalar::gemv`]; on a CPU without the set it calls the AVX2 kernel.
pub fn gemv(w: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
    if !detected() {
        return avx2::gemv(w, row_bytes, x, out);
    }
    debug_assert_eq!(x.len(), row_bytes * 4);
    let rows = checked_rows(w, row_bytes, x.len(), 1, 4).min(out.len());
    // SAFETY: the set was detected just above. `checked_rows` asserted that `row_bytes` is a
    // positive multiple of 32, that `w` is whole row groups and that `x` holds `row_bytes * 4`
    // activations; the row groups of the first `rows` rows lie in `w` and `rows` outputs fit
    // in `out`, which is all `products` reads and writes.
    unsafe { products(w, row_bytes, rows, x, 1, out) }
}

/// AVX-512 VNNI matrix-matrix product; see [`crate::kernels::GemmFn`]. Exactly equal to
/// [`crate::kernels::scalar::gemm`]; on a CPU without the set it calls the AVX2 kernel.
pub fn gemm(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]) {
    if !detected() {
        return avx2::gemm(w, row_bytes, x, tokens, out);
    }
    if tokens == 0 {
        return;
    }
    let rows = checked_gemm_rows(w, row_bytes, x.len(), tokens, out.len(), 4);
    // SAFETY: the set was detected just above; `checked_rows` and the assert guarantee that
    // `w` is whole row groups holding `rows` rows of `row_bytes` (a positive multiple of 32),
    // that `x` holds `tokens` rows of `row_bytes * 4` activations and `out` `tokens * rows`
    // values.
    unsafe { products(w, row_bytes, rows, x, tokens, out) }
}

/// `out[t * rows + r] = sum_k t[r, k] * x[t, k]` for `r < rows`, `t < tokens`.
///
/// # Safety
///
/// The set must be available ([`detected`]). `row_bytes` must be a positive multiple of
/// [`BLOCK_BYTES`], `w` must hold whole row groups covering at least `rows` rows of
/// `row_bytes` bytes, `x` at least `tokens * row_bytes * 4` activations, and `out` at least
/// `tokens * rows` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
unsafe fn products(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    x: &[i8],
    tokens: usize,
    out: &mut [i32],
) {
    let mut t0 = 0;
    while t0 + GEMM_TOKENS <= tokens {
        // SAFETY (for these calls): the caller's guarantees, with `t0 + T <= tokens`.
        group::<GEMM_TOKENS>(w, row_bytes, rows, x, t0, out);
        t0 += GEMM_TOKENS;
    }
    match tokens - t0 {
        0 => {}
        1 => group::<1>(w, row_bytes, rows, x, t0, out),
        2 => group::<2>(w, row_bytes, rows, x, t0, out),
        _ => group::<3>(w, row_bytes, rows, x, t0, out),
    }
}

/// The products of all `rows` rows with the `T` activation rows starting at token `t0`, one
/// row group per tile, into `out[t * rows + r]`.
///
/// # Safety
///
/// As [`products`], with `t0 + T <= tokens`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
#[inline]
unsafe fn group<const T: usize>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    x: &[i8],
    t0: usize,
    out: &mut [i32],
) {
    let blocks = row_bytes / BLOCK_BYTES;
    let k = blocks * BLOCK_ELEMS;
    let (xs, sums) = avx2::token_rows::<T>(x, t0, k);
    for r in (0..rows).step_by(ROW_GROUP) {
        // In bounds: the group of row `r < rows` is whole in `w`.
        let group = &w[r * row_bytes..(r + ROW_GROUP) * row_bytes];
        // SAFETY: `group` holds `blocks` blocks of four rows, and the `T` activation rows of
        // `xs` are `k` apart and `k` long.
        let d = tile::<T>(group.as_ptr(), xs.as_ptr(), k, blocks);
        for (i, di) in d.iter().enumerate().take(rows - r) {
            for (t, &v) in di.iter().enumerate() {
                out[(t0 + t) * rows + r + i] = v.wrapping_sub(sums[t]);
            }
        }
    }
}

/// `sum_k c[r, k] * x[t, k]` (codes, not weights) for the four rows of the row group at `w`
/// and `T` activation rows from `x`, `x_stride` apart, over `blocks` blocks.
///
/// # Safety
///
/// The set must be available; the `blocks * 128` bytes from `w`, and for every `t < T` the
/// `blocks * 128` bytes from `x + t * x_stride`, must be readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
#[inline]
unsafe fn tile<const T: usize>(
    w: *const u8,
    x: *const i8,
    x_stride: usize,
    blocks: usize,
) -> [[i32; T]; ROW_GROUP] {
    let mask = _mm512_set1_epi8(3);
    // acc[h][t][j]: rows 2h and 2h + 1 (low and high halves) with token t, activation vectors
    // of parity j.
    let mut acc = [[[_mm512_setzero_si512(); 2]; T]; 2];
    let mut wp = w;
    let mut xp = [x; T];
    for (t, p) in xp.iter_mut().enumerate() {
        // SAFETY: the start of activation row `t < T`, readable by the contract.
        *p = x.add(t * x_stride);
    }
    for _ in 0..blocks {
        if T == 1 {
            // A hint only: prefetching past the end of the weights is harmless, and
            // `wrapping_add` keeps the address computation itself defined.
            let ahead = wp.wrapping_add(PREFETCH_BYTES) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
        }
        // SAFETY: one block of the group, 128 readable bytes by the contract.
        let halves = [
            _mm512_loadu_si512(wp as *const __m512i),
            _mm512_loadu_si512(wp.add(64) as *const __m512i),
        ];
        // At most one step past the group's last block.
        wp = wp.wrapping_add(GROUP_BLOCK);
        let codes = [unpack(halves[0], mask), unpack(halves[1], mask)];
        for (t, p) in xp.iter_mut().enumerate() {
            for lane in 0..4 {
                // SAFETY: activation vector `lane` of the same block of row `t`: readable by
                // the contract.
                let xv =
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(32 * lane) as *const __m256i));
                for h in 0..2 {
                    let a = &mut acc[h][t][lane % 2];
                    *a = _mm512_dpbusd_epi32(*a, codes[h][lane], xv);
                }
            }
            // At most one past the row's `blocks * 128` activations.
            *p = p.wrapping_add(BLOCK_ELEMS);
        }
    }
    let mut out = [[0i32; T]; ROW_GROUP];
    for (h, acc_h) in acc.iter().enumerate() {
        for (t, [a0, a1]) in acc_h.iter().enumerate() {
            let s = _mm512_add_epi32(*a0, *a1);
            out[2 * h][t] = avx2::hsum(_mm512_castsi512_si256(s));
            out[2 * h + 1][t] = avx2::hsum(_mm512_extracti64x4_epi64::<1>(s));
        }
    }
    out
}

/// The codes of 64 layout bytes as four vectors, fields from the top bits down: vector `j`
/// lines up with activation vector `j` of the block (see [`crate::ternary`]).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn unpack(v: __m512i, mask: __m512i) -> [__m512i; 4] {
    [
        _mm512_and_si512(_mm512_srli_epi16::<6>(v), mask),
        _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask),
        _mm512_and_si512(_mm512_srli_epi16::<2>(v), mask),
        _mm512_and_si512(v, mask),
    ]
}
