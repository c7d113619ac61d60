//! AVX-VNNI kernels (the VEX-encoded, 256-bit `vpdpbusd` of Alder Lake and later Intel cores
//! and of AMD Zen 5): the AVX2 set's products with another inner loop.
//!
//! `vpdpbusd` multiplies the unsigned codes by the signed activations and adds four products
//! into each i32 lane, replacing AVX2's `vpmaddubsw`, i16 accumulators, periodic widening and
//! their overflow bookkeeping: a lane gains at most `4 * 2 * 128` per block, exact in i32 for
//! the same rows as the scalar reference. The tiles, the weight streaming and the prefetch are
//! the AVX2 set's (see [`super::avx2`]); each accumulator chain takes every other activation
//! vector, so two `vpdpbusd` latencies overlap in the one-token tile too.

use std::arch::x86_64::*;

use super::avx2::{self, Tile, BLOCK_STEP, PREFETCH_BYTES};
use crate::kernels::{checked_gemm_rows, checked_rows};
use crate::ternary::{BLOCK_BYTES, BLOCK_ELEMS, ROW_GROUP};

/// Whether this CPU runs the set: AVX2 and AVX-VNNI.
pub fn detected() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni")
}

/// AVX-VNNI matrix-vector product; see [`crate::kernels::GemvFn`]. Exactly equal to
/// [`crate::kernels::scalar::gemv`]; on a CPU without AVX-VNNI it calls the AVX2 kernel.
pub fn gemv(w: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
    if !detected() {
        return avx2::gemv(w, row_bytes, x, out);
    }
    debug_assert_eq!(x.len(), row_bytes * 4);
    let rows = checked_rows(w, row_bytes, x.len(), 1, 4).min(out.len());
    // SAFETY: AVX2 and AVX-VNNI were detected just above. `checked_rows` asserted that
    // `row_bytes` is a positive multiple of 32, that `w` is whole row groups and that `x`
    // holds `row_bytes * 4` activations; `rows` rows fit in `w` and `rows` outputs in `out`.
    unsafe { avx2::products::<Dpbusd>(w, row_bytes, rows, x, 1, out) }
}

/// AVX-VNNI matrix-matrix product; see [`crate::kernels::GemmFn`]. Exactly equal to
/// [`crate::kernels::scalar::gemm`]; on a CPU without AVX-VNNI it calls the AVX2 kernel.
pub fn gemm(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]) {
    if !detected() {
        return avx2::gemm(w, row_bytes, x, tokens, out);
    }
    if tokens == 0 {
        return;
    }
    let rows = checked_gemm_rows(w, row_bytes, x.len(), tokens, out.len(), 4);
    // SAFETY: AVX2 and AVX-VNNI were detected just above; `checked_rows` and the assert
    // guarantee that `w` is whole row groups holding `rows` rows of `row_bytes` (a positive
    // multiple of 32), `x` `tokens` rows of `row_bytes * 4` activations and `out`
    // `tokens * rows` outputs.
    unsafe { avx2::products::<Dpbusd>(w, row_bytes, rows, x, tokens, out) }
}

/// The AVX-VNNI tile.
struct Dpbusd;

impl Tile for Dpbusd {
    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn tile<const R: usize, const T: usize>(
        w: *const u8,
        x: *const i8,
        x_stride: usize,
        blocks: usize,
    ) -> [[i32; T]; R] {
        let mask = _mm256_set1_epi8(3);
        let mut wp = [w; R];
        for (r, p) in wp.iter_mut().enumerate() {
            // SAFETY: the first block of row `r < R`, readable by the contract.
            *p = unsafe { w.add(r * BLOCK_BYTES) };
        }
        let mut xp = [x; T];
        for (t, p) in xp.iter_mut().enumerate() {
            // SAFETY: the start of activation row `t < T`, readable by the contract.
            *p = unsafe { x.add(t * x_stride) };
        }
        // acc[r][t][j]: row r with token t, activation vectors of parity j.
        let mut acc = [[[_mm256_setzero_si256(); 2]; T]; R];
        for _ in 0..blocks {
            if R == ROW_GROUP {
                // A hint only, as in the AVX2 tile.
                let ahead = wp[0].wrapping_add(PREFETCH_BYTES) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            }
            for (p, acc_r) in wp.iter_mut().zip(acc.iter_mut()) {
                // SAFETY: one of the `blocks` blocks of a row: readable by the contract.
                let wv = unsafe { _mm256_loadu_si256(*p as *const __m256i) };
                // At most one step past the row's last block.
                *p = p.wrapping_add(BLOCK_STEP);
                let codes = [
                    _mm256_and_si256(_mm256_srli_epi16::<6>(wv), mask),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(wv), mask),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(wv), mask),
                    _mm256_and_si256(wv, mask),
                ];
                for (&xb, a) in xp.iter().zip(acc_r.iter_mut()) {
                    for (lane, &c) in codes.iter().enumerate() {
                        // SAFETY: activation vector `lane` of the same block of an activation
                        // row: readable by the contract.
                        let xv = unsafe { _mm256_loadu_si256(xb.add(32 * lane) as *const __m256i) };
                        a[lane % 2] = _mm256_dpbusd_avx_epi32(a[lane % 2], c, xv);
                    }
                }
            }
            for p in xp.iter_mut() {
                // At most one past the row's `blocks * 128` activations.
                *p = p.wrapping_add(BLOCK_ELEMS);
            }
        }
        let mut out = [[0i32; T]; R];
        for (o, a) in out.iter_mut().zip(&acc) {
            for (ov, [a0, a1]) in o.iter_mut().zip(a) {
                *ov = avx2::hsum(_mm256_add_epi32(*a0, *a1));
            }
        }
        out
    }
}
