//! The reference kernels: plain loops, obviously right. Fast kernels are tested against these.

use crate::ternary::{BLOCK_BYTES, BLOCK_ELEMS};

/// Exact dot product of one runtime-layout row with one padded int8 activation row.
#[inline]
pub fn dot_row(row: &[u8], x: &[i8]) -> i32 {
    let mut acc = 0i32;
    for (block, xb) in row
        .chunks_exact(BLOCK_BYTES)
        .zip(x.chunks_exact(BLOCK_ELEMS))
    {
        for (j, &b) in block.iter().enumerate() {
            for lane in 0..4 {
                let t = ((b >> (6 - 2 * lane)) & 3) as i32 - 1;
                acc += t * xb[lane * 32 + j] as i32;
            }
        }
    }
    acc
}

/// Reference matrix-vector product; see [`super::GemvFn`].
pub fn gemv(w: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
    debug_assert_eq!(x.len(), row_bytes * 4);
    for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
        *o = dot_row(row, x);
    }
}

/// Reference matrix-matrix product; see [`super::GemmFn`].
pub fn gemm(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]) {
    let rows = w.len() / row_bytes;
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

/// Reference f16 x f32 dot product; see [`super::DotF16Fn`] for the summation order.
pub fn dot_f16(w: &[half::f16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (k, (wv, xv)) in w.iter().zip(x).enumerate() {
        acc[k % 8] += wv.to_f32() * xv;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Reference Q8_0 x f32 dot product; see [`super::DotQ8_0Fn`].
pub fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (b, (blk, xs)) in row.chunks_exact(34).zip(x.chunks(32)).enumerate() {
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        for (j, (&q, xv)) in blk[2..].iter().zip(xs).enumerate() {
            acc[(b * 32 + j) % 8] += (d * (q as i8) as f32) * xv;
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
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
