//! Causal self-attention with rotate-half RoPE and grouped KV heads as one CPU operation, with
//! its backward pass.
//!
//! Composed from candle primitives, attention materialises `[batch, heads, t, t]` scores and
//! probabilities (and their gradients, each zero-filled and added once by candle's backward
//! pass), copies heads in and out of `[batch, heads, t, head_dim]`, repeats the KV heads, and
//! multiplies the masked upper triangle too. This operation reads the projections where they
//! lie (`[batch, t, heads * head_dim]`) and works per batch row, one task each: it regroups the
//! row's heads so that each KV head's query heads are one matrix, then takes blocks of 64 query
//! positions (`QUERY_BLOCK`) and multiplies them with the keys up to the block's end only
//! (candle's matrix product, batched over KV heads), so the masked keys past a block are never
//! touched and the largest temporary is `heads x block x t`. It keeps each query's softmax
//! maximum and normaliser for the backward pass, which rebuilds the same probabilities from them
//! block by block. Its sums run in another order than the composition's, so the two agree to
//! f32 rounding, not bit for bit (tested); it is deterministic whatever the thread count.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::fused::f32_slice;
use crate::Result;
use bitnet_quant::kernels::scalar::exp_nonpositive;

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

/// The gradient of [`rotate`] (its transpose), added to `out`.
fn rotate_back_add(g: &[f32], (c, s): (&[f32], &[f32]), out: &mut [f32]) {
    let half = c.len();
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (g[i], g[half + i]);
        o1[i] += a * c[i] + b * s[i];
        o2[i] += b * c[i] - a * s[i];
    }
}

/// `sum a[k] * b[k]` with eight running sums, so that the compiler keeps them in one vector.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// The operation's name in error messages.
const ATT: &str = "causal attention";

/// Query positions per block: the scores of a block against the keys up to its end are one
/// matrix product, so the masked keys past the block are never multiplied.
const QUERY_BLOCK: usize = 64;

/// The heads of one batch row (`x [t, heads * hd]`) regrouped for the matrix products:
/// `[kv_heads, t, group, hd]`, so the rows of KV group `g` for query positions `i0..i1` are
/// the consecutive rows `i0 * group..i1 * group`; rotated by RoPE when `rope` is given.
fn gather(x: &[f32], dims: &Dims, heads: usize, rope: Option<&RopeAngles>) -> Vec<f32> {
    let hd = dims.head_dim;
    let (t, group) = (x.len() / (heads * hd), heads / dims.kv_heads);
    let mut out = vec![0f32; x.len()];
    for (row, dst) in out.chunks_exact_mut(hd).enumerate() {
        // row = (g * t + i) * group + r, head h = g * group + r.
        let (r, gi) = (row % group, row / group);
        let (g, i) = (gi / t, gi % t);
        let src = &x[(i * heads + g * group + r) * hd..][..hd];
        match rope {
            Some(rope) => rotate(src, rope.at(i), dst),
            None => dst.copy_from_slice(src),
        }
    }
    out
}

/// The inverse of [`gather`] (with the transpose of the rotation), added to `out`.
fn scatter_add(x: &[f32], dims: &Dims, heads: usize, rope: Option<&RopeAngles>, out: &mut [f32]) {
    let hd = dims.head_dim;
    let (t, group) = (x.len() / (heads * hd), heads / dims.kv_heads);
    for (row, src) in x.chunks_exact(hd).enumerate() {
        let (r, gi) = (row % group, row / group);
        let (g, i) = (gi / t, gi % t);
        let dst = &mut out[(i * heads + g * group + r) * hd..][..hd];
        match rope {
            Some(rope) => rotate_back_add(src, rope.at(i), dst),
            None => dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v),
        }
    }
}

/// Copies a block's rows, `[kv_heads, n]`, into the gathered layout `dst` (`[kv_heads, len]`)
/// at offset `at` within each KV head.
fn put_block(block: &[f32], kv_heads: usize, at: usize, dst: &mut [f32]) {
    let (n, len) = (block.len() / kv_heads, dst.len() / kv_heads);
    for (src, head) in block.chunks_exact(n).zip(dst.chunks_exact_mut(len)) {
        head[at..at + n].copy_from_slice(src);
    }
}

/// A CPU tensor of `dims` holding `data`.
fn tensor(data: Vec<f32>, dims: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, dims, &candle_core::Device::Cpu)
}

/// The values of a small per-row CPU tensor.
fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
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

/// A row's softmax statistics (`[max, 1 / sum]` per query): the forward pass writes them, the
/// backward pass reads them back.
enum Stats<'a> {
    Write(&'a mut [[f32; 2]]),
    Read(&'a [[f32; 2]]),
}

/// One batch row's `q`, `k`, `v`.
type RowArgs<'a> = (&'a [f32], &'a [f32], &'a [f32]);

struct CausalAttention {
    dims: Dims,
    scale: f32,
    rope: RopeAngles,
    /// Per `(batch, head, query)`: the maximum of the scaled scores and `1 / sum(exp)`, written
    /// by the forward pass for the backward pass.
    stats: Mutex<Vec<[f32; 2]>>,
}

impl CausalAttention {
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

    /// The rotated queries `[kv_heads, t * group, hd]` (see [`gather`]), the rotated keys and
    /// the values `[kv_heads, t, hd]` of one batch row.
    fn operands(&self, (q, k, v): RowArgs) -> candle_core::Result<[Tensor; 3]> {
        let d = &self.dims;
        let t = q.len() / d.q_width();
        let (kvh, hd) = (d.kv_heads, d.head_dim);
        Ok([
            tensor(
                gather(q, d, d.heads, Some(&self.rope)),
                &[kvh, t * d.group(), hd],
            )?,
            tensor(gather(k, d, kvh, Some(&self.rope)), &[kvh, t, hd])?,
            tensor(gather(v, d, kvh, None), &[kvh, t, hd])?,
        ])
    }

    /// The probabilities of query positions `i0..i1` against keys `0..i1`, rows `(i, r)` of
    /// `[kv_heads, (i1 - i0) * group, i1]`: the scaled scores, then the softmax over keys `0..=i`
    /// with the statistics (`[kv_heads, t * group]`) it writes or reads (`stats`).
    fn probabilities(
        &self,
        qr: &Tensor,
        kr: &Tensor,
        (i0, i1): (usize, usize),
        mut stats: Stats,
    ) -> candle_core::Result<(Tensor, Tensor, Vec<f32>)> {
        let (group, t) = (self.dims.group(), kr.dim(1)?);
        let qb = qr.narrow(1, i0 * group, (i1 - i0) * group)?;
        let kb = kr.narrow(1, 0, i1)?;
        let mut p = values(&qb.matmul(&kb.t()?)?)?;
        for (n, row) in p.chunks_exact_mut(i1).enumerate() {
            // n = (g * (i1 - i0) + (i - i0)) * group + r.
            let g = n / ((i1 - i0) * group);
            let rest = n % ((i1 - i0) * group);
            let i = i0 + rest / group;
            let at = g * t * group + i * group + rest % group;
            let (seen, masked) = row.split_at_mut(i + 1);
            seen.iter_mut().for_each(|x| *x *= self.scale);
            let [_, inv] = match &mut stats {
                Stats::Write(st) => {
                    let m = seen.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    seen.iter_mut().for_each(|x| *x = exp_nonpositive(*x - m));
                    st[at] = [m, 1.0 / seen.iter().sum::<f32>()];
                    st[at]
                }
                Stats::Read(st) => {
                    seen.iter_mut()
                        .for_each(|x| *x = exp_nonpositive(*x - st[at][0]));
                    st[at]
                }
            };
            seen.iter_mut().for_each(|x| *x *= inv);
            masked.fill(0.0);
        }
        Ok((qb, kb, p))
    }

    /// One batch row: `q [t, q_width]`, `k`, `v [t, kv_width]` -> `y [t, q_width]` and the
    /// softmax statistics `[kv_heads, t * group]`.
    fn forward_row(
        &self,
        args: RowArgs,
        y: &mut [f32],
        stats: &mut [[f32; 2]],
    ) -> candle_core::Result<()> {
        let d = &self.dims;
        let t = args.0.len() / d.q_width();
        let [qr, kr, vg] = self.operands(args)?;
        let mut yg = vec![0f32; args.0.len()];
        for i0 in (0..t).step_by(QUERY_BLOCK) {
            let i1 = (i0 + QUERY_BLOCK).min(t);
            let (_, _, p) = self.probabilities(&qr, &kr, (i0, i1), Stats::Write(stats))?;
            let rows = (i1 - i0) * d.group();
            let p = tensor(p, &[d.kv_heads, rows, i1])?;
            let yb = values(&p.matmul(&vg.narrow(1, 0, i1)?)?)?;
            put_block(&yb, d.kv_heads, i0 * d.group() * d.head_dim, &mut yg);
        }
        y.fill(0.0);
        scatter_add(&yg, d, d.heads, None, y);
        Ok(())
    }

    /// The gradients of one batch row: `dq`, `dk`, `dv` (zeroed, the arguments' shapes) from the
    /// arguments, the output `y`, its gradient `dy` and the row's statistics.
    fn backward_row(
        &self,
        args: RowArgs,
        (y, dy): (&[f32], &[f32]),
        stats: &[[f32; 2]],
        (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    ) -> candle_core::Result<()> {
        let d = &self.dims;
        let (hd, kvh, group) = (d.head_dim, d.kv_heads, d.group());
        let t = args.0.len() / d.q_width();
        let [qr, kr, vg] = self.operands(args)?;
        let dyg = gather(dy, d, d.heads, None);
        // sum_j p_j (dy . v_j) = dy . y: the softmax gradient's offset of each row.
        let offsets: Vec<f32> = dyg
            .chunks_exact(hd)
            .zip(gather(y, d, d.heads, None).chunks_exact(hd))
            .map(|(a, b)| dot(a, b))
            .collect();
        let dyt = tensor(dyg, &[kvh, t * group, hd])?;
        let (mut dqg, mut dkg, mut dvg) = (
            vec![0f32; dq.len()],
            vec![0f32; dk.len()],
            vec![0f32; dv.len()],
        );
        for i0 in (0..t).step_by(QUERY_BLOCK) {
            let i1 = (i0 + QUERY_BLOCK).min(t);
            let rows = (i1 - i0) * group;
            let (qb, kb, p) = self.probabilities(&qr, &kr, (i0, i1), Stats::Read(stats))?;
            let dyb = dyt.narrow(1, i0 * group, rows)?;
            let vb = vg.narrow(1, 0, i1)?;
            let mut ds = values(&dyb.matmul(&vb.t()?)?)?;
            for (n, (dsr, pr)) in ds.chunks_exact_mut(i1).zip(p.chunks_exact(i1)).enumerate() {
                let off = offsets[(n / rows) * t * group + i0 * group + n % rows];
                for (x, &pj) in dsr.iter_mut().zip(pr) {
                    *x = pj * (*x - off) * self.scale;
                }
            }
            let p = tensor(p, &[kvh, rows, i1])?;
            let ds = tensor(ds, &[kvh, rows, i1])?;
            let dv_b = values(&p.t()?.matmul(&dyb)?)?;
            let dk_b = values(&ds.t()?.matmul(&qb)?)?;
            let dq_b = values(&ds.matmul(&kb)?)?;
            for g in 0..kvh {
                for (acc, src) in [(&mut dvg, &dv_b), (&mut dkg, &dk_b)] {
                    let dst = &mut acc[g * t * hd..][..i1 * hd];
                    let src = &src[g * i1 * hd..][..i1 * hd];
                    dst.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
                }
            }
            put_block(&dq_b, kvh, i0 * group * hd, &mut dqg);
        }
        scatter_add(&dqg, d, d.heads, Some(&self.rope), dq);
        scatter_add(&dkg, d, kvh, Some(&self.rope), dk);
        scatter_add(&dvg, d, kvh, None, dv);
        Ok(())
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
        let (qn, kn, sn) = (
            t * self.dims.q_width(),
            t * self.dims.kv_width(),
            self.dims.heads * t,
        );
        let mut y = vec![0f32; b * qn];
        let mut stats = vec![[0f32; 2]; b * sn];
        y.par_chunks_mut(qn.max(1))
            .zip(stats.par_chunks_mut(sn.max(1)))
            .enumerate()
            .try_for_each(|(r, (y, st))| {
                let rows = (&q[r * qn..][..qn], &k[r * kn..][..kn], &v[r * kn..][..kn]);
                self.forward_row(rows, y, st)
            })?;
        *self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention stats lock".into()))? = stats;
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
        let dy = dy.contiguous()?;
        let guards = [q, k, v, y, &dy].map(|x| x.storage_and_layout());
        let mut data = [&[][..]; 5];
        for (slot, (s, l)) in data.iter_mut().zip(&guards) {
            let Storage::Cpu(s) = &**s else {
                candle_core::bail!("causal attention runs on the CPU only");
            };
            *slot = f32_slice(s, l, ATT)?;
        }
        let [q_, k_, v_, y_, dy_] = data;
        let stats = self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention stats lock".into()))?;
        let (qn, kn, sn) = (
            t * self.dims.q_width(),
            t * self.dims.kv_width(),
            self.dims.heads * t,
        );
        if stats.len() != b * sn {
            candle_core::bail!("causal attention: backward pass without its forward pass");
        }
        let mut dq = vec![0f32; b * qn];
        let mut dk = vec![0f32; b * kn];
        let mut dv = vec![0f32; b * kn];
        dq.par_chunks_mut(qn.max(1))
            .zip(
                dk.par_chunks_mut(kn.max(1))
                    .zip(dv.par_chunks_mut(kn.max(1))),
            )
            .enumerate()
            .try_for_each(|(r, (dq, (dk, dv)))| {
                let rows = (
                    &q_[r * qn..][..qn],
                    &k_[r * kn..][..kn],
                    &v_[r * kn..][..kn],
                );
                let out = (&y_[r * qn..][..qn], &dy_[r * qn..][..qn]);
                self.backward_row(rows, out, &stats[r * sn..][..sn], (dq, dk, dv))
            })?;
        drop(guards);
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
    let head_dim = 2 * rope.half;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || head_dim == 0 {
        return Err(candle_core::Error::Msg(format!(
            "causal attention: {heads} heads over {kv_heads} KV heads of {head_dim}"
        ))
        .into());
    }
    let op = CausalAttention {
        dims: Dims {
            heads,
            kv_heads,
            head_dim,
        },
        scale: (1.0 / (head_dim as f64).sqrt()) as f32,
        rope: rope.clone(),
        stats: Mutex::new(Vec::new()),
    };
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
