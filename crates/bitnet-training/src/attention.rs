//! Causal self-attention with rotate-half RoPE and grouped KV heads as one CPU operation, with
//! its backward pass.
//!
//! Composed from candle primitives, attention materialises `[batch, heads, t, t]` scores and
//! probabilities (and their gradients, each zero-filled and added once by candle's backward
//! pass), copies heads in and out of `[batch, heads, t, head_dim]`, repeats the KV heads, and
//! multiplies the masked upper triangle too. This operation works per batch row, one task
//! each: it lays the row's heads out head-major (rotating queries and keys; the query heads that
//! share a KV head side by side, position by position) and takes the queries of each KV head's
//! query heads `QUERY_BLOCK` positions at a time against the keys up to the block's last
//! position (one product for the group: taller blocks, the keys packed once; the backward pass
//! measured 8% faster than with one head at a time, 2026-11), as
//! matrix products on `bitnet_quant::sgemm` (the kernel set's tile, chosen by runtime feature
//! detection; one fused multiply-add chain per element, so the same bits on every set): the
//! block's scores, their softmax over each query's own keys (`softmax` of
//! `bitnet_quant::kernels`), the weighted sum of the values. Blocks keep the masked work to
//! the diagonal ones, and products rather than one query at a time keep the scores out of
//! horizontal sums. The forward pass keeps each block's probabilities (21 MB a layer at the
//! training benchmark's size, from `crate::scratch`), and the backward pass reads them rather
//! than recomputing the scores and the softmax (which had cost about 7% of a step),
//! then takes the gradients as products too.
//! Its sums run in another order than the composition's, so the two agree to f32 rounding, not
//! bit for bit (tested); it is deterministic whatever the thread count.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::fused::{f32_slice, sum8, with_cpu_f32};
use crate::scratch;
use crate::Result;
use bitnet_quant::kernels::Kernels;
use bitnet_quant::sgemm::{sgemm_with, MatRef, Product};

/// cos and sin of the RoPE angles, `[positions, head_dim / 2]` each (the rotate-half convention
/// uses one angle per pair `(i, i + head_dim / 2)`).
#[derive(Debug, Clone)]
pub struct RopeAngles {
    /// `cos(pos * inv_freq[i])`.
    pub cos: Arc<[f32]>,
    /// `sin(pos * inv_freq[i])`.
    pub sin: Arc<[f32]>,
    /// `head_dim / 2`.
    pub half: usize,
}

impl RopeAngles {
    /// The angles of positions `0..positions` for `inv_freq[i] = 1 / theta^(2i / head_dim)`, in
    /// f32 as the model's tables have always been computed.
    pub fn new(theta: f32, head_dim: usize, positions: usize) -> RopeAngles {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for pos in 0..positions {
            for i in 0..half {
                let inv_freq = 1.0 / theta.powf((2 * i) as f32 / head_dim as f32);
                let a = pos as f32 * inv_freq;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeAngles {
            cos: cos.into(),
            sin: sin.into(),
            half,
        }
    }

    fn at(&self, pos: usize) -> (&[f32], &[f32]) {
        let r = pos * self.half..(pos + 1) * self.half;
        (&self.cos[r.clone()], &self.sin[r])
    }
}

/// `x * cos + rotate_half(x) * sin` of one head, with the same products and sum as the
/// composition (no fused multiply-add).
fn rotate(x: &[f32], (c, s): (&[f32], &[f32]), out: &mut [f32]) {
    let half = c.len();
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (x[i], x[half + i]);
        o1[i] = a * c[i] + (-b) * s[i];
        o2[i] = b * c[i] + a * s[i];
    }
}

/// The gradient of [`rotate`] (its transpose), written to `out`.
fn rotate_back(g: &[f32], (c, s): (&[f32], &[f32]), out: &mut [f32]) {
    let half = c.len();
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (g[i], g[half + i]);
        o1[i] = a * c[i] + b * s[i];
        o2[i] = b * c[i] - a * s[i];
    }
}

/// `sum a[k] * b[k]` in eight running sums.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum8([a, b], |[x, y]| x * y)
}

/// The operation's name in error messages.
const ATT: &str = "causal attention";

/// Query positions per block: a block's scores are `QUERY_BLOCK x t` at most, and the work
/// spent on masked keys is the diagonal blocks' upper halves.
const QUERY_BLOCK: usize = 64;

/// Where [`head_major`] puts head `h` of position `i`: row `(h / group * t + i) * group +
/// h % group`, so the `group` heads that share a KV head sit side by side, position by
/// position, and a block of positions is one run of rows for all of them.
#[inline]
fn head_major_row(h: usize, i: usize, t: usize, group: usize) -> usize {
    (h / group * t + i) * group + h % group
}

/// One batch row `x [t, heads * hd]` in rows of `hd` by [`head_major_row`] (`group` 1: each
/// head's rows consecutive), rotated by RoPE when `rope` is given.
fn head_major(
    x: &[f32],
    heads: usize,
    group: usize,
    hd: usize,
    rope: Option<&RopeAngles>,
) -> Vec<f32> {
    let t = x.len() / (heads * hd).max(1);
    // Every row is written.
    let mut out = scratch::take(x.len());
    for (i, src) in x.chunks_exact(heads * hd).enumerate() {
        for (h, s) in src.chunks_exact(hd).enumerate() {
            let d = &mut out[head_major_row(h, i, t, group) * hd..][..hd];
            match rope {
                Some(rope) => rotate(s, rope.at(i), d),
                None => d.copy_from_slice(s),
            }
        }
    }
    out
}

/// The transpose of [`head_major`] applied to `g`, written to the first `heads * hd` values
/// of each of the `t` rows of `out`, `stride` apart (rows of a wider matrix).
fn write_from_head_major(
    g: &[f32],
    heads: usize,
    group: usize,
    hd: usize,
    rope: Option<&RopeAngles>,
    (out, stride): (&mut [f32], usize),
) {
    let t = g.len() / (heads * hd).max(1);
    for (i, dst) in out.chunks_mut(stride).take(t).enumerate() {
        for (h, d) in dst[..heads * hd].chunks_exact_mut(hd).enumerate() {
            let s = &g[head_major_row(h, i, t, group) * hd..][..hd];
            match rope {
                Some(rope) => rotate_back(s, rope.at(i), d),
                None => d.copy_from_slice(s),
            }
        }
    }
}

/// The first `rows x cols` values of `data` as a row-major matrix.
fn mat(data: &[f32], rows: usize, cols: usize) -> MatRef<'_> {
    MatRef::row_major(&data[..rows * cols], rows, cols)
        .expect("a row-major view of exactly its values fits")
}

/// `c = a b`, or `c += a b` when `accumulate`, on the calling thread (the operation already
/// gives each thread its own batch rows), one fused multiply-add chain per element.
fn product(k: &Kernels, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    let how = Product {
        accumulate,
        parallel: false,
    };
    sgemm_with(k, a, b, c, how).expect("the attention's blocks have matching shapes");
}

/// The operation's sizes; `t` comes from the arguments.
struct Dims {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Dims {
    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// One batch row's `q`, `k`, `v`.
pub(crate) type RowArgs<'a> = (&'a [f32], &'a [f32], &'a [f32]);

pub(crate) struct CausalAttention {
    dims: Dims,
    scale: f32,
    rope: RopeAngles,
    /// The probabilities of the forward pass, when this runs as a graph operation of its own
    /// (a block keeps them with the rest of what it saves).
    saved_probs: OnceLock<Vec<f32>>,
}

impl Drop for CausalAttention {
    fn drop(&mut self) {
        if let Some(p) = self.saved_probs.take() {
            scratch::give_back(p);
        }
    }
}

impl CausalAttention {
    /// The operation for `heads` query heads over `kv_heads` KV heads, RoPE by `rope` (whose
    /// angles fix the head size).
    pub(crate) fn new(heads: usize, kv_heads: usize, rope: &RopeAngles) -> Result<Self> {
        let head_dim = 2 * rope.half;
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || head_dim == 0 {
            return Err(candle_core::Error::Msg(format!(
                "causal attention: {heads} heads over {kv_heads} KV heads of {head_dim}"
            ))
            .into());
        }
        Ok(CausalAttention {
            dims: Dims {
                heads,
                kv_heads,
                head_dim,
            },
            scale: (1.0 / (head_dim as f64).sqrt()) as f32,
            rope: rope.clone(),
            saved_probs: OnceLock::new(),
        })
    }

    /// Values of one batch row's probabilities as [`Self::forward_row`] keeps them: for each
    /// KV head, each block of positions `i0..i1` gives `(i1 - i0) * group` rows of `i1`.
    fn probs_len(&self, t: usize) -> usize {
        let rows_times_keys: usize = (0..t)
            .step_by(QUERY_BLOCK)
            .map(|i0| {
                let i1 = (i0 + QUERY_BLOCK).min(t);
                (i1 - i0) * i1
            })
            .sum();
        self.dims.kv_heads * self.dims.group() * rows_times_keys
    }

    /// The outputs `[b, t, q_width]` for `b` batch rows of `t` positions of `q`, `k`, `v`
    /// (laid out as [`causal_attention`] takes them), one task per batch row, and the
    /// probabilities, which [`Self::backward_rows`] takes.
    pub(crate) fn forward_rows(
        &self,
        (q, k, v): RowArgs,
        b: usize,
        t: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (qn, kn) = (t * self.dims.q_width(), t * self.dims.kv_width());
        let pn = self.probs_len(t);
        let kernels = Kernels::get();
        // Every head of every position is written, and every block's probabilities.
        let mut y = scratch::take(b * qn);
        let mut probs = scratch::take(b * pn);
        y.par_chunks_mut(qn.max(1))
            .zip(probs.par_chunks_mut(pn.max(1)))
            .enumerate()
            .for_each(|(r, (y, p))| {
                let rows = (&q[r * qn..][..qn], &k[r * kn..][..kn], &v[r * kn..][..kn]);
                self.forward_row(kernels, rows, y, p);
            });
        (y, probs)
    }

    /// The gradients of `q`, `k` and `v` for `b` batch rows of `t` positions, side by side in
    /// each row of the result (`[b * t, q_width + 2 kv_width]`: the layout in which the
    /// projections' backward pass takes them), from the arguments, the outputs `y` and
    /// probabilities `probs` of [`Self::forward_rows`] and the outputs' gradient `dy`.
    pub(crate) fn backward_rows(
        &self,
        (q, k, v): RowArgs,
        (y, dy): (&[f32], &[f32]),
        probs: &[f32],
        b: usize,
        t: usize,
    ) -> Vec<f32> {
        let d = &self.dims;
        let (qn, kn) = (t * d.q_width(), t * d.kv_width());
        let width = d.q_width() + 2 * d.kv_width();
        let pn = self.probs_len(t);
        let kernels = Kernels::get();
        // Every value of every row is written.
        let mut grads = scratch::take(b * t * width);
        grads
            .par_chunks_mut((t * width).max(1))
            .enumerate()
            .for_each(|(r, g)| {
                let rows = (&q[r * qn..][..qn], &k[r * kn..][..kn], &v[r * kn..][..kn]);
                let out = (&y[r * qn..][..qn], &dy[r * qn..][..qn]);
                let p = &probs[r * pn..][..pn];
                self.backward_row(kernels, rows, out, p, g);
            });
        grads
    }

    /// Checks the argument shapes and returns `(batch, t)`.
    fn batch_and_len(
        &self,
        q: &[usize],
        k: &[usize],
        v: &[usize],
    ) -> candle_core::Result<(usize, usize)> {
        let d = &self.dims;
        let ok = q.len() == 3
            && k == v
            && k.len() == 3
            && q[..2] == k[..2]
            && q[2] == d.q_width()
            && k[2] == d.kv_width()
            && q[1] * self.rope.half <= self.rope.cos.len();
        if !ok {
            candle_core::bail!(
                "causal attention: q {q:?}, k {k:?}, v {v:?} do not fit {} heads, {} KV heads of \
                 {} and RoPE for {} positions",
                d.heads,
                d.kv_heads,
                d.head_dim,
                self.rope.cos.len() / self.rope.half.max(1)
            );
        }
        Ok((q[0], q[1]))
    }

    /// The query rows of positions `i0..i1` of KV head `g`'s query heads in `qr` (see
    /// [`head_major_row`]): `(i1 - i0) * group` rows, position `i0 + r / group` for row `r`.
    fn query_rows(&self, g: usize, (i0, i1): (usize, usize), t: usize) -> std::ops::Range<usize> {
        let (group, hd) = (self.dims.group(), self.dims.head_dim);
        (g * t + i0) * group * hd..(g * t + i1) * group * hd
    }

    /// The probabilities of the query rows of positions `i0..i1` of KV head `g`'s query heads
    /// against keys `0..i1` into `p` (`[(i1 - i0) * group, i1]`, row-major): the scores of the
    /// rotated queries with the rotated keys (`qr`, `kr`: one batch row by [`head_major`]) as
    /// one matrix product, then the softmax of each query's scaled scores over keys `0..=i`,
    /// zeros past it.
    fn probabilities(
        &self,
        k: &Kernels,
        (qr, kr): (&[f32], &[f32]),
        (i0, i1, g): (usize, usize, usize),
        p: &mut [f32],
    ) {
        let d = &self.dims;
        let (hd, t, group) = (d.head_dim, qr.len() / d.q_width(), d.group());
        let queries = &qr[self.query_rows(g, (i0, i1), t)];
        let keys = &kr[g * t * hd..][..i1 * hd];
        product(
            k,
            mat(queries, (i1 - i0) * group, hd),
            mat(keys, i1, hd).t(),
            p,
            false,
        );
        for (r, row) in p.chunks_exact_mut(i1).enumerate() {
            let (live, masked) = row.split_at_mut(i0 + r / group + 1);
            (k.softmax)(live, self.scale);
            masked.fill(0.0);
        }
    }

    /// One batch row: `q [t, q_width]`, `k`, `v [t, kv_width]` -> `y [t, q_width]`, one block
    /// of `QUERY_BLOCK` positions of the query heads of one KV head at a time (the heads that
    /// share keys and values share each product: taller blocks, one packing of the keys),
    /// each block's probabilities kept in `probs` ([`Self::probs_len`] values), block after
    /// block.
    fn forward_row(&self, k: &Kernels, (q, kk, v): RowArgs, y: &mut [f32], probs: &mut [f32]) {
        let d = &self.dims;
        let (hd, qw, t, group) = (d.head_dim, d.q_width(), q.len() / d.q_width(), d.group());
        let rope = Some(&self.rope);
        let (qr, kr) = (
            head_major(q, d.heads, group, hd, rope),
            head_major(kk, d.kv_heads, 1, hd, rope),
        );
        let vh = head_major(v, d.kv_heads, 1, hd, None);
        let mut out = vec![0f32; QUERY_BLOCK.min(t) * group * hd];
        let mut kept = probs;
        for g in 0..d.kv_heads {
            let values = &vh[g * t * hd..];
            for i0 in (0..t).step_by(QUERY_BLOCK) {
                let i1 = (i0 + QUERY_BLOCK).min(t);
                let rows = (i1 - i0) * group;
                let (p, rest) = std::mem::take(&mut kept).split_at_mut(rows * i1);
                kept = rest;
                let out = &mut out[..rows * hd];
                self.probabilities(k, (&qr, &kr), (i0, i1, g), p);
                product(k, mat(p, rows, i1), mat(values, i1, hd), out, false);
                for (r, o) in out.chunks_exact(hd).enumerate() {
                    let (i, h) = (i0 + r / group, g * group + r % group);
                    y[i * qw + h * hd..][..hd].copy_from_slice(o);
                }
            }
        }
        for buf in [qr, kr, vh] {
            scratch::give_back(buf);
        }
    }

    /// The gradients of one batch row, written side by side in the rows of `grads` (`[t,
    /// q_width + 2 kv_width]`: `dq`, `dk`, `dv`), from the arguments, the output `y` and its
    /// gradient `dy`.
    ///
    /// Per block of positions `i0..i1` of the query heads of KV head `g` (keys `0..i1`), with
    /// the block's `P` from the forward pass (`probs`, as [`Self::forward_row`] kept them), as
    /// matrix products: `dP = dY V^T`, `dS = scale * P * (dP - rowsum(dY * Y))`
    /// (the softmax gradient: `sum_j p_j dp_j = dy . y`), `dQ = dS K`, `dK += dS^T Q`,
    /// `dV += P^T dY`.
    fn backward_row(
        &self,
        k: &Kernels,
        (q, kk, v): RowArgs,
        (y, dy): (&[f32], &[f32]),
        probs: &[f32],
        grads: &mut [f32],
    ) {
        let d = &self.dims;
        let (hd, qw, heads, group) = (d.head_dim, d.q_width(), d.heads, d.group());
        let t = q.len() / qw;
        let rope = Some(&self.rope);
        let (qr, kr) = (
            head_major(q, heads, group, hd, rope),
            head_major(kk, d.kv_heads, 1, hd, rope),
        );
        let (vh, dyh) = (
            head_major(v, d.kv_heads, 1, hd, None),
            head_major(dy, heads, group, hd, None),
        );
        // `dqr` is written block by block; `dkr` and `dvh` sum over the blocks.
        let mut dqr = scratch::take(q.len());
        let (mut dkr, mut dvh) = (scratch::take(kk.len()), scratch::take(kk.len()));
        dkr.fill(0.0);
        dvh.fill(0.0);
        // Each block's scores are written before they are read.
        let mut ds = scratch::take(QUERY_BLOCK.min(t) * group * t);
        let mut kept = probs;
        for g in 0..d.kv_heads {
            for i0 in (0..t).step_by(QUERY_BLOCK) {
                let i1 = (i0 + QUERY_BLOCK).min(t);
                let nb = (i1 - i0) * group;
                let (p, rest) = kept.split_at(nb * i1);
                kept = rest;
                let ds = &mut ds[..nb * i1];
                let rows = self.query_rows(g, (i0, i1), t);
                let keys = g * t * hd..(g * t + i1) * hd;
                let dyb = &dyh[rows.clone()];
                product(
                    k,
                    mat(dyb, nb, hd),
                    mat(&vh[keys.clone()], i1, hd).t(),
                    ds,
                    false,
                );
                for (r, (ds, p)) in ds.chunks_exact_mut(i1).zip(p.chunks_exact(i1)).enumerate() {
                    let (i, h) = (i0 + r / group, g * group + r % group);
                    let off = dot(&dyb[r * hd..][..hd], &y[i * qw + h * hd..][..hd]);
                    for (x, &pj) in ds.iter_mut().zip(p) {
                        *x = pj * (*x - off) * self.scale;
                    }
                }
                let kb = mat(&kr[keys.clone()], i1, hd);
                product(k, mat(ds, nb, i1), kb, &mut dqr[rows.clone()], false);
                let (ds_t, p_t) = (mat(ds, nb, i1).t(), mat(p, nb, i1).t());
                let dk = &mut dkr[keys.clone()];
                product(k, ds_t, mat(&qr[rows], nb, hd), dk, true);
                product(k, p_t, mat(dyb, nb, hd), &mut dvh[keys], true);
            }
        }
        let (kw, stride) = (d.kv_width(), qw + 2 * d.kv_width());
        write_from_head_major(&dqr, heads, group, hd, rope, (grads, stride));
        let dk = &mut grads[qw..];
        write_from_head_major(&dkr, d.kv_heads, 1, hd, rope, (dk, stride));
        let dv = &mut grads[qw + kw..];
        write_from_head_major(&dvh, d.kv_heads, 1, hd, None, (dv, stride));
        for buf in [qr, kr, vh, dyh, dqr, dkr, dvh, ds] {
            scratch::give_back(buf);
        }
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "bitnet-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t) = self.batch_and_len(l1.dims(), l2.dims(), l3.dims())?;
        let (q, k, v) = (
            f32_slice(s1, l1, ATT)?,
            f32_slice(s2, l2, ATT)?,
            f32_slice(s3, l3, ATT)?,
        );
        let (y, probs) = self.forward_rows((q, k, v), b, t);
        // One forward per operation value (a fresh one per call), so this is set once.
        let _ = self.saved_probs.set(probs);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t) = self.batch_and_len(q.dims(), k.dims(), v.dims())?;
        let Some(probs) = self.saved_probs.get() else {
            candle_core::bail!("{ATT}: backward pass without a CPU forward pass");
        };
        let dy = dy.contiguous()?;
        let grads = with_cpu_f32([q, k, v, y, &dy], ATT, |[q_, k_, v_, y_, dy_]| {
            Ok(self.backward_rows((q_, k_, v_), (y_, dy_), probs, b, t))
        })?;
        let (qw, kw) = (self.dims.q_width(), self.dims.kv_width());
        let part = |from: usize, w: usize| -> Vec<f32> {
            grads
                .chunks_exact(qw + 2 * kw)
                .flat_map(|row| &row[from..from + w])
                .copied()
                .collect()
        };
        let (dq, dk, dv) = (part(0, qw), part(qw, kw), part(qw + kw, kw));
        scratch::give_back(grads);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Causal self-attention of the (un-rotated) projections `q [batch, t, heads * head_dim]` and
/// `k`, `v [batch, t, kv_heads * head_dim]`: RoPE on queries and keys, softmax of the scores
/// scaled by `1 / sqrt(head_dim)` over keys `0..=i`, query head `h` reading KV head
/// `h / (heads / kv_heads)`. Returns `[batch, t, heads * head_dim]`. CPU tensors only.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    rope: &RopeAngles,
) -> Result<Tensor> {
    let op = CausalAttention::new(heads, kv_heads, rope)?;
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelShape;
    use crate::testing::{diff, max_abs, randn, weighted_grads};
    use candle_core::{Device, Var};

    /// The fused operation against the composition of candle primitives, values and the
    /// gradients of all three arguments, with grouped heads, a head width that is not a
    /// multiple of the 8-lane dot product, and more than one batch row.
    #[test]
    fn fused_attention_matches_the_composition_with_gradients() {
        // One query block, and two of them with a short last one.
        for t in [9, QUERY_BLOCK + 6] {
            attention_matches_the_composition(t);
        }
    }

    fn attention_matches_the_composition(t: usize) {
        let shape = ModelShape {
            hidden_size: 4 * 10,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            vocab_size: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 500.0,
            tie_word_embeddings: true,
        };
        let (b, hd) = (3, shape.head_dim());
        let dev = &Device::Cpu;
        let var = |n: usize, seed: u64| {
            Var::from_tensor(
                &Tensor::from_vec(randn(b * t * n, seed, 1.5), (b, t, n), dev).unwrap(),
            )
            .unwrap()
        };
        let (q, k, v) = (var(4 * hd, 1), var(2 * hd, 2), var(2 * hd, 3));
        let rope = RopeAngles::new(shape.rope_theta, hd, t);
        let fused =
            causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 4, 2, &rope).unwrap();
        let (cos, sin) = crate::model::rope_tables(&rope, dev).unwrap();
        let mask = crate::model::causal_mask(t, dev).unwrap();
        let composed = crate::model::attention_composed(
            &shape,
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            &cos,
            &sin,
            &mask,
        )
        .unwrap();
        assert_eq!(fused.dims(), composed.dims());
        assert!(
            diff(&fused, &composed) < 1e-5,
            "{}",
            diff(&fused, &composed)
        );
        let w = Tensor::from_vec(randn(b * t * 4 * hd, 4, 1.0), (b, t, 4 * hd), dev).unwrap();
        let (ga, gb) = (weighted_grads(&fused, &w), weighted_grads(&composed, &w));
        for x in [&q, &k, &v] {
            let (a, c) = (
                ga.get(x.as_tensor()).unwrap(),
                gb.get(x.as_tensor()).unwrap(),
            );
            let scale = max_abs(c);
            assert!(scale > 0.1, "the gradient is not trivially zero");
            assert!(
                diff(a, c) <= 2e-6 * scale.max(1.0),
                "{} of {scale}",
                diff(a, c)
            );
        }
    }

    #[test]
    fn bad_head_counts_and_shapes_are_errors() {
        let dev = &Device::Cpu;
        let rope = RopeAngles::new(10000.0, 4, 3);
        let x = |n: usize| Tensor::zeros((1, 3, n), candle_core::DType::F32, dev).unwrap();
        assert!(causal_attention(&x(12), &x(8), &x(8), 3, 2, &rope).is_err());
        assert!(causal_attention(&x(12), &x(8), &x(4), 3, 1, &rope).is_err());
        let long = Tensor::zeros((1, 4, 12), candle_core::DType::F32, dev).unwrap();
        assert!(causal_attention(&long, &x(4), &x(4), 3, 1, &rope).is_err());
    }
}
