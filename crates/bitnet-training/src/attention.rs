//! Causal self-attention with rotate-half RoPE and grouped KV heads as one CPU operation, with
//! its backward pass.
//!
//! Composed from candle primitives, attention materialises `[batch, heads, t, t]` scores and
//! probabilities (and their gradients, each zero-filled and added once by candle's backward
//! pass), copies heads in and out of `[batch, heads, t, head_dim]`, repeats the KV heads, and
//! multiplies the masked upper triangle too. This operation reads the projections where they
//! lie (`[batch, t, heads * head_dim]`), works per batch row on one thread each, skips the masked
//! keys, and keeps only each query's softmax maximum and normaliser for the backward pass, which
//! rebuilds the same probabilities from them. It adds in a different order than the matrix
//! products of the composition, so the two agree to f32 rounding, not bit for bit (tested); it
//! is deterministic whatever the thread count (one task per batch row).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::exp::exp_nonpositive;
use crate::Result;

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

/// `y += a * x`.
#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// `out[j] = sum_d x[d] * mt[d * stride + j]` for `j < out.len()`: the products of `x` with
/// the first `out.len()` columns of a transposed matrix, four rows of it per pass so that the
/// loop over `j` (the one the compiler vectorizes) reads and writes `out` a quarter as often.
fn transposed_products(x: &[f32], mt: &[f32], stride: usize, out: &mut [f32]) {
    let n = out.len();
    out.fill(0.0);
    let rows = |d: usize| &mt[d * stride..d * stride + n];
    let quads = x.len() / 4 * 4;
    for d in (0..quads).step_by(4) {
        let (x0, x1, x2, x3) = (x[d], x[d + 1], x[d + 2], x[d + 3]);
        let (r0, r1, r2, r3) = (rows(d), rows(d + 1), rows(d + 2), rows(d + 3));
        for j in 0..n {
            out[j] += (x0 * r0[j] + x1 * r1[j]) + (x2 * r2[j] + x3 * r3[j]);
        }
    }
    for (d, &xd) in x.iter().enumerate().skip(quads) {
        for (o, &m) in out.iter_mut().zip(rows(d)) {
            *o += xd * m;
        }
    }
}

/// Rotated keys of KV head `g` of one batch row: row-major `[t, hd]` into `kr` (where given)
/// and transposed `[hd, t]` into `kt`.
fn rotated_keys(
    k: &[f32],
    g: usize,
    dims: &Dims,
    rope: &RopeAngles,
    kr: &mut [f32],
    kt: &mut [f32],
) {
    let (hd, kw) = (dims.head_dim, dims.kv_width());
    let t = kt.len() / hd;
    for j in 0..t {
        let row = &mut kr[j * hd..(j + 1) * hd];
        rotate(&k[j * kw + g * hd..][..hd], rope.at(j), row);
        for (d, &x) in row.iter().enumerate() {
            kt[d * t + j] = x;
        }
    }
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

    /// Query `qr`'s scaled scores against the first `s.len()` keys (`kt`: `[hd, t]`), in `s`.
    fn scores(&self, qr: &[f32], kt: &[f32], t: usize, s: &mut [f32]) {
        transposed_products(qr, kt, t, s);
        for sj in s.iter_mut() {
            *sj *= self.scale;
        }
    }

    /// One batch row: `q [t, q_width]`, `k`, `v [t, kv_width]` -> `y [t, q_width]` and the
    /// softmax statistics `[heads, t]`.
    fn forward_row(&self, q: &[f32], k: &[f32], v: &[f32], y: &mut [f32], stats: &mut [[f32; 2]]) {
        let d = &self.dims;
        let (hd, qw, kw) = (d.head_dim, d.q_width(), d.kv_width());
        let t = q.len() / qw;
        let (mut kr, mut kt) = (vec![0f32; t * hd], vec![0f32; t * hd]);
        let mut qr = vec![0f32; hd];
        let mut p = vec![0f32; t];
        for g in 0..d.kv_heads {
            rotated_keys(k, g, d, &self.rope, &mut kr, &mut kt);
            for h in g * d.group()..(g + 1) * d.group() {
                for i in 0..t {
                    rotate(&q[i * qw + h * hd..][..hd], self.rope.at(i), &mut qr);
                    let s = &mut p[..=i];
                    self.scores(&qr, &kt, t, s);
                    let m = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    for sj in s.iter_mut() {
                        *sj = exp_nonpositive(*sj - m);
                    }
                    let inv = 1.0 / s.iter().sum::<f32>();
                    let yi = &mut y[i * qw + h * hd..][..hd];
                    yi.fill(0.0);
                    for (j, &e) in s.iter().enumerate() {
                        axpy(e * inv, &v[j * kw + g * hd..][..hd], yi);
                    }
                    stats[h * t + i] = [m, inv];
                }
            }
        }
    }

    /// The gradients of one batch row: `dq`, `dk`, `dv` (zeroed, the arguments' shapes) from the
    /// arguments, the output `y`, its gradient `dy` and the row's statistics.
    fn backward_row(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        (y, dy): (&[f32], &[f32]),
        stats: &[[f32; 2]],
        (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let d = &self.dims;
        let (hd, qw, kw) = (d.head_dim, d.q_width(), d.kv_width());
        let t = q.len() / qw;
        let (mut kr, mut kt) = (vec![0f32; t * hd], vec![0f32; t * hd]);
        let (mut dkr, mut vt) = (vec![0f32; t * hd], vec![0f32; t * hd]);
        let (mut qr, mut dqr) = (vec![0f32; hd], vec![0f32; hd]);
        let (mut p, mut ds) = (vec![0f32; t], vec![0f32; t]);
        for g in 0..d.kv_heads {
            rotated_keys(k, g, d, &self.rope, &mut kr, &mut kt);
            for j in 0..t {
                for (c, &x) in v[j * kw + g * hd..][..hd].iter().enumerate() {
                    vt[c * t + j] = x;
                }
            }
            dkr.fill(0.0);
            for h in g * d.group()..(g + 1) * d.group() {
                for i in 0..t {
                    let cs = self.rope.at(i);
                    rotate(&q[i * qw + h * hd..][..hd], cs, &mut qr);
                    // The forward pass's probabilities, rebuilt with the same operations.
                    let [m, inv] = stats[h * t + i];
                    let (p, ds) = (&mut p[..=i], &mut ds[..=i]);
                    self.scores(&qr, &kt, t, p);
                    for pj in p.iter_mut() {
                        *pj = exp_nonpositive(*pj - m) * inv;
                    }
                    let at = i * qw + h * hd;
                    let dyi = &dy[at..at + hd];
                    // sum_j p_j * (dy_i . v_j) = dy_i . y_i: the softmax gradient's offset.
                    let offset = dot(dyi, &y[at..at + hd]);
                    transposed_products(dyi, &vt, t, ds);
                    for (dsj, &pj) in ds.iter_mut().zip(p.iter()) {
                        *dsj = pj * (*dsj - offset) * self.scale;
                    }
                    dqr.fill(0.0);
                    for (j, (&pj, &dsj)) in p.iter().zip(ds.iter()).enumerate() {
                        let vj = j * kw + g * hd;
                        axpy(pj, dyi, &mut dv[vj..vj + hd]);
                        axpy(dsj, &kr[j * hd..(j + 1) * hd], &mut dqr);
                        axpy(dsj, &qr, &mut dkr[j * hd..(j + 1) * hd]);
                    }
                    rotate_back_add(&dqr, cs, &mut dq[at..at + hd]);
                }
            }
            for j in 0..t {
                let kj = j * kw + g * hd;
                rotate_back_add(
                    &dkr[j * hd..(j + 1) * hd],
                    self.rope.at(j),
                    &mut dk[kj..kj + hd],
                );
            }
        }
    }
}

/// Contiguous f32 data of a CPU argument.
fn f32_data<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("causal attention wants contiguous f32 tensors"),
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
        let (q, k, v) = (f32_data(s1, l1)?, f32_data(s2, l2)?, f32_data(s3, l3)?);
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
            .for_each(|(r, (y, st))| {
                let (q, k, v) = (&q[r * qn..][..qn], &k[r * kn..][..kn], &v[r * kn..][..kn]);
                self.forward_row(q, k, v, y, st);
            });
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
            *slot = f32_data(s, l)?;
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
            .for_each(|(r, (dq, (dk, dv)))| {
                let rows = (
                    &q_[r * qn..][..qn],
                    &k_[r * kn..][..kn],
                    &v_[r * kn..][..kn],
                );
                let out = (&y_[r * qn..][..qn], &dy_[r * qn..][..qn]);
                self.backward_row(rows, out, &stats[r * sn..][..sn], (dq, dk, dv));
            });
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
    if kv_heads == 0 || heads % kv_heads != 0 || head_dim == 0 {
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
        let (b, t, hd) = (3, 9, shape.head_dim());
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
