//! The f32 matrix-product tiles with AVX2 and FMA, shared by every x86 set: six rows of `a`
//! against a packed 16-column panel, the 6 x 16 sums in twelve registers for the whole run of
//! `k` (two vector loads of the panel and six broadcasts of `a` feed twelve fused
//! multiply-adds per step), in the scalar kernel's order, so the bits agree. A call runs a
//! whole row of tiles, one panel after the other.

use std::arch::x86_64::*;

use crate::kernels::{check_sgemm_tiles, scalar, SGEMM_MR, SGEMM_NR};

/// AVX2/FMA row of tiles; see [`crate::kernels::SgemmTilesFn`]. Exactly equal to
/// [`scalar::sgemm_tiles`]; on a CPU without AVX2 and FMA it calls it.
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
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
        || kc == 0
        || panels == 0
    {
        return scalar::sgemm_tiles(kc, a, rows, a_step, b, panels, c, ldc, accumulate);
    }
    check_sgemm_tiles(kc, a.len(), rows, a_step, b.len(), panels, c.len(), ldc);
    let p = rows.map(|r| a[r..].as_ptr());
    // SAFETY: AVX2 and FMA were detected just above, and `check_sgemm_tiles` asserted that
    // every `a[rows[i] + k * a_step]` (k < kc), the `panels` panels of `kc * 16` values in `b`
    // and the six rows of `16 * panels` values in `c` lie inside the slices.
    unsafe {
        tiles_fma(
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
/// AVX2 and FMA must be available; `kc > 0`; `p[i].add(k * a_step)` for `k < kc`,
/// `b[..panels * kc * 16]` and `c`'s six rows of `16 * panels` values `ldc` apart must be in
/// bounds.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tiles_fma(
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
            tile_fma(
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
/// AVX2 and FMA must be available; `kc > 0`; `p[i].add(k * a_step)` for `k < kc`,
/// `b[..kc * 16]` and `c`'s six rows of 16 values `ldc` apart must be in bounds.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_fma(
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
        let load = |i: usize, half: usize| {
            if accumulate {
                _mm256_loadu_ps(c.add(i * ldc + 8 * half))
            } else {
                _mm256_setzero_ps()
            }
        };
        let (mut c00, mut c01, mut c10, mut c11) = (load(0, 0), load(0, 1), load(1, 0), load(1, 1));
        let (mut c20, mut c21, mut c30, mut c31) = (load(2, 0), load(2, 1), load(3, 0), load(3, 1));
        let (mut c40, mut c41, mut c50, mut c51) = (load(4, 0), load(4, 1), load(5, 0), load(5, 1));
        // The next tile along the row (the next panel) reads and writes the 16
        // values after these in each row: start fetching them now, so that its first loads
        // of `c` do not wait on memory. A hint only: `wrapping_add` keeps the address
        // computation defined even past the end of `c`, and a prefetch never faults.
        for i in 0..SGEMM_MR {
            let next = c.wrapping_add(i * ldc + SGEMM_NR) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(next);
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(63));
        }
        let mut bp = b;
        let mut off = 0usize;
        for _ in 0..kc {
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            let a0 = _mm256_broadcast_ss(&*p[0].add(off));
            c00 = _mm256_fmadd_ps(a0, b0, c00);
            c01 = _mm256_fmadd_ps(a0, b1, c01);
            let a1 = _mm256_broadcast_ss(&*p[1].add(off));
            c10 = _mm256_fmadd_ps(a1, b0, c10);
            c11 = _mm256_fmadd_ps(a1, b1, c11);
            let a2 = _mm256_broadcast_ss(&*p[2].add(off));
            c20 = _mm256_fmadd_ps(a2, b0, c20);
            c21 = _mm256_fmadd_ps(a2, b1, c21);
            let a3 = _mm256_broadcast_ss(&*p[3].add(off));
            c30 = _mm256_fmadd_ps(a3, b0, c30);
            c31 = _mm256_fmadd_ps(a3, b1, c31);
            let a4 = _mm256_broadcast_ss(&*p[4].add(off));
            c40 = _mm256_fmadd_ps(a4, b0, c40);
            c41 = _mm256_fmadd_ps(a4, b1, c41);
            let a5 = _mm256_broadcast_ss(&*p[5].add(off));
            c50 = _mm256_fmadd_ps(a5, b0, c50);
            c51 = _mm256_fmadd_ps(a5, b1, c51);
            off += a_step;
            bp = bp.add(SGEMM_NR);
        }
        let store =
            |i: usize, half: usize, v: __m256| _mm256_storeu_ps(c.add(i * ldc + 8 * half), v);
        store(0, 0, c00);
        store(0, 1, c01);
        store(1, 0, c10);
        store(1, 1, c11);
        store(2, 0, c20);
        store(2, 1, c21);
        store(3, 0, c30);
        store(3, 1, c31);
        store(4, 0, c40);
        store(4, 1, c41);
        store(5, 0, c50);
        store(5, 1, c51);
    }
}
