//! Fused CPU operations for the hot elementwise work of training, each equal (bit for bit in
//! the forward pass) to its composition of candle primitives, which other devices use.
//!
//! candle runs every primitive as its own pass over memory with a fresh buffer; on a small
//! model these passes, not the matrix products, dominate a training step.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::scratch;
use crate::Result;
use bitnet_quant::kernels::Kernels;
use bitnet_quant::sgemm::{sgemm, MatRef, RightOperand, ScaledCodes};

/// Per-token int8 quantize-dequantize (see [`crate::bitlinear::quantize_activations`]) with the
/// straight-through gradient, in one pass.
struct ActQuantSte;

impl CustomOp1 for ActQuantSte {
    fn name(&self) -> &'static str {
        "bitnet-act-quant-ste"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "activation quantization")?;
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = zeroed(x.len());
        for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let amax = row.iter().fold(0f32, |m, &v| m.max(v.abs()));
            let s = (1.0 / amax.max(crate::bitlinear::QUANT_EPS as f32)) * 127.0;
            for (oi, &xi) in o.iter_mut().zip(row) {
                *oi = bitnet_quant::round_half_even_small(xi * s).clamp(-128.0, 127.0) / s;
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

/// `q(x)` in the forward pass, identity gradient: the fused form of
/// `x + (quantize_activations(x) - x).detach()`.
pub fn act_quant_ste(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(ActQuantSte)?)
}

/// A zeroed buffer of `n` values for an operation's output, zeroed by the thread pool: these
/// operations are called from the one thread that runs candle's graph, and a serial zero-fill
/// of each activation-sized output would leave the other cores waiting.
pub(crate) fn zeroed<T: Copy + Default + Send + Sync>(n: usize) -> Vec<T> {
    filled(n, T::default())
}

/// `n` copies of `value`, written by the thread pool (see [`zeroed`]).
pub(crate) fn filled<T: Copy + Send + Sync>(n: usize, value: T) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(value, n));
    v
}

/// Rows per parallel task: fixed, so that reductions over rows (the norm-gain gradient) add
/// the same partial sums in the same order whatever the thread count.
const ROWS_PER_TASK: usize = 64;

/// Contiguous f32 data of a CPU tensor argument.
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{what} wants f32");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what} wants contiguous tensors");
    };
    Ok(&data[a..b])
}

/// Runs `f` on the contiguous f32 data of CPU tensors, for the parts of a fused operation
/// that work on tensors (a backward pass, an optimizer step) rather than on the storages candle
/// hands to `cpu_fwd`. Errors name `what`.
pub(crate) fn with_cpu_f32<const N: usize, R>(
    tensors: [&Tensor; N],
    what: &str,
    f: impl FnOnce([&[f32]; N]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards = tensors.map(|t| t.storage_and_layout());
    let mut data = [&[][..]; N];
    for (slot, (s, l)) in data.iter_mut().zip(&guards) {
        let candle_core::Storage::Cpu(s) = &**s else {
            candle_core::bail!("{what} runs on the CPU only");
        };
        *slot = f32_slice(s, l, what)?;
    }
    f(data)
}

/// Values per parallel task of [`sum_f64`].
const SUM_F64_CHUNK: usize = 1 << 15;

/// `sum f(x_i)` in f64 over fixed chunks of `x` summed on the thread pool (four running sums
/// each), the chunks' sums then added in order: the same bits whatever the thread count. For
/// the per-step reductions over all weights or gradients, which candle's CPU backend sums as
/// one f32 chain on the graph's thread while the pool waits.
pub(crate) fn sum_f64(x: &[f32], f: impl Fn(f32) -> f64 + Sync) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(SUM_F64_CHUNK)
        .map(|c| {
            let mut acc = [0f64; 4];
            let mut quads = c.chunks_exact(4);
            for q in &mut quads {
                for (a, &v) in acc.iter_mut().zip(q) {
                    *a += f(v);
                }
            }
            let tail: f64 = quads.remainder().iter().map(|&v| f(v)).sum();
            ((acc[0] + acc[2]) + (acc[1] + acc[3])) + tail
        })
        .collect();
    partials.iter().sum()
}

/// `sum f(cols[..][i])` over `i < n` (`n` the shortest column's length) in eight running sums
/// (term `i` of the whole blocks of eight into sum `i % 8`), added pairwise, then the tail's
/// sum: one vector of independent additions instead of one long chain.
#[inline(always)]
pub(crate) fn sum8<const K: usize>(cols: [&[f32]; K], f: impl Fn([f32; K]) -> f32) -> f32 {
    let n = cols.iter().map(|c| c.len()).min().unwrap_or(0);
    let mut acc = [0f32; 8];
    // Whole chunks of eight, so the lane loop indexes fixed-size slices: no bounds check in
    // it, and the compiler keeps the eight sums in vector registers (an index closure over
    // the slices had kept every term scalar).
    for c in 0..n / 8 {
        let chunk: [&[f32]; K] = std::array::from_fn(|k| &cols[k][c * 8..c * 8 + 8]);
        for (j, a) in acc.iter_mut().enumerate() {
            *a += f(std::array::from_fn(|k| chunk[k][j]));
        }
    }
    let tail: f32 = (n / 8 * 8..n)
        .map(|i| f(std::array::from_fn(|k| cols[k][i])))
        .sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `1 / sqrt(mean(x^2) + eps)` of one row, as the inference engine computes it (the sum of
/// squares in f64, `bitnet_quant::kernels::scalar::sum_squares`, rounded once): the trained
/// model's norms are the exported model's, and a BitLinear input's RMSNorm and int8 codes
/// can come from the kernel sets' fused `rms_norm_quantize`.
#[inline]
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    bitnet_quant::kernels::inv_rms(
        bitnet_quant::kernels::scalar::sum_squares(row),
        row.len(),
        eps,
    )
}

/// RMSNorm `x * inv_rms(x) * w` of each `w.len()`-wide row of `x`.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut out = scratch::take(x.len());
    out.par_chunks_mut(n * ROWS_PER_TASK)
        .zip(x.par_chunks(n * ROWS_PER_TASK))
        .for_each(|(o, x)| {
            for (o, row) in o.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
                rms_norm_row(row, w, eps, o);
            }
        });
    out
}

/// One row of [`rms_norm_rows`] into `out`.
#[inline]
pub(crate) fn rms_norm_row(row: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let r = inv_rms(row, eps);
    for ((oi, &xi), &wi) in out.iter_mut().zip(row).zip(w) {
        *oi = xi * r * wi;
    }
}

/// The input gradient of [`rms_norm_rows`] for output gradient `g`:
/// `dx = r * (g * w) - x * r^3 * mean(g * w * x)` per row.
pub(crate) fn rms_norm_grad_x(x: &[f32], w: &[f32], g: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut out = scratch::take(x.len());
    out.par_chunks_mut(n * ROWS_PER_TASK)
        .zip(
            x.par_chunks(n * ROWS_PER_TASK)
                .zip(g.par_chunks(n * ROWS_PER_TASK)),
        )
        .for_each(|(o, (x, g))| {
            for ((o, row), gr) in o
                .chunks_exact_mut(n)
                .zip(x.chunks_exact(n))
                .zip(g.chunks_exact(n))
            {
                norm_row_grad_x(row, w, gr, inv_rms(row, eps), o);
            }
        });
    out
}

/// One row of [`rms_norm_grad_x`] with its `r = inv_rms(row)`.
#[inline]
fn norm_row_grad_x(row: &[f32], w: &[f32], g: &[f32], r: f32, out: &mut [f32]) {
    let n = w.len();
    let dot = sum8([&g[..n], &w[..n], &row[..n]], |[g, w, x]| g * w * x);
    let c = r * r * r * dot / n as f32;
    for (((oi, &gi), &wi), &xi) in out.iter_mut().zip(g).zip(w).zip(row) {
        *oi = r * gi * wi - xi * c;
    }
}

/// The gain's gradient of [`rms_norm_rows`] over rows of `n`: `dw = sum over rows of g * x * r`
/// (per-task partial sums added in task order, so the same bits for any thread count).
pub(crate) fn rms_norm_grad_w(x: &[f32], g: &[f32], n: usize, eps: f32) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = x
        .par_chunks(n * ROWS_PER_TASK)
        .zip(g.par_chunks(n * ROWS_PER_TASK))
        .map(|(x, g)| {
            let mut acc = vec![0f32; n];
            for (row, gr) in x.chunks_exact(n).zip(g.chunks_exact(n)) {
                norm_row_grad_w(row, gr, inv_rms(row, eps), &mut acc);
            }
            acc
        })
        .collect();
    add_partials(&partials, n)
}

/// One row's term of [`rms_norm_grad_w`] added to `acc`.
#[inline]
fn norm_row_grad_w(row: &[f32], g: &[f32], r: f32, acc: &mut [f32]) {
    for ((a, &xi), &gi) in acc.iter_mut().zip(row).zip(g) {
        *a += gi * xi * r;
    }
}

/// The per-task partial sums of a gain's gradient, added in task order.
fn add_partials(partials: &[Vec<f32>], n: usize) -> Vec<f32> {
    let mut dw = vec![0f32; n];
    for p in partials {
        for (d, v) in dw.iter_mut().zip(p) {
            *d += v;
        }
    }
    dw
}

/// [`rms_norm_grad_x`] and [`rms_norm_grad_w`] in one pass over the rows (one `inv_rms` per
/// row), with the same bits as the two.
pub(crate) fn rms_norm_grads(x: &[f32], w: &[f32], g: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    let mut dx = scratch::take(x.len());
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(n * ROWS_PER_TASK)
        .zip(
            x.par_chunks(n * ROWS_PER_TASK)
                .zip(g.par_chunks(n * ROWS_PER_TASK)),
        )
        .map(|(o, (x, g))| {
            let mut acc = vec![0f32; n];
            for ((o, row), gr) in o
                .chunks_exact_mut(n)
                .zip(x.chunks_exact(n))
                .zip(g.chunks_exact(n))
            {
                let r = inv_rms(row, eps);
                norm_row_grad_x(row, w, gr, r, o);
                norm_row_grad_w(row, gr, r, &mut acc);
            }
            acc
        })
        .collect();
    (dx, add_partials(&partials, n))
}

/// RMSNorm `y = x * inv_rms(x) * w` over the last dimension.
struct RmsNorm {
    eps: f32,
}

impl candle_core::CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "bitnet-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "rms norm")?;
        let w = f32_slice(ws, wl, "rms norm")?;
        let n = w.len();
        if xl.dims().last() != Some(&n) {
            candle_core::bail!("rms norm: gain of {n} for rows of {:?}", xl.dims());
        }
        Ok((
            CpuStorage::F32(rms_norm_rows(x, w, self.eps)),
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &RmsNormGradX { eps: self.eps })?;
        let dw = x.apply_op2_no_bwd(&grad, &RmsNormGradW { eps: self.eps })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `dx = r * (g * w) - x * r^3 * mean(g * w * x)` per row.
struct RmsNormGradX {
    eps: f32,
}

impl candle_core::CustomOp3 for RmsNormGradX {
    fn name(&self) -> &'static str {
        "bitnet-rms-norm-grad-x"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "rms norm grad")?;
        let w = f32_slice(ws, wl, "rms norm grad")?;
        let g = f32_slice(gs, gl, "rms norm grad")?;
        Ok((
            CpuStorage::F32(rms_norm_grad_x(x, w, g, self.eps)),
            xl.shape().clone(),
        ))
    }
}

/// `dw = sum over rows of g * x * r`.
struct RmsNormGradW {
    eps: f32,
}

impl candle_core::CustomOp2 for RmsNormGradW {
    fn name(&self) -> &'static str {
        "bitnet-rms-norm-grad-w"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "rms norm grad")?;
        let g = f32_slice(gs, gl, "rms norm grad")?;
        let n = *xl.dims().last().unwrap_or(&1);
        Ok((
            CpuStorage::F32(rms_norm_grad_w(x, g, n, self.eps)),
            Shape::from(n),
        ))
    }
}

/// RMSNorm over the last dimension with gain `w`, fused (BitLinear layers quantize their
/// inputs themselves, see [`crate::fused_linear`]).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(w, RmsNorm { eps })?)
}

/// Mean cross-entropy of rows of logits `[n, vocab]` against target ids `[n]`, fused: one pass
/// per row, no `[n, vocab]` intermediates; its gradient is `(softmax - onehot) / n`, from the
/// rows' logsumexp that the forward pass keeps (one value per row).
struct CrossEntropy {
    lse: OnceLock<Arc<Vec<f32>>>,
}

/// The logsumexp of a row of logits, the exponentials summed by the kernel set's `exp_sum`.
#[inline]
fn row_lse(kernels: &Kernels, row: &[f32]) -> f32 {
    // Eight running maxima: the maximum is the same in any order, and lanes vectorise.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let blocks = row.chunks_exact(8);
    let m = blocks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in blocks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let m = lanes.iter().fold(m, |m, &l| m.max(l));
    m + (kernels.exp_sum)(row, m).ln()
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let CpuStorage::U32(data) = s else {
        candle_core::bail!("cross-entropy wants u32 targets");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cross-entropy wants contiguous targets");
    };
    Ok(&data[a..b])
}

/// The mean cross-entropy of `n` rows of `v` logits against `targets`, with each row's
/// logsumexp (what the gradient needs). Errors on a target count or id that does not fit.
fn cross_entropy_rows(
    logits: &[f32],
    targets: &[u32],
    (n, v): (usize, usize),
) -> candle_core::Result<(f32, Vec<f32>)> {
    if targets.len() != n {
        candle_core::bail!("cross-entropy: {n} rows but {} targets", targets.len());
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross-entropy: target {bad} outside a vocabulary of {v}");
    }
    let kernels = Kernels::get();
    let mut lse = vec![0f32; n];
    let partial: Vec<f32> = logits
        .par_chunks(v * ROWS_PER_TASK)
        .zip(targets.par_chunks(ROWS_PER_TASK))
        .zip(lse.par_chunks_mut(ROWS_PER_TASK))
        .map(|((rows, t), lse)| {
            rows.chunks_exact(v)
                .zip(t)
                .zip(lse)
                .map(|((row, &t), l)| {
                    *l = row_lse(kernels, row);
                    *l - row[t as usize]
                })
                .sum::<f32>()
        })
        .collect();
    let total: f32 = partial.iter().sum();
    Ok((total / n as f32, lse))
}

/// `scale * (softmax(row) - onehot(target)) / n` for each of the `n` rows of `v` logits, from
/// the rows' logsumexp `lse`.
fn cross_entropy_grad_rows(
    logits: &[f32],
    targets: &[u32],
    lse: &[f32],
    (n, v): (usize, usize),
    scale: f32,
) -> candle_core::Result<Vec<f32>> {
    if lse.len() != n || targets.len() != n {
        candle_core::bail!(
            "cross-entropy grad: {} logsumexps and {} targets for {n} rows",
            lse.len(),
            targets.len()
        );
    }
    let kernels = Kernels::get();
    let k = scale / n as f32;
    let mut out = scratch::take(logits.len());
    out.par_chunks_mut(v * ROWS_PER_TASK)
        .zip(
            logits
                .par_chunks(v * ROWS_PER_TASK)
                .zip(targets.par_chunks(ROWS_PER_TASK))
                .zip(lse.par_chunks(ROWS_PER_TASK)),
        )
        .for_each(|(o, ((rows, t), lse))| {
            for (((o, row), &t), &lse) in o
                .chunks_exact_mut(v)
                .zip(rows.chunks_exact(v))
                .zip(t)
                .zip(lse)
            {
                (kernels.exp_scaled)(row, lse, k, o);
                o[t as usize] -= k;
            }
        });
    Ok(out)
}

impl candle_core::CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "bitnet-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let logits = f32_slice(ls, ll, "cross-entropy")?;
        let targets = u32_slice(ts, tl)?;
        let (n, v) = ll.shape().dims2()?;
        let (loss, lse) = cross_entropy_rows(logits, targets, (n, v))?;
        // One forward per operation value (a fresh one per call), so this is set once.
        let _ = self.lse.set(Arc::new(lse));
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let Some(lse) = self.lse.get() else {
            candle_core::bail!("cross-entropy: backward pass without a CPU forward pass");
        };
        let grad_op = CrossEntropyGrad {
            scale: g,
            lse: lse.clone(),
        };
        let d = logits.apply_op2_no_bwd(targets, &grad_op)?;
        Ok((Some(d), None))
    }
}

/// `scale * (softmax(row) - onehot(target)) / n` for every row, with the rows' logsumexp.
struct CrossEntropyGrad {
    scale: f32,
    lse: Arc<Vec<f32>>,
}

impl candle_core::CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "bitnet-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let logits = f32_slice(ls, ll, "cross-entropy grad")?;
        let targets = u32_slice(ts, tl)?;
        let dims = ll.shape().dims2()?;
        let out = cross_entropy_grad_rows(logits, targets, &self.lse, dims, self.scale)?;
        Ok((CpuStorage::F32(out), ll.shape().clone()))
    }
}

/// Mean cross-entropy of `logits [n, vocab]` (f32) against `targets [n]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(logits.contiguous()?.apply_op2(
        &targets.contiguous()?,
        CrossEntropy {
            lse: OnceLock::new(),
        },
    )?)
}

/// `a @ b` for row-major `a [m, k]` and `b [k, n]` (or `b` stored as its transpose `[n, k]`
/// when `b_transposed`, read in place) on the kernel sets' f32 tiles (`bitnet_quant::sgemm`),
/// into a fresh row-major `[m, n]` buffer. Errors name `what`.
pub(crate) fn product(
    a: &[f32],
    (m, k): (usize, usize),
    b: &[f32],
    n: usize,
    b_transposed: bool,
    what: &str,
) -> candle_core::Result<Vec<f32>> {
    let b = if b_transposed {
        MatRef::row_major(b, n, k).map(MatRef::t)
    } else {
        MatRef::row_major(b, k, n)
    };
    product_of(MatRef::row_major(a, m, k), b, m * n, what)
}

/// `a^T @ b` for `a [k, m]` and `b [k, n]`, both row-major (a weight gradient `dy^T @ x` over
/// a batch's rows), on [`bitnet_quant::sgemm`]. Errors name `what`.
pub(crate) fn product_tn(
    a: &[f32],
    (k, m): (usize, usize),
    b: &[f32],
    n: usize,
    what: &str,
) -> candle_core::Result<Vec<f32>> {
    let a = MatRef::row_major(a, k, m).map(MatRef::t);
    product_of(a, MatRef::row_major(b, k, n), m * n, what)
}

/// [`product_tn`] with `b` the scaled int8 codes `b [k, n]` (a BitLinear input as the
/// forward pass multiplied it), packed for the product straight from the codes.
pub(crate) fn product_tn_codes(
    a: &[f32],
    (k, m): (usize, usize),
    b: ScaledCodes,
    what: &str,
) -> candle_core::Result<Vec<f32>> {
    let a = MatRef::row_major(a, k, m).map(MatRef::t);
    product_of(a, Ok(b), m * b.cols(), what)
}

/// The `len` values of `a b` for views that fit their data (errors name `what`).
fn product_of<'b, B: Into<RightOperand<'b>>>(
    a: bitnet_quant::Result<MatRef>,
    b: bitnet_quant::Result<B>,
    len: usize,
    what: &str,
) -> candle_core::Result<Vec<f32>> {
    let bad = |e: bitnet_quant::Error| candle_core::Error::Msg(format!("{what}: {e}"));
    // Written in full: the product does not accumulate.
    let mut out = scratch::take(len);
    sgemm(Kernels::get(), a.map_err(bad)?, b.map_err(bad)?, &mut out).map_err(bad)?;
    Ok(out)
}

/// Elements per parallel task of [`add_into`].
const SUM_CHUNK: usize = 1 << 14;

/// The elements of `a` plus those of `b`, into `a`.
pub(crate) fn add_into(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(SUM_CHUNK)
        .zip(b.par_chunks(SUM_CHUNK))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, &b)| *a += b));
}

/// `x @ w^T` for rows `x [n, k]` and `w [m, k]` (the output head): the forward product on the
/// kernel sets' f32 tiles (`bitnet_quant::sgemm`, which reads `w` transposed in place and is
/// about twice as fast as candle's product at the head's wide shape), and so are the backward
/// pass's `dx = g @ w` and `dw = g^T @ x` (candle's products on other devices).
struct ProductWt;

impl candle_core::CustomOp2 for ProductWt {
    fn name(&self) -> &'static str {
        "bitnet-product-wt"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out, n, m) = head_logits((xs, xl), (ws, wl), "head product")?;
        Ok((CpuStorage::F32(out), Shape::from((n, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !(grad.device().is_cpu() && grad.dtype() == candle_core::DType::F32) {
            return Ok((Some(grad.matmul(w)?), Some(grad.t()?.matmul(x)?)));
        }
        let grad = grad.contiguous()?;
        let (dx, dw) = with_cpu_f32([&grad], "head product", |[g]| head_grads(g, x, w))?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The logits `x @ w^T` of rows `x [n, k]` and head weights `w [m, k]` (CPU f32 storages),
/// with `n` and `m`. Errors name `what`.
fn head_logits(
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    what: &str,
) -> candle_core::Result<(Vec<f32>, usize, usize)> {
    let (x, w) = (f32_slice(xs, xl, what)?, f32_slice(ws, wl, what)?);
    let ((n, k), (m, kw)) = (xl.shape().dims2()?, wl.shape().dims2()?);
    if k != kw {
        candle_core::bail!("{what}: rows of {k} against weights [{m}, {kw}]");
    }
    Ok((product(x, (n, k), w, m, true, what)?, n, m))
}

/// The head's gradients `(dx = g @ w, dw = g^T @ x)` for the gradient `g [n, m]` of `x @ w^T`
/// (`x [n, k]`, `w [m, k]`, CPU f32), on the kernel sets' f32 tiles.
fn head_grads(g: &[f32], x: &Tensor, w: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let ((n, k), m) = (x.dims2()?, w.dims2()?.0);
    let (dx, dw) = with_cpu_f32([x, w], "head product", |[xs, ws]| {
        Ok((
            product(g, (n, m), ws, k, false, "head product")?,
            product_tn(g, (n, m), xs, k, "head product")?,
        ))
    })?;
    let dev = x.device();
    Ok((
        Tensor::from_vec(dx, (n, k), dev)?,
        Tensor::from_vec(dw, (m, k), dev)?,
    ))
}

/// `x @ w^T` of `x [n, k]` and `w [m, k]` (the output head) as one operation: the forward
/// product on the kernel sets' f32 tiles (`bitnet_quant::sgemm`), the backward pass candle's
/// products. CPU f32 tensors only.
pub fn product_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, ProductWt)?)
}

/// The output head and the cross-entropy as one operation: `mean cross-entropy(x @ w^T,
/// targets)` for rows `x [n, k]`, head weights `w [m, k]` and `targets [n]` (u32), the pieces
/// of [`product_wt`] and [`cross_entropy`] in the same order, so the same loss and gradient
/// bits. As two graph nodes, the `[n, m]` logits' gradient (the largest tensor of a step)
/// gets a zero-filled copy and an addition from candle's backward pass, on one thread; as one,
/// it never enters the graph.
struct HeadLoss {
    /// The logits and each row's logsumexp, kept by the forward pass for the backward one.
    saved: OnceLock<(Vec<f32>, Vec<f32>)>,
}

impl Drop for HeadLoss {
    fn drop(&mut self) {
        if let Some((logits, _)) = self.saved.take() {
            scratch::give_back(logits);
        }
    }
}

impl candle_core::CustomOp3 for HeadLoss {
    fn name(&self) -> &'static str {
        "bitnet-head-loss"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (logits, n, m) = head_logits((xs, xl), (ws, wl), "head loss")?;
        let targets = u32_slice(ts, tl)?;
        let (loss, lse) = cross_entropy_rows(&logits, targets, (n, m))?;
        // One forward per operation value (a fresh one per call), so this is set once.
        let _ = self.saved.set((logits, lse));
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some((logits, lse)) = self.saved.get() else {
            candle_core::bail!("head loss: backward pass without a CPU forward pass");
        };
        let scale = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let (n, m) = (x.dims2()?.0, w.dims2()?.0);
        let targets = targets.to_vec1::<u32>()?;
        let d = cross_entropy_grad_rows(logits, &targets, lse, (n, m), scale)?;
        let (dx, dw) = head_grads(&d, x, w)?;
        scratch::give_back(d);
        Ok((Some(dx), Some(dw), None))
    }
}

/// Mean cross-entropy of the head's logits `x @ w^T` (`x [n, k]`, `w [m, k]`) against
/// `targets [n]` (u32) as one operation: [`product_wt`] then [`cross_entropy`], the same
/// loss and gradient bits, without the `[n, m]` logits (and their gradient) in candle's
/// graph. CPU f32 tensors only.
pub fn head_loss(x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let op = HeadLoss {
        saved: OnceLock::new(),
    };
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &targets.contiguous()?, op)?)
}

/// Elements per parallel task of the element-wise gate.
const GATE_CHUNK: usize = 1 << 16;

/// `relu(g)^2 * u` element-wise.
pub(crate) fn relu2_gate_values(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = scratch::take(g.len());
    out.par_chunks_mut(GATE_CHUNK)
        .zip(g.par_chunks(GATE_CHUNK).zip(u.par_chunks(GATE_CHUNK)))
        .for_each(|(o, (g, u))| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                let r = g.max(0.0);
                *o = r * r * u;
            }
        });
    out
}

/// One gradient of [`relu2_gate_values`] for output gradient `d` into `out`: the gate's
/// `2 relu(g) u d` when `wrt_gate`, else the value's `relu(g)^2 d`.
pub(crate) fn relu2_gate_grad(g: &[f32], u: &[f32], d: &[f32], wrt_gate: bool, out: &mut [f32]) {
    let c = GATE_CHUNK;
    out.par_chunks_mut(c)
        .zip(g.par_chunks(c).zip(u.par_chunks(c).zip(d.par_chunks(c))))
        .for_each(|(o, (g, (u, d)))| {
            for (((o, &g), &u), &d) in o.iter_mut().zip(g).zip(u).zip(d) {
                let r = g.max(0.0);
                *o = if wrt_gate { 2.0 * r * u * d } else { r * r * d };
            }
        });
}

/// Both gradients of [`relu2_gate_values`] for output gradient `d` (rows of `f`) in one pass,
/// side by side in the rows of `out` (`[rows, 2 f]`): the gate's `2 relu(g) u d`, then the
/// value's `relu(g)^2 d` (the bits of [`relu2_gate_grad`]), as gate and up's products take
/// them together.
pub(crate) fn relu2_gate_grads(g: &[f32], u: &[f32], d: &[f32], f: usize, out: &mut [f32]) {
    let c = ROWS_PER_TASK;
    out.par_chunks_mut(2 * f * c)
        .zip(
            g.par_chunks(f * c)
                .zip(u.par_chunks(f * c).zip(d.par_chunks(f * c))),
        )
        .for_each(|(o, (g, (u, d)))| {
            let rows = o.chunks_exact_mut(2 * f).zip(g.chunks_exact(f));
            for ((o, g), (u, d)) in rows.zip(u.chunks_exact(f).zip(d.chunks_exact(f))) {
                let (dg, du) = o.split_at_mut(f);
                for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du).zip(g).zip(u).zip(d) {
                    let r = g.max(0.0);
                    *dg = 2.0 * r * u * d;
                    *du = r * r * d;
                }
            }
        });
}

/// The rows of `parts` (each `[rows, width]`, the widths given) side by side, `[rows, sum of
/// the widths]` (the tests' reference for outputs written side by side).
#[cfg(test)]
pub(crate) fn side_by_side(parts: &[(&[f32], usize)], rows: usize) -> Vec<f32> {
    let width: usize = parts.iter().map(|p| p.1).sum();
    let mut out = scratch::take(rows * width);
    out.par_chunks_mut(width * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, o)| {
            for (r, o) in o.chunks_exact_mut(width).enumerate() {
                let row = task * ROWS_PER_TASK + r;
                let mut at = 0;
                for &(p, w) in parts {
                    o[at..at + w].copy_from_slice(&p[row * w..(row + 1) * w]);
                    at += w;
                }
            }
        });
    out
}

/// `relu(g)^2 * u`, the b1.58 feed-forward gate, fused; gradients `2 relu(g) u` and `relu(g)^2`.
struct Relu2Gate;

impl candle_core::CustomOp2 for Relu2Gate {
    fn name(&self) -> &'static str {
        "bitnet-relu2-gate"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_slice(gs, gl, "relu2 gate")?;
        let u = f32_slice(us, ul, "relu2 gate")?;
        if g.len() != u.len() {
            candle_core::bail!("relu2 gate: {} gates for {} values", g.len(), u.len());
        }
        Ok((CpuStorage::F32(relu2_gate_values(g, u)), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dg = g.apply_op3_no_bwd(u, &grad, &Relu2GateGrad { wrt_gate: true })?;
        let du = g.apply_op3_no_bwd(u, &grad, &Relu2GateGrad { wrt_gate: false })?;
        Ok((Some(dg), Some(du)))
    }
}

/// One of the two gradients of [`Relu2Gate`].
struct Relu2GateGrad {
    wrt_gate: bool,
}

impl candle_core::CustomOp3 for Relu2GateGrad {
    fn name(&self) -> &'static str {
        "bitnet-relu2-gate-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_slice(gs, gl, "relu2 gate grad")?;
        let u = f32_slice(us, ul, "relu2 gate grad")?;
        let d = f32_slice(ds, dl, "relu2 gate grad")?;
        let mut out = zeroed(g.len());
        relu2_gate_grad(g, u, d, self.wrt_gate, &mut out);
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// `relu(g)^2 * u`.
pub fn relu2_gate(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok(g.contiguous()?.apply_op2(&u.contiguous()?, Relu2Gate)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{diff, max_abs, randn, weighted_grads};
    use candle_core::{Device, Var};

    #[test]
    fn head_product_equals_the_composition() {
        let dev = &Device::Cpu;
        // Odd sizes: partial tiles in both directions.
        let x = Var::from_tensor(&Tensor::from_vec(randn(7 * 33, 3, 1.0), (7, 33), dev).unwrap())
            .unwrap();
        let w = Var::from_tensor(&Tensor::from_vec(randn(19 * 33, 4, 1.0), (19, 33), dev).unwrap())
            .unwrap();
        let g = Tensor::from_vec(randn(7 * 19, 5, 1.0), (7, 19), dev).unwrap();
        let got = product_wt(&x, &w).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        assert!(diff(&got, &want) <= 1e-5 * max_abs(&want));
        let (ga, gb) = (weighted_grads(&got, &g), weighted_grads(&want, &g));
        for v in [&x, &w] {
            let (a, b) = (ga.get(v).unwrap(), gb.get(v).unwrap());
            assert!(diff(a, b) <= 1e-5 * max_abs(b));
        }
    }

    #[test]
    fn fused_activation_quant_equals_the_composition() {
        let x = Tensor::from_vec(randn(5 * 33, 1, 2.0), (5, 33), &Device::Cpu).unwrap();
        let a = act_quant_ste(&x).unwrap().to_vec2::<f32>().unwrap();
        let b = crate::bitlinear::quantize_activations(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a, b);
        // Identity gradient.
        let v = Var::from_tensor(&x).unwrap();
        let w = Tensor::from_vec(randn(5 * 33, 2, 1.0), (5, 33), &Device::Cpu).unwrap();
        let g = weighted_grads(&act_quant_ste(v.as_tensor()).unwrap(), &w);
        assert_eq!(
            g.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn fused_rms_norm_matches_the_composition_with_gradients() {
        // More rows than one task, an odd count; widths with and without a tail past the
        // eight running sums.
        for (rows, n) in [(130, 48), (70, 45)] {
            rms_norm_matches_the_composition(rows, n);
        }
    }

    fn rms_norm_matches_the_composition(rows: usize, n: usize) {
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let x = Var::from_tensor(
            &Tensor::from_vec(randn(rows * n, 5, 1.3), (rows, n), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let w = Var::from_tensor(&Tensor::from_vec(randn(n, 6, 1.0), n, &Device::Cpu).unwrap())
            .unwrap();
        let up = Tensor::from_vec(randn(rows * n, 7, 1.0), (rows, n), &Device::Cpu).unwrap();
        let eps = 1e-5;
        let fused = rms_norm(x.as_tensor(), w.as_tensor(), eps).unwrap();
        let reference = crate::model::rms_norm(x.as_tensor(), &w, eps).unwrap();
        // Both against the definition in f64, within two f32 roundings of the outputs'
        // size (the two sum a row's squares in different orders, so they differ by as much).
        let (xs, ws) = (flat(x.as_tensor()), flat(w.as_tensor()));
        let exact: Vec<f32> = xs
            .chunks_exact(n)
            .flat_map(|row| {
                let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
                let r = 1.0 / (ms + eps as f64).sqrt();
                row.iter()
                    .zip(&ws)
                    .map(move |(&v, &wi)| (v as f64 * r * wi as f64) as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        let exact = Tensor::from_vec(exact, (rows, n), &Device::Cpu).unwrap();
        let size = max_abs(&exact);
        for (name, got) in [("fused", &fused), ("composed", &reference)] {
            let d = diff(got, &exact);
            assert!(d <= 2.0 * f32::EPSILON * size, "{name} {n}: {d} of {size}");
        }
        let ga = weighted_grads(&fused, &up);
        let gb = weighted_grads(&reference, &up);
        for v in [&x, &w] {
            let (a, b) = (
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
            );
            let scale = max_abs(b);
            assert!(
                diff(a, b) <= 1e-5 * scale.max(1.0),
                "{} of {scale}",
                diff(a, b)
            );
        }
    }

    /// The block's one-pass gradients against the separate functions (compared with the
    /// composition above), bit for bit, on a width with a tail past the eight lanes.
    #[test]
    fn one_pass_gradients_equal_the_separate_ones() {
        let (rows, n) = (130, 45);
        let (x, g, w) = (
            randn(rows * n, 1, 1.3),
            randn(rows * n, 2, 1.0),
            randn(n, 3, 1.0),
        );
        let (dx, dw) = rms_norm_grads(&x, &w, &g, 1e-5);
        assert_eq!(dx, rms_norm_grad_x(&x, &w, &g, 1e-5));
        assert_eq!(dw, rms_norm_grad_w(&x, &g, n, 1e-5));
        let u = randn(rows * n, 4, 1.0);
        let mut both = vec![0f32; 2 * x.len()];
        relu2_gate_grads(&x, &u, &g, n, &mut both);
        let (mut want_g, mut want_u) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        relu2_gate_grad(&x, &u, &g, true, &mut want_g);
        relu2_gate_grad(&x, &u, &g, false, &mut want_u);
        assert_eq!(both, side_by_side(&[(&want_g, n), (&want_u, n)], rows));
        let (gate, up) = (&both[3 * 2 * n..][..n], &both[3 * 2 * n + n..][..n]);
        assert_eq!((gate, up), (&want_g[3 * n..4 * n], &want_u[3 * n..4 * n]));
    }

    /// The fused head and loss against the head product followed by the cross-entropy (the
    /// same functions in the same order): the same loss bits and the same gradient bits for
    /// the rows and the head's weights, on odd sizes; a bad target is an error.
    #[test]
    fn head_loss_matches_product_then_cross_entropy_bit_for_bit() {
        let (n, k, m) = (45, 19, 53);
        let x = Var::from_tensor(
            &Tensor::from_vec(randn(n * k, 21, 1.0), (n, k), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let w = Var::from_tensor(
            &Tensor::from_vec(randn(m * k, 22, 0.5), (m, k), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 11) % m as u32).collect();
        let t = Tensor::from_vec(t, n, &Device::Cpu).unwrap();
        let fused = head_loss(x.as_tensor(), w.as_tensor(), &t).unwrap();
        let logits = product_wt(x.as_tensor(), w.as_tensor()).unwrap();
        let reference = cross_entropy(&logits, &t).unwrap();
        let bits = |l: &Tensor| l.to_scalar::<f32>().unwrap().to_bits();
        assert_eq!(bits(&fused), bits(&reference));
        let ga = fused.affine(1.5, 0.0).unwrap().backward().unwrap();
        let gb = reference.affine(1.5, 0.0).unwrap().backward().unwrap();
        for p in [&x, &w] {
            let (a, b) = (
                ga.get(p.as_tensor()).unwrap(),
                gb.get(p.as_tensor()).unwrap(),
            );
            assert!(max_abs(b) > 0.0);
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let bad = Tensor::from_vec(vec![m as u32; n], n, &Device::Cpu).unwrap();
        assert!(head_loss(x.as_tensor(), w.as_tensor(), &bad).is_err());
    }

    #[test]
    fn fused_cross_entropy_and_gate_match_the_composition() {
        let (n, v) = (70, 37);
        let logits = Var::from_tensor(
            &Tensor::from_vec(randn(n * v, 8, 3.0), (n, v), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let t = Tensor::from_vec(t, n, &Device::Cpu).unwrap();
        let a = cross_entropy(logits.as_tensor(), &t).unwrap();
        let b = candle_nn::loss::cross_entropy(logits.as_tensor(), &t).unwrap();
        let (av, bv) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
        assert!((av - bv).abs() <= 1e-5 * bv.abs(), "{av} vs {bv}");
        let ga = a.affine(2.0, 0.0).unwrap().backward().unwrap();
        let gb = b.affine(2.0, 0.0).unwrap().backward().unwrap();
        let (da, db) = (
            ga.get(logits.as_tensor()).unwrap(),
            gb.get(logits.as_tensor()).unwrap(),
        );
        assert!(diff(da, db) <= 1e-7, "{}", diff(da, db));
        let bad = Tensor::from_vec(vec![v as u32; n], n, &Device::Cpu).unwrap();
        assert!(cross_entropy(logits.as_tensor(), &bad).is_err());

        let g = Var::from_tensor(&Tensor::from_vec(randn(999, 9, 1.0), 999, &Device::Cpu).unwrap())
            .unwrap();
        let u =
            Var::from_tensor(&Tensor::from_vec(randn(999, 10, 1.0), 999, &Device::Cpu).unwrap())
                .unwrap();
        let w = Tensor::from_vec(randn(999, 11, 1.0), 999, &Device::Cpu).unwrap();
        let fused = relu2_gate(g.as_tensor(), u.as_tensor()).unwrap();
        let reference = g
            .as_tensor()
            .relu()
            .unwrap()
            .sqr()
            .unwrap()
            .mul(u.as_tensor())
            .unwrap();
        assert_eq!(
            fused.to_vec1::<f32>().unwrap(),
            reference.to_vec1::<f32>().unwrap()
        );
        let ga = weighted_grads(&fused, &w);
        let gb = weighted_grads(&reference, &w);
        for p in [&g, &u] {
            let (a, b) = (
                ga.get(p.as_tensor()).unwrap(),
                gb.get(p.as_tensor()).unwrap(),
            );
            assert!(diff(a, b) <= 1e-6, "{}", diff(a, b));
        }
    }
}
