//! The f32 matrix-product tiles with NEON, shared by both AArch64 sets: six rows of `a`
//! against a packed 16-column panel, the 6 x 16 sums in 24 of the 32 vector registers for the
//! whole run of `k` (four loads of the panel and six broadcasts of `a` feed 24 fused
//! multiply-adds per step), in the scalar kernel's order, so the bits agree. A call runs a
//! whole row of tiles, one panel after the other.

use std::arch::aarch64::*;

use crate::kernels::{check_sgemm_tiles, scalar, SGEMM_MR, SGEMM_NR};

/// NEON row of tiles; see [`crate::kernels::SgemmTilesFn`]. Exactly equal to
/// [`scalar::sgemm_tiles`]; without NEON it calls it.
#[allow(clippy::too_many_arguments)]
pub fn tiles(
    kc: usize,
    a: &[f32],
    rows: &[usize; SGEMM_MR],
    a_step: usize,
    b: &[f32],
    panels: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if !std::arch::is_aarch64_feature_detected!("neon") || kc == 0 || panels == 0 {
        return scalar::sgemm_tiles(kc, a, rows, a_step, b, panels, c, ldc, accumulate);
    }
    check_sgemm_tiles(kc, a.len(), rows, a_step, b.len(), panels, c.len(), ldc);
    let p = rows.map(|r| a[r..].as_ptr());
    // SAFETY: NEON was detected just above, and `check_sgemm_tiles` asserted that every
    // `a[rows[i] + k * a_step]` (k < kc), the `panels` panels of `kc * 16` values in `b` and
    // the six rows of `16 * panels` values in `c` lie inside the slices.
    unsafe {
        tiles_neon(
            kc,
            p,
            a_step,
            b.as_ptr(),
            panels,
            c.as_mut_ptr(),
            ldc,
            accumulate,
        )
    }
}

/// The row of tiles on raw pointers, one panel after the other.
///
/// # Safety
///
/// NEON must be available; `kc > 0`; `p[i].add(k * a_step)` for `k < kc`,
/// `b[..panels * kc * 16]` and `c`'s six rows of `16 * panels` values `ldc` apart must be in
/// bounds.
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles_neon(
    kc: usize,
    p: [*const f32; SGEMM_MR],
    a_step: usize,
    b: *const f32,
    panels: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    for q in 0..panels {
        // SAFETY: tile `q`'s panel and columns are inside the caller's bounds.
        unsafe {
            tile_neon(
                kc,
                p,
                a_step,
                b.add(q * kc * SGEMM_NR),
                c.add(q * SGEMM_NR),
                ldc,
                accumulate,
            )
        }
    }
}

/// The tile on raw pointers.
///
/// # Safety
///
/// NEON must be available; `kc > 0`; `p[i].add(k * a_step)` for `k < kc`, `b[..kc * 16]`
/// and `c`'s six rows of 16 values `ldc` apart must be in bounds.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn tile_neon(
    kc: usize,
    p: [*const f32; SGEMM_MR],
    a_step: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    // SAFETY (every access below): in bounds by the caller's contract; the running offsets
    // stay below `(kc - 1) * a_step` and `kc * 16`.
    unsafe {
        let mut acc = [[vdupq_n_f32(0.0); 4]; SGEMM_MR];
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                for (q, v) in row.iter_mut().enumerate() {
                    *v = vld1q_f32(c.add(i * ldc + 4 * q));
                }
            }
        }
        let mut bp = b;
        let mut off = 0usize;
        for _ in 0..kc {
            let bv = [
                vld1q_f32(bp),
                vld1q_f32(bp.add(4)),
                vld1q_f32(bp.add(8)),
                vld1q_f32(bp.add(12)),
            ];
            for (i, row) in acc.iter_mut().enumerate() {
                let av = vld1q_dup_f32(p[i].add(off));
                for (v, &bq) in row.iter_mut().zip(&bv) {
                    // acc + b * a, rounded once: the scalar kernel's `a.mul_add(b, acc)`.
                    *v = vfmaq_f32(*v, bq, av);
                }
            }
            off += a_step;
            bp = bp.add(SGEMM_NR);
        }
        for (i, row) in acc.iter().enumerate() {
            for (q, &v) in row.iter().enumerate() {
                vst1q_f32(c.add(i * ldc + 4 * q), v);
            }
        }
    }
}
