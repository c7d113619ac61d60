//! The reference kernels: plain loops, obviously right. Fast kernels are tested against these.

use super::{
    combine_lanes, combine_q8_sums, combine_square_sums, combine_sums, inv_rms, DOT_SUMS,
    Q8_DOT_SUMS, SCORE_SUMS, SOFTMAX_SUMS, SQUARE_SUMS,
};
use crate::base3::{decode_digits, BASE3_BLOCK_BYTES, BASE3_BLOCK_ELEMS, BASE3_DIGITS};
use crate::q6_k::{self, Q6_K_BYTES};
use crate::q8_0::{Q8_0_BLOCK, Q8_0_BYTES};
use crate::quantize::{activation_code, activation_scale};
use crate::ternary::{block_offset, BLOCK_BYTES, BLOCK_ELEMS};

/// Exact dot product of row `r` of the runtime-layout matrix `w` (`row_bytes` per row) with
/// one padded int8 activation row.
#[inline]
pub fn dot_row(w: &[u8], row_bytes: usize, r: usize, x: &[i8]) -> i32 {
    let mut acc = 0i32;
    for (b, xb) in x.chunks_exact(BLOCK_ELEMS).enumerate() {
        let at = block_offset(row_bytes, r, b);
        for (j, &byte) in w[at..at + BLOCK_BYTES].iter().enumerate() {
            for lane in 0..4 {
                let t = ((byte >> (6 - 2 * lane)) & 3) as i32 - 1;
                acc += t * xb[lane * 32 + j] as i32;
            }
        }
    }
    acc
}

/// Reference matrix-vector product; see [`super::GemvFn`].
pub fn gemv(w: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
    debug_assert_eq!(x.len(), row_bytes * 4);
    let rows = (w.len() / row_bytes).min(out.len());
    for (r, o) in out[..rows].iter_mut().enumerate() {
        *o = dot_row(w, row_bytes, r, x);
    }
}

/// Reference matrix-matrix product; see [`super::GemmFn`].
pub fn gemm(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]) {
    if tokens == 0 {
        return;
    }
    let rows = out.len() / tokens;
    let k = row_bytes * 4;
    for t in 0..tokens {
        gemv(
            w,
            row_bytes,
            &x[t * k..(t + 1) * k],
            &mut out[t * rows..(t + 1) * rows],
        );
    }
}

/// Exact dot product of row `r` of the dense-layout matrix `w` ([`crate::base3`],
/// `row_bytes` per row) with one padded int8 activation row.
#[inline]
pub fn dot_row_base3(w: &[u8], row_bytes: usize, r: usize, x: &[i8]) -> i32 {
    let mut acc = 0i32;
    for (b, xb) in x.chunks_exact(BASE3_BLOCK_ELEMS).enumerate() {
        let at = block_offset(row_bytes, r, b);
        for (j, &byte) in w[at..at + BASE3_BLOCK_BYTES].iter().enumerate() {
            for (i, d) in decode_digits(byte).into_iter().enumerate() {
                acc += (d as i32 - 1) * xb[i * BASE3_BLOCK_BYTES + j] as i32;
            }
        }
    }
    acc
}

/// Reference matrix-vector product in the dense layout; see [`super::GemvFn`].
pub fn gemv_base3(w: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
    debug_assert_eq!(x.len(), row_bytes * BASE3_DIGITS);
    let rows = (w.len() / row_bytes).min(out.len());
    for (r, o) in out[..rows].iter_mut().enumerate() {
        *o = dot_row_base3(w, row_bytes, r, x);
    }
}

/// Reference matrix-matrix product in the dense layout; see [`super::GemmFn`].
pub fn gemm_base3(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]) {
    if tokens == 0 {
        return;
    }
    let rows = out.len() / tokens;
    let k = row_bytes * BASE3_DIGITS;
    for t in 0..tokens {
        gemv_base3(
            w,
            row_bytes,
            &x[t * k..(t + 1) * k],
            &mut out[t * rows..(t + 1) * rows],
        );
    }
}

/// Reference f16 x f32 dot product; see [`super::DotF16Fn`] for the summation order.
pub fn dot_f16(w: &[half::f16], x: &[f32]) -> f32 {
    let mut acc = [0f32; DOT_SUMS];
    for (k, (wv, xv)) in w.iter().zip(x).enumerate() {
        acc[k % DOT_SUMS] += wv.to_f32() * xv;
    }
    combine_sums(&acc)
}

/// An element of a KV cache row, as f32.
pub trait CacheElem: Copy + Send + Sync + 'static {
    /// The value, exactly.
    fn to_f32(self) -> f32;
}

impl CacheElem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
}

impl CacheElem for half::f16 {
    #[inline]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// Reference attention scores; see [`super::ScoreRowsFn`].
pub fn score_rows<E: CacheElem>(q: &[f32], keys: &[E], stride: usize, scores: &mut [f32]) {
    let n = q.len();
    for (j, s) in scores.iter_mut().enumerate() {
        let mut acc = [0f32; SCORE_SUMS];
        for (k, (x, y)) in q.iter().zip(&keys[j * stride..j * stride + n]).enumerate() {
            acc[k % SCORE_SUMS] = x.mul_add(y.to_f32(), acc[k % SCORE_SUMS]);
        }
        *s = combine_lanes(&acc);
    }
}

/// Reference weighted sum of value rows; see [`super::MixRowsFn`].
pub fn mix_rows<E: CacheElem>(out: &mut [f32], w: &[f32], values: &[E], stride: usize) {
    let n = out.len();
    for (j, &wj) in w.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(&values[j * stride..j * stride + n]) {
            *o += wj * v.to_f32();
        }
    }
}

/// [`mix_rows`] of the outputs from `from` on only (the SIMD kernels' tail).
pub fn mix_rows_from<E: CacheElem>(
    out: &mut [f32],
    from: usize,
    w: &[f32],
    values: &[E],
    stride: usize,
) {
    for (i, o) in out.iter_mut().enumerate().skip(from) {
        for (j, &wj) in w.iter().enumerate() {
            *o += wj * values[j * stride + i].to_f32();
        }
    }
}

/// Below this, [`exp_nonpositive`] returns 0: `e^-87` (about `1.6e-38`) is still a normal
/// f32, and a softmax term that small is under `2^-125` of the row's largest, which is 1.
pub const EXP_MIN: f32 = -87.0;

/// `ln 2` split so that `n * LN2_HI` is exact for the `|n| <= 126` the reduction meets (9
/// significant bits) and `LN2_HI + LN2_LO` is `ln 2` to f32's precision twice over.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// The Taylor coefficients of `e^r` from `r^7` down to `r^0`, for Horner's rule on
/// `|r| <= ln(2) / 2`, where the first term left out (`r^8 / 8!`) is below `6e-9`, so the
/// roundings dominate the error.
pub const EXP_POLY: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `e^d` for `d <= 0` (a softmax's shifted score), with a relative error under `2^-22`, by
/// operations every SIMD set repeats exactly: `n = round_ties_even(d * log2(e))` (here by
/// adding and subtracting `1.5 * 2^23`, exact in that range), `r = (d - n * LN2_HI) - n *
/// LN2_LO`, Horner's rule over [`EXP_POLY`], times `2^n` built in the exponent bits. 0 below
/// [`EXP_MIN`]; NaN for NaN. Branch-free, so loops over it vectorize (the trainer's attention
/// softmax and cross-entropy use it through the kernel sets).
#[inline(always)]
pub fn exp_nonpositive(d: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer.
    const ROUND: f32 = 12_582_912.0;
    // Clamped (NaN kept: the comparison is false) so that 2^n stays a normal number; the
    // clamped values are zeroed at the end.
    let dc = if d < EXP_MIN { EXP_MIN } else { d };
    let shifted = dc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (dc - n * LN2_HI) - n * LN2_LO;
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    // The low bits of `shifted` hold n (in [-126, 0] here): n + 127 is 2^n's exponent field.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let v = p * f32::from_bits(n_bits.wrapping_add(127) << 23);
    if d < EXP_MIN {
        0.0
    } else {
        v
    }
}

/// The `LN2_HI` and `LN2_LO` halves, for the SIMD modules that repeat [`exp_nonpositive`].
#[allow(dead_code)] // used only by the SIMD modules compiled for this target
pub(crate) const LN2_SPLIT: (f32, f32) = (LN2_HI, LN2_LO);

/// Reference softmax of scaled scores; see [`super::SoftmaxFn`].
pub fn softmax(x: &mut [f32], scale: f32) {
    let mut m = f32::NEG_INFINITY;
    for v in x.iter_mut() {
        *v *= scale;
        // Exact whatever the order; a NaN score makes the row NaN through its own term.
        m = m.max(*v);
    }
    let mut sums = [0f32; SOFTMAX_SUMS];
    for (i, v) in x.iter_mut().enumerate() {
        *v = exp_nonpositive(*v - m);
        sums[i % SOFTMAX_SUMS] += *v;
    }
    let inv = 1.0 / combine_lanes(&sums);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Reference sum of shifted exponentials; see [`super::ExpSumFn`].
pub fn exp_sum(x: &[f32], shift: f32) -> f32 {
    let mut sums = [0f32; SOFTMAX_SUMS];
    for (i, &v) in x.iter().enumerate() {
        sums[i % SOFTMAX_SUMS] += exp_nonpositive(v - shift);
    }
    combine_lanes(&sums)
}

/// Reference scaled shifted exponentials; see [`super::ExpScaledFn`].
pub fn exp_scaled(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
    for (o, &v) in out[..x.len()].iter_mut().zip(x) {
        *o = exp_nonpositive(v - shift) * scale;
    }
}

/// Reference Q8_0 x Q8_0-activation dot product; see [`super::DotQ8_0Fn`] for the order.
pub fn dot_q8_0(row: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    let mut acc = [0f32; Q8_DOT_SUMS];
    for (b, ((blk, xs), &dx)) in row
        .chunks_exact(Q8_0_BYTES)
        .zip(xq.chunks_exact(Q8_0_BLOCK))
        .zip(xd)
        .enumerate()
    {
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32() * dx;
        for j in 0..8 {
            let s: i32 = (4 * j..4 * j + 4)
                .map(|i| (blk[2 + i] as i8) as i32 * xs[i] as i32)
                .sum();
            acc[(b % 2) * 8 + j] += d * s as f32;
        }
    }
    combine_q8_sums(&acc)
}

/// Reference Q6_K x Q8_0-activation dot product; see [`super::DotQ6KFn`] for the order.
pub fn dot_q6_k(row: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    let mut acc = [0f32; Q8_DOT_SUMS];
    let blocks = (row.len() / Q6_K_BYTES).min(xd.len() / 8);
    for (s, blk) in row.chunks_exact(Q6_K_BYTES).take(blocks).enumerate() {
        let (d, scales) = (q6_k::block_d(blk), q6_k::block_scales(blk));
        for run in 0..8 {
            let b = 8 * s + run;
            let codes = q6_k::run_codes(blk, run);
            let xs = &xq[32 * b..32 * b + 32];
            let dd = d * xd[b];
            for j in 0..8 {
                let p: i32 = (4 * j..4 * j + 4)
                    .map(|i| codes[i] as i32 * xs[i] as i32)
                    .sum();
                let sc = (scales[2 * run + j / 4] as i8) as i32;
                acc[(b % 2) * 8 + j] += dd * (sc * p) as f32;
            }
        }
    }
    combine_q8_sums(&acc)
}

/// Reference f32 matrix-product row of tiles; see [`super::SgemmTilesFn`].
#[allow(clippy::too_many_arguments)]
pub fn sgemm_tiles(
    kc: usize,
    a: &[f32],
    rows: &[usize; super::SGEMM_MR],
    a_step: usize,
    b: &[f32],
    panels: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    use super::SGEMM_NR;
    assert!(
        ldc >= panels * SGEMM_NR,
        "{panels} tiles in rows {ldc} apart"
    );
    for q in 0..panels {
        let panel = &b[q * kc * SGEMM_NR..][..kc * SGEMM_NR];
        for (i, &r) in rows.iter().enumerate() {
            for j in 0..SGEMM_NR {
                let at = i * ldc + q * SGEMM_NR + j;
                let mut sum = if accumulate { c[at] } else { 0.0 };
                for k in 0..kc {
                    sum = a[r + k * a_step].mul_add(panel[k * SGEMM_NR + j], sum);
                }
                c[at] = sum;
            }
        }
    }
}

/// The f64 sum of squares of `x` in [`SQUARE_SUMS`] running sums: square `i` (exact in f64)
/// is added to sum `i mod 16`, and the sums are combined by [`combine_square_sums`]. The
/// independent sums let SIMD sets keep several vector additions in flight where one running
/// sum waits on each addition's latency.
pub fn sum_squares(x: &[f32]) -> f64 {
    let mut s = [0f64; SQUARE_SUMS];
    // Whole runs of sixteen as fixed-size arrays, so the compiler keeps the sums in vector
    // registers (an index `i % 16` had kept them scalar; the trainer's norms run this).
    let mut runs = x.chunks_exact(SQUARE_SUMS);
    for run in &mut runs {
        let run: &[f32; SQUARE_SUMS] = run.try_into().expect("chunks of sixteen");
        for (s, &v) in s.iter_mut().zip(run) {
            *s += v as f64 * v as f64;
        }
    }
    for (s, &v) in s.iter_mut().zip(runs.remainder()) {
        *s += v as f64 * v as f64;
    }
    combine_square_sums(&s)
}

/// RMSNorm and int8 quantization of one row; see [`super::RmsNormQuantizeFn`].
pub fn rms_norm_quantize(x: &[f32], w: &[f32], eps: f32, q: &mut [i8]) -> f32 {
    let n = x.len();
    assert!(
        w.len() == n && q.len() >= n,
        "rms_norm_quantize: row lengths"
    );
    let r = inv_rms(sum_squares(x), n, eps);
    let y = |i: usize| w[i] * (x[i] * r);
    let amax = (0..n).fold(0f32, |m, i| m.max(y(i).abs()));
    let s = activation_scale(amax);
    for (i, qi) in q[..n].iter_mut().enumerate() {
        *qi = activation_code(y(i) * s);
    }
    q[n..].fill(0);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TernaryMatrix;

    #[test]
    fn gemv_equals_the_definition() {
        let (rows, cols) = (5, 200);
        let codes: Vec<i8> = (0..rows * cols).map(|i| (i * 7 % 3) as i8 - 1).collect();
        let x: Vec<i8> = (0..cols).map(|i| ((i * 37) % 256) as u8 as i8).collect();
        let m = TernaryMatrix::from_codes(&codes, rows, cols).unwrap();
        let mut xp = vec![0i8; TernaryMatrix::padded_cols(cols)];
        xp[..cols].copy_from_slice(&x);
        let mut out = vec![0i32; rows];
        gemv(m.bytes(), m.row_bytes(), &xp, &mut out);
        for r in 0..rows {
            let want: i32 = (0..cols)
                .map(|k| codes[r * cols + k] as i32 * x[k] as i32)
                .sum();
            assert_eq!(out[r], want);
        }
        let mut out2 = vec![0i32; 2 * rows];
        let x2: Vec<i8> = xp.iter().chain(xp.iter()).copied().collect();
        gemm(m.bytes(), m.row_bytes(), &x2, 2, &mut out2);
        assert_eq!(&out2[..rows], &out[..]);
        assert_eq!(&out2[rows..], &out[..]);
    }
}
