//! f32 matrix products `C = A B` (or `C += A B`) for the trainer's straight-through gradients,
//! output head and attention, on the thread pool or the calling thread, with the kernel set's
//! tiles ([`crate::kernels::SgemmTilesFn`]).
//!
//! The layout follows the usual blocked scheme: `B` is packed into 16-column panels one block
//! of `KC` rows at a time (a panel's block is 16 KB, so it stays in L1 while six-row tiles of
//! `A` stream past it); the rows of `C` are split into blocks of at most `MC` rows, one task
//! each, so a block of `A` (read where it lies when its rows are contiguous, packed into
//! six-row panels otherwise) stays in L2. Every element of `C` is one chain of fused
//! multiply-adds in order of `k`, whatever the blocking or the thread count, so the product is
//! deterministic and every kernel set gives the same bits.

use std::cell::RefCell;
use std::thread::LocalKey;

use rayon::prelude::*;

use crate::kernels::{Kernels, SGEMM_MR as MR, SGEMM_NR as NR};
use crate::{Error, Result};

/// Rows of `B` packed at a time (a 16-column panel block of 16 KB).
const KC: usize = 256;

/// Sums longer than this give each thread its own packed `B` (see [`sgemm_with`]).
const PRIVATE_B_K: usize = 4 * KC;

/// Most rows of `C` per task (a packed block of `A`, `MC x KC`, is 144 KB).
const MC: usize = 144;

thread_local! {
    /// Each thread's buffer for packed blocks of `B`.
    static PACKED_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's buffer for packed blocks of `A`.
    static PACKED_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `f` on `len` values of this thread's buffer `cell` (grown as needed, kept between
/// products: a fresh packing buffer per product is fresh pages for the kernel to fault in and
/// zero), or on a new buffer when this thread's is in use further up its stack. The values
/// are stale: packing writes every one it hands to the tiles.
fn with_buffer<R>(
    cell: &'static LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    cell.with(|c| match c.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

/// A read-only view of an f32 matrix: element `(i, j)` at `data[i * row_stride + j * col_stride]`
/// (a transpose is the same data with the strides swapped).
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A view of `rows x cols` elements, checked to lie inside `data`.
    pub fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1)
                .checked_mul(row_stride)
                .zip((cols - 1).checked_mul(col_stride))
                .and_then(|(r, c)| r.checked_add(c));
            if last.is_none_or(|l| l >= data.len()) {
                return Err(Error::InvalidInput(format!(
                    "a [{rows}, {cols}] view with strides ({row_stride}, {col_stride}) does not \
                     fit in {} values",
                    data.len()
                )));
            }
        }
        Ok(MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// A contiguous row-major `[rows, cols]` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Element `(i, j)`.
    #[inline]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// A matrix of int8 codes whose rows each carry a scale: element `(i, j)` is `codes[i *
/// row_stride + j] as f32 / scales[i]`, computed as the product packs it (BitLinear's
/// dequantized activations, without writing them out as f32).
#[derive(Debug, Clone, Copy)]
pub struct ScaledCodes<'a> {
    codes: &'a [i8],
    scales: &'a [f32],
    cols: usize,
    row_stride: usize,
}

impl<'a> ScaledCodes<'a> {
    /// Columns (codes per row).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `scales.len()` rows of `cols` codes, row `i` at `codes[i * row_stride..]`, checked to
    /// lie inside `codes`.
    pub fn new(codes: &'a [i8], scales: &'a [f32], cols: usize, row_stride: usize) -> Result<Self> {
        let rows = scales.len();
        if rows > 0 && cols > 0 {
            let end = (rows - 1)
                .checked_mul(row_stride)
                .and_then(|r| r.checked_add(cols));
            if cols > row_stride || end.is_none_or(|e| e > codes.len()) {
                return Err(Error::InvalidInput(format!(
                    "{rows} rows of {cols} codes {row_stride} apart do not fit in {} codes",
                    codes.len()
                )));
            }
        }
        Ok(ScaledCodes {
            codes,
            scales,
            cols,
            row_stride,
        })
    }
}

/// The right operand `B` of a product: f32 values, or int8 codes scaled per row.
#[derive(Debug, Clone, Copy)]
pub enum RightOperand<'a> {
    /// An f32 matrix (any strides).
    F32(MatRef<'a>),
    /// Codes with one scale per row.
    Codes(ScaledCodes<'a>),
}

impl<'a> From<MatRef<'a>> for RightOperand<'a> {
    fn from(m: MatRef<'a>) -> Self {
        RightOperand::F32(m)
    }
}

impl<'a> From<ScaledCodes<'a>> for RightOperand<'a> {
    fn from(m: ScaledCodes<'a>) -> Self {
        RightOperand::Codes(m)
    }
}

impl RightOperand<'_> {
    fn rows(&self) -> usize {
        match self {
            RightOperand::F32(m) => m.rows,
            RightOperand::Codes(q) => q.scales.len(),
        }
    }

    fn cols(&self) -> usize {
        match self {
            RightOperand::F32(m) => m.cols,
            RightOperand::Codes(q) => q.cols,
        }
    }
}

/// `c = a b` with `c` row-major `[a.rows, b.cols]`, on the thread pool. Errors if the shapes
/// disagree.
pub fn sgemm<'b>(
    kernels: &Kernels,
    a: MatRef,
    b: impl Into<RightOperand<'b>>,
    c: &mut [f32],
) -> Result<()> {
    sgemm_with(kernels, a, b, c, Product::default())
}

/// How [`sgemm_with`] treats `C` and the thread pool.
#[derive(Debug, Clone, Copy)]
pub struct Product {
    /// `c += a b` (each element's chain of fused multiply-adds starts from the value in `c`)
    /// rather than `c = a b`.
    pub accumulate: bool,
    /// Split the rows of `C` over the thread pool; `false` runs on the calling thread, for
    /// callers that already give each thread its own products (the bits are the same).
    pub parallel: bool,
}

impl Default for Product {
    fn default() -> Self {
        Product {
            accumulate: false,
            parallel: true,
        }
    }
}

/// `c = a b`, or `c += a b`, as `how` says. Errors if the shapes disagree.
pub fn sgemm_with<'b>(
    kernels: &Kernels,
    a: MatRef,
    b: impl Into<RightOperand<'b>>,
    c: &mut [f32],
    how: Product,
) -> Result<()> {
    let b = b.into();
    let (m, k, n) = (a.rows, a.cols, b.cols());
    if b.rows() != k || c.len() != m * n {
        return Err(Error::InvalidInput(format!(
            "sgemm: [{m}, {k}] times [{}, {n}] into {} values",
            b.rows(),
            c.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !how.accumulate {
            c.fill(0.0);
        }
        return Ok(());
    }
    let panels = n.div_ceil(NR);
    // Split the rows into a multiple of the thread count of blocks, none over MC.
    let threads = if how.parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let blocks = m.div_ceil(MC).div_ceil(threads) * threads;
    let mc = m.div_ceil(blocks).div_ceil(MR) * MR;
    if how.parallel && k > PRIVATE_B_K {
        // A long sum (a weight gradient over a batch's rows): a barrier per block of `KC`
        // would cost more than packing `B` once per thread, so each thread takes one run of
        // rows through the whole sum, packing `B` for itself, a block of at most `MC` rows
        // at a time.
        let per_thread = m.div_ceil(threads).div_ceil(MR) * MR;
        c.par_chunks_mut(per_thread * n)
            .enumerate()
            .for_each(|(run, c_run)| {
                with_buffer(&PACKED_B, panels * KC.min(k) * NR, |packed_b| {
                    for k0 in (0..k).step_by(KC) {
                        let kc = KC.min(k - k0);
                        let packed_b = &mut packed_b[..panels * kc * NR];
                        for (p, dst) in packed_b.chunks_mut(kc * NR).enumerate() {
                            pack_b(&b, k0, p * NR, dst);
                        }
                        let accumulate = k0 > 0 || how.accumulate;
                        for (blk, c_blk) in c_run.chunks_mut(mc * n).enumerate() {
                            let at = (run * per_thread + blk * mc, n);
                            block_product(kernels, &a, packed_b, (k0, kc), at, c_blk, accumulate);
                        }
                    }
                })
            });
        return Ok(());
    }
    with_buffer(&PACKED_B, panels * KC.min(k) * NR, |packed_b| {
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let accumulate = k0 > 0 || how.accumulate;
            let packed_b = &mut packed_b[..panels * kc * NR];
            let pack = |(p, dst): (usize, &mut [f32])| pack_b(&b, k0, p * NR, dst);
            if how.parallel {
                packed_b.par_chunks_mut(kc * NR).enumerate().for_each(pack);
            } else {
                packed_b.chunks_mut(kc * NR).enumerate().for_each(pack);
            }
            let packed_b = &*packed_b;
            let step = |(blk, c_blk): (usize, &mut [f32])| {
                let at = (blk * mc, n);
                block_product(kernels, &a, packed_b, (k0, kc), at, c_blk, accumulate)
            };
            if how.parallel {
                c.par_chunks_mut(mc * n).enumerate().for_each(step);
            } else {
                c.chunks_mut(mc * n).enumerate().for_each(step);
            }
        }
    });
    Ok(())
}

/// Rows `k0..k0 + kc` of `b`'s columns `j0..j0 + 16` into `dst` (`kc x 16`, row `k` at
/// `16 k`), zeros past the last column.
fn pack_b(b: &RightOperand, k0: usize, j0: usize, dst: &mut [f32]) {
    match b {
        RightOperand::F32(b) => pack_f32_b(b, k0, j0, dst),
        RightOperand::Codes(q) => pack_codes_b(q, k0, j0, dst),
    }
}

/// [`pack_b`] of scaled codes: each value converted and divided by its row's scale.
fn pack_codes_b(q: &ScaledCodes, k0: usize, j0: usize, dst: &mut [f32]) {
    let width = NR.min(q.cols - j0);
    for (kk, row) in dst.chunks_exact_mut(NR).enumerate() {
        let s = q.scales[k0 + kk];
        let at = (k0 + kk) * q.row_stride + j0;
        if let (Ok(full), Ok(row)) = (
            <&[i8; NR]>::try_from(&q.codes[at..at + width]),
            <&mut [f32; NR]>::try_from(&mut *row),
        ) {
            // Known sizes, so the conversions and divisions are vector instructions.
            for (d, &c) in row.iter_mut().zip(full) {
                *d = c as f32 / s;
            }
            continue;
        }
        for (d, &c) in row.iter_mut().zip(&q.codes[at..at + width]) {
            *d = c as f32 / s;
        }
        row[width..].fill(0.0);
    }
}

/// [`pack_b`] of an f32 matrix.
fn pack_f32_b(b: &MatRef, k0: usize, j0: usize, dst: &mut [f32]) {
    let width = NR.min(b.cols - j0);
    let kc = dst.len() / NR;
    if b.row_stride == 1 && b.col_stride != 1 {
        // A transposed row-major matrix: each of the panel's columns is a contiguous run.
        for j in 0..width {
            let src = &b.data[(j0 + j) * b.col_stride + k0..][..kc];
            for (row, &v) in dst.chunks_exact_mut(NR).zip(src) {
                row[j] = v;
            }
        }
        for row in dst.chunks_exact_mut(NR) {
            row[width..].fill(0.0);
        }
        return;
    }
    for (kk, row) in dst.chunks_exact_mut(NR).enumerate() {
        if b.col_stride == 1 {
            let at = (k0 + kk) * b.row_stride + j0;
            if let Ok(full) = <&[f32; NR]>::try_from(&b.data[at..at + width]) {
                // A whole panel row: a copy of known size, two vector moves.
                row.copy_from_slice(full);
                continue;
            }
            row[..width].copy_from_slice(&b.data[at..at + width]);
        } else {
            for (j, v) in row[..width].iter_mut().enumerate() {
                *v = b.at(k0 + kk, j0 + j);
            }
        }
        row[width..].fill(0.0);
    }
}

/// Rows `i0..i0 + rows` of `a`'s columns `k0..k0 + kc` as six-row panels filling `dst`
/// (panel `r` at `r * 6 kc`, its column `k` at `6 k` in it), the last panel's missing rows
/// repeating the block's last row.
fn pack_a_block(a: &MatRef, (i0, rows): (usize, usize), (k0, kc): (usize, usize), dst: &mut [f32]) {
    if a.row_stride == 1 {
        // A transposed row-major matrix: column `k` of the block is one contiguous run, read
        // once, front to back, and dealt out to the panels (panel by panel, each run would be
        // read a few values at a time, once per panel).
        for kk in 0..kc {
            let src = &a.data[(k0 + kk) * a.col_stride + i0..][..rows];
            let mut panels = dst.chunks_exact_mut(kc * MR);
            let mut runs = src.chunks_exact(MR);
            for (run, panel) in (&mut runs).zip(&mut panels) {
                // Known sizes: a copy of six values is two moves, not a call to `memmove`.
                let col: &mut [f32; MR] = (&mut panel[kk * MR..kk * MR + MR])
                    .try_into()
                    .expect("six values");
                *col = run.try_into().expect("six values");
            }
            let last = runs.remainder();
            if let (Some(panel), Some(&fill)) = (panels.next(), last.last()) {
                let col = &mut panel[kk * MR..kk * MR + MR];
                col[..last.len()].copy_from_slice(last);
                col[last.len()..].fill(fill);
            }
        }
        return;
    }
    for (r, panel) in dst.chunks_exact_mut(kc * MR).enumerate() {
        let h = MR.min(rows - r * MR);
        for (kk, col) in panel.chunks_exact_mut(MR).enumerate() {
            for (i, v) in col.iter_mut().enumerate() {
                *v = a.at(i0 + r * MR + i.min(h - 1), k0 + kk);
            }
        }
    }
}

/// The `kc` steps from `k0` of one block of `C`'s rows (`c_blk`, from row `i0`, `n` wide),
/// added to what is there when `accumulate`.
fn block_product(
    kernels: &Kernels,
    a: &MatRef,
    packed_b: &[f32],
    (k0, kc): (usize, usize),
    (i0, n): (usize, usize),
    c_blk: &mut [f32],
    accumulate: bool,
) {
    let rows = c_blk.len() / n;
    let row_panels = rows.div_ceil(MR);
    // Rows that are contiguous runs are read in place; others (a transposed view) would touch
    // one cache line per step and row, so they are packed once per block.
    let in_place = a.col_stride == 1;
    let packed_len = if in_place { 0 } else { row_panels * kc * MR };
    with_buffer(&PACKED_A, packed_len, |packed_a| {
        if !in_place {
            pack_a_block(a, (i0, rows), (k0, kc), packed_a);
        }
        let packed_a = &*packed_a;
        let mut edge = [0f32; MR * NR];
        for r in 0..row_panels {
            let h = MR.min(rows - r * MR);
            let (data, step, offsets): (&[f32], usize, [usize; MR]) = if in_place {
                let first = |i: usize| (i0 + r * MR + i.min(h - 1)) * a.row_stride + k0;
                (a.data, 1, std::array::from_fn(first))
            } else {
                (
                    &packed_a[r * kc * MR..(r + 1) * kc * MR],
                    MR,
                    std::array::from_fn(|i| i),
                )
            };
            let at = r * MR * n;
            // Whole panels of a whole row panel in one call, the rest through a full-size
            // tile buffer, panel by panel.
            let full = if h == MR { n / NR } else { 0 };
            if full > 0 {
                (kernels.sgemm_tiles)(
                    kc,
                    data,
                    &offsets,
                    step,
                    &packed_b[..full * kc * NR],
                    full,
                    &mut c_blk[at..],
                    n,
                    accumulate,
                );
            }
            for (p, panel) in packed_b.chunks_exact(kc * NR).enumerate().skip(full) {
                let j0 = p * NR;
                let width = NR.min(n - j0);
                let at = at + j0;
                if accumulate {
                    for i in 0..h {
                        edge[i * NR..i * NR + width]
                            .copy_from_slice(&c_blk[at + i * n..at + i * n + width]);
                    }
                }
                (kernels.sgemm_tiles)(
                    kc, data, &offsets, step, panel, 1, &mut edge, NR, accumulate,
                );
                for i in 0..h {
                    c_blk[at + i * n..at + i * n + width]
                        .copy_from_slice(&edge[i * NR..i * NR + width]);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether two results are the same bits.
    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn tiles_match_scalar_bit_for_bit() {
        let a = values(3000, 1);
        for kc in [1usize, 2, 7, 64, 300] {
            for (rows, step) in [([0, 1, 2, 3, 4, 5], MR), ([5, 400, 3, 3, 900, 17], 1)] {
                for panels in [1usize, 3] {
                    let b = values(panels * kc * NR, kc as u64);
                    // Rows wider than the tiles: the columns past them stay as they were.
                    let ldc = panels * NR + 5;
                    for accumulate in [false, true] {
                        let c0 = values(5 * ldc + panels * NR, 9);
                        let mut want = c0.clone();
                        crate::kernels::scalar::sgemm_tiles(
                            kc, &a, &rows, step, &b, panels, &mut want, ldc, accumulate,
                        );
                        // The reference is the definition: one fused chain per element
                        // (row 1, column 3 of the last tile).
                        let (q, at) = (panels - 1, ldc + (panels - 1) * NR + 3);
                        let mut sum = if accumulate { c0[at] } else { 0.0 };
                        for kk in 0..kc {
                            let bv = b[(q * kc + kk) * NR + 3];
                            sum = a[rows[1] + kk * step].mul_add(bv, sum);
                        }
                        assert_eq!(want[at].to_bits(), sum.to_bits());
                        assert_eq!(want[ldc - 1].to_bits(), c0[ldc - 1].to_bits());
                        for k in Kernels::available() {
                            let mut got = c0.clone();
                            (k.sgemm_tiles)(
                                kc, &a, &rows, step, &b, panels, &mut got, ldc, accumulate,
                            );
                            let same = same_bits(&got, &want);
                            assert!(
                                same,
                                "{} kc={kc} step={step} panels={panels} accumulate={accumulate}",
                                k.name
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tiles_check_their_bounds() {
        for set in Kernels::available() {
            let (a, b) = (vec![0f32; 10], vec![0f32; 4 * NR]);
            let run = |rows: [usize; MR], panels: usize, c_len: usize, ldc: usize| {
                std::panic::catch_unwind(|| {
                    let mut c = vec![0f32; c_len];
                    (set.sgemm_tiles)(2, &a, &rows, 1, &b, panels, &mut c, ldc, false);
                })
                .is_err()
            };
            let fits = [0, 1, 2, 3, 4, 5];
            assert!(!run(fits, 2, 5 * 2 * NR + 2 * NR, 2 * NR), "{}", set.name);
            // Row 9 with step 1 needs a[10].
            assert!(run([0, 1, 2, 3, 4, 9], 1, MR * NR, NR), "{}", set.name);
            // Three panels need 3 * 2 * 16 values of `b`.
            assert!(run(fits, 3, 5 * 3 * NR + 3 * NR, 3 * NR), "{}", set.name);
            // Two tiles in rows one tile wide would overlap.
            assert!(run(fits, 2, 5 * NR + 2 * NR, NR), "{}", set.name);
            // The last row's second tile runs past `c`.
            assert!(run(fits, 2, 5 * 2 * NR + NR, 2 * NR), "{}", set.name);
        }
    }

    /// The product against f64 arithmetic, and every set against the scalar set bit for bit,
    /// on odd shapes, several `KC` blocks, and plain and transposed operands.
    #[test]
    fn products_match_the_definition_and_every_set() {
        for (m, k, n) in [
            (1, 1, 1),
            (7, 3, 5),
            (13, 300, 37),
            (6, 513, 16),
            (50, 40, 33),
            // A sum long enough for each thread to pack its own `B`.
            (20, PRIVATE_B_K + 77, 35),
        ] {
            let a_data = values(m * k, 3);
            let b_data = values(k * n, 4);
            let a_t: Vec<f32> = (0..k * m).map(|x| a_data[(x % m) * k + x / m]).collect();
            let b_t: Vec<f32> = (0..n * k).map(|x| b_data[(x % k) * n + x / k]).collect();
            let plain = (
                MatRef::row_major(&a_data, m, k).unwrap(),
                MatRef::row_major(&b_data, k, n).unwrap(),
            );
            let transposed = (
                MatRef::row_major(&a_t, k, m).unwrap().t(),
                MatRef::row_major(&b_t, n, k).unwrap().t(),
            );
            let mut want = vec![0f32; m * n];
            sgemm(&Kernels::SCALAR, plain.0, plain.1, &mut want).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|kk| a_data[i * k + kk] as f64 * b_data[kk * n + j] as f64)
                        .sum();
                    let d = (want[i * n + j] as f64 - exact).abs();
                    assert!(
                        d <= 1e-5 * (1.0 + exact.abs()) * (k as f64).sqrt(),
                        "{m}x{k}x{n}"
                    );
                }
            }
            for set in Kernels::available() {
                for (a, b) in [
                    plain,
                    transposed,
                    (plain.0, transposed.1),
                    (transposed.0, plain.1),
                ] {
                    let mut got = vec![f32::NAN; m * n];
                    sgemm(set, a, b, &mut got).unwrap();
                    let same = same_bits(&got, &want);
                    assert!(same, "{} {m}x{k}x{n}", set.name);
                }
            }
        }
    }

    #[test]
    fn products_do_not_depend_on_the_thread_count() {
        for (m, k, n) in [(301, 260, 45), (301, PRIVATE_B_K + 260, 45)] {
            same_bits_on_one_and_three_threads(m, k, n);
        }
    }

    fn same_bits_on_one_and_three_threads(m: usize, k: usize, n: usize) {
        let (a, b) = (values(m * k, 5), values(k * n, 6));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut c = vec![0f32; m * n];
            pool.install(|| {
                let (a, b) = (
                    MatRef::row_major(&a, m, k).unwrap(),
                    MatRef::row_major(&b, k, n).unwrap(),
                );
                sgemm(Kernels::get(), a, b, &mut c).unwrap()
            });
            c
        };
        let one = run(1);
        assert!(same_bits(&run(3), &one));
    }

    /// `c += a b` continues each element's chain from the value in `c` (the definition, in
    /// f32), on the pool and on the calling thread alike, across several `KC` blocks.
    #[test]
    fn accumulating_and_serial_products_follow_the_definition() {
        let (m, k, n) = (19, 300, 21);
        let (a, b, c0) = (values(m * k, 7), values(k * n, 8), values(m * n, 9));
        let mut want = c0.clone();
        for i in 0..m {
            for j in 0..n {
                for kk in 0..k {
                    want[i * n + j] = a[i * k + kk].mul_add(b[kk * n + j], want[i * n + j]);
                }
            }
        }
        let (av, bv) = (
            MatRef::row_major(&a, m, k).unwrap(),
            MatRef::row_major(&b, k, n).unwrap(),
        );
        for set in Kernels::available() {
            for parallel in [true, false] {
                let how = Product {
                    accumulate: true,
                    parallel,
                };
                let mut got = c0.clone();
                sgemm_with(set, av, bv, &mut got, how).unwrap();
                let same = same_bits(&got, &want);
                assert!(same, "{} parallel={parallel}", set.name);
                let mut plain = vec![f32::NAN; m * n];
                let how = Product {
                    accumulate: false,
                    parallel,
                };
                sgemm_with(set, av, bv.t().t(), &mut plain, how).unwrap();
                let mut pooled = vec![0f32; m * n];
                sgemm(set, av, bv, &mut pooled).unwrap();
                assert_eq!(plain, pooled, "{} parallel={parallel}", set.name);
            }
        }
    }

    /// Codes scaled per row give the bits of the f32 matrix `code / scale`, on every set, with
    /// padded rows, a partial panel, several `KC` blocks and each thread packing its own `B`.
    #[test]
    fn scaled_codes_multiply_as_their_dequantized_values() {
        for (m, k, n, stride) in [
            (7, 3, 5, 5),
            (13, 300, 37, 64),
            (20, PRIVATE_B_K + 77, 35, 40),
        ] {
            let a_data = values(m * k, 11);
            let codes: Vec<i8> = values(k * stride, 12)
                .iter()
                .map(|v| (v * 127.0).round() as i8)
                .collect();
            let scales: Vec<f32> = values(k, 13).iter().map(|v| 1.5 + v).collect();
            let dequantized: Vec<f32> = (0..k * n)
                .map(|x| codes[x / n * stride + x % n] as f32 / scales[x / n])
                .collect();
            let a_t: Vec<f32> = (0..k * m).map(|x| a_data[(x % m) * k + x / m]).collect();
            let plain = MatRef::row_major(&a_data, m, k).unwrap();
            let b = ScaledCodes::new(&codes, &scales, n, stride).unwrap();
            let mut want = vec![0f32; m * n];
            let b_f32 = MatRef::row_major(&dequantized, k, n).unwrap();
            sgemm(&Kernels::SCALAR, plain, b_f32, &mut want).unwrap();
            for set in Kernels::available() {
                // The weight gradients' `dy^T`: a transposed view.
                for a in [plain, MatRef::row_major(&a_t, k, m).unwrap().t()] {
                    let mut got = vec![f32::NAN; m * n];
                    sgemm(set, a, b, &mut got).unwrap();
                    let same = same_bits(&got, &want);
                    assert!(same, "{} {m}x{k}x{n}", set.name);
                }
            }
        }
        // Codes that do not fit, and rows wider than their stride.
        let codes = [0i8; 10];
        assert!(ScaledCodes::new(&codes, &[1.0; 3], 4, 4).is_err());
        assert!(ScaledCodes::new(&codes, &[1.0; 2], 6, 5).is_err());
        assert!(ScaledCodes::new(&codes, &[1.0; 3], 2, 4).is_ok());
        let b = ScaledCodes::new(&codes, &[1.0; 2], 4, 5).unwrap();
        let a = MatRef::row_major(&[1.0; 3], 1, 3).unwrap();
        assert!(sgemm(Kernels::get(), a, b, &mut [0.0; 4]).is_err());
    }

    #[test]
    fn shapes_are_checked() {
        let d = vec![0f32; 12];
        assert!(MatRef::new(&d, 3, 5, 5, 1).is_err());
        let a = MatRef::row_major(&d, 3, 4).unwrap();
        let mut c = vec![0f32; 9];
        assert!(sgemm(Kernels::get(), a, a, &mut c).is_err());
        let mut c = vec![1f32; 9];
        let empty = MatRef::row_major(&[], 3, 0).unwrap();
        sgemm(Kernels::get(), empty, empty.t(), &mut c).unwrap();
        assert!(c.iter().all(|&v| v == 0.0));
    }
}
