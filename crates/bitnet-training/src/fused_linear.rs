//! BitLinear's forward and backward pass on the CPU as one candle operation, with the forward
//! product computed by the inference engine's integer kernels.
//!
//! Composed from candle primitives, a BitLinear layer is a dozen passes over its weights (the
//! absmean quantizer and the straight-through `w + (q(w) - w).detach()`), a reshape and a
//! transpose around an f32 matrix product, and a gradient for each of those nodes, which
//! candle's backward pass zero-fills and adds on one thread. Here the layer is one node:
//!
//! - forward: ternary codes of the latent weights with the scale `s_w` (computed by
//!   [`crate::bitlinear::weight_scale`], so export stores the very same value), int8 codes of
//!   each input row with its `s_x`, the exact integer products from `bitnet_quant`'s kernels
//!   (the ones the engine runs), and `y = acc / (s_x * s_w)` as the engine computes it;
//! - backward (straight-through through both quantizers): `dx = dy @ (codes / s_w)` and
//!   `dW = dy^T @ (q / s_x)`, two f32 matrix products on the values the forward pass used.

use std::sync::OnceLock;

use bitnet_core::AlignedBuffer;
use bitnet_quant::bitlinear::{BitLinear as PackedLinear, WeightScale};
use bitnet_quant::kernels::Kernels;
use bitnet_quant::quantize::quantize_activations;
use bitnet_quant::sgemm::ScaledCodes;
use bitnet_quant::ternary::TernaryMatrix;
use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::fused::{add_into, f32_slice, zeroed};
use crate::Result;

/// Weights per parallel task of [`TernaryLinear::effective_into`].
const EFFECTIVE_CHUNK: usize = 1 << 14;

/// Rows (tokens) per parallel task when quantizing or dequantizing activations.
const ROWS_PER_TASK: usize = 64;

/// Input rows quantized as BitLinear's activation quantizer does: int8 codes (each row padded
/// to the layer's `padded_in`, 64-byte aligned so the products' loads never split a cache
/// line) and one scale `s_x` per row.
pub(crate) struct QuantizedRows {
    xq: AlignedBuffer,
    s_x: Vec<f32>,
    in_f: usize,
    padded_in: usize,
}

impl QuantizedRows {
    /// Quantizes the `in_f`-wide rows of `x` into rows of `padded_in` codes.
    pub(crate) fn new(x: &[f32], in_f: usize, padded_in: usize) -> Self {
        Self::build(x, in_f, padded_in, None)
    }

    /// Quantizes the RMSNorm of each row of `x` with gain `w` (`in_f` wide) and `eps`: the
    /// codes of [`Self::new`] on [`rms_norm_rows`]' output, without writing that out.
    pub(crate) fn normalized(x: &[f32], w: &[f32], eps: f32, padded_in: usize) -> Self {
        Self::build(x, w.len(), padded_in, Some((w, eps)))
    }

    fn build(x: &[f32], in_f: usize, padded_in: usize, norm: Option<(&[f32], f32)>) -> Self {
        let rows = x.len() / in_f.max(1);
        let mut xq = AlignedBuffer::zeroed(rows * padded_in);
        let mut s_x = vec![0f32; rows];
        let kernels = Kernels::get();
        xq.as_mut_i8()
            .par_chunks_mut(padded_in * ROWS_PER_TASK)
            .zip(s_x.par_chunks_mut(ROWS_PER_TASK))
            .zip(x.par_chunks(in_f * ROWS_PER_TASK))
            .for_each(|((q, s), x)| {
                for ((q, s), x) in q
                    .chunks_exact_mut(padded_in)
                    .zip(s)
                    .zip(x.chunks_exact(in_f))
                {
                    *s = match norm {
                        // The kernel set's fused RMSNorm and quantizer: the codes of
                        // `rms_norm_row` then `quantize_activations`, bit for bit.
                        Some((w, eps)) => (kernels.rms_norm_quantize)(x, w, eps, q),
                        None => quantize_activations(x, q),
                    };
                }
            });
        QuantizedRows {
            xq,
            s_x,
            in_f,
            padded_in,
        }
    }

    /// The values the forward pass multiplied, `q / s_x`, as `[rows, in_f]` f32.
    pub(crate) fn dequantized(&self) -> Vec<f32> {
        let (in_f, padded_in) = (self.in_f, self.padded_in);
        let mut x_eff = zeroed(self.s_x.len() * in_f);
        x_eff
            .par_chunks_mut(in_f * ROWS_PER_TASK)
            .zip(self.xq.as_i8().par_chunks(padded_in * ROWS_PER_TASK))
            .zip(self.s_x.par_chunks(ROWS_PER_TASK))
            .for_each(|((o, q), s)| {
                for ((o, q), &s) in o
                    .chunks_exact_mut(in_f)
                    .zip(q.chunks_exact(padded_in))
                    .zip(s)
                {
                    for (o, &q) in o.iter_mut().zip(q) {
                        *o = q as f32 / s;
                    }
                }
            });
        x_eff
    }

    /// The values the forward pass multiplied, `q / s_x`, as a product's operand that reads
    /// the codes where they lie.
    pub(crate) fn codes(&self) -> bitnet_quant::Result<ScaledCodes<'_>> {
        ScaledCodes::new(self.xq.as_i8(), &self.s_x, self.in_f, self.padded_in)
    }

    /// Number of rows.
    pub(crate) fn rows(&self) -> usize {
        self.s_x.len()
    }
}

/// A layer's latent weights quantized for one forward pass: ternary codes with the scale
/// `s_w`, packed for the engine's kernels.
pub(crate) struct TernaryLinear {
    codes: Vec<i8>,
    s_w: f32,
    packed: PackedLinear,
}

impl TernaryLinear {
    /// Quantizes latent weights `w [out_f, in_f]` with scale `s_w`.
    pub(crate) fn new(w: &[f32], out_f: usize, in_f: usize, s_w: f32) -> candle_core::Result<Self> {
        let codes: Vec<i8> = w.par_iter().map(|&v| weight_code(v, s_w)).collect();
        let matrix = TernaryMatrix::from_codes(&codes, out_f, in_f)
            .map_err(|e| candle_core::Error::Msg(format!("bitlinear: {e}")))?;
        Ok(TernaryLinear {
            codes,
            s_w,
            packed: PackedLinear::new(matrix, WeightScale::Inverse(s_w)),
        })
    }

    /// Input rows padded as this layer's kernels read them.
    pub(crate) fn padded_in(&self) -> usize {
        self.packed.padded_in()
    }

    /// `y = acc / (s_x * s_w)` of the exact integer products, `[rows, out_f]`.
    pub(crate) fn forward(&self, x: &QuantizedRows) -> Vec<f32> {
        let out_f = self.packed.out_features();
        // Small layers (all of the trainer's, usually) keep their sums on the stack.
        let mut acc = if self.packed.uses_acc(x.rows()) {
            zeroed(x.rows() * out_f)
        } else {
            Vec::new()
        };
        // Written in full by the product.
        let mut y = crate::scratch::take(x.rows() * out_f);
        self.packed
            .forward_quantized(Kernels::get(), x.xq.as_i8(), &x.s_x, &mut acc, &mut y);
        y
    }

    /// The weights the forward pass multiplied, `codes / s_w`, `[out_f, in_f]` f32.
    pub(crate) fn effective(&self) -> Vec<f32> {
        let mut out = crate::scratch::take(self.codes.len());
        self.effective_into(&mut out);
        out
    }

    /// [`Self::effective`] into `out` (`out_f * in_f` values).
    pub(crate) fn effective_into(&self, out: &mut [f32]) {
        out.par_chunks_mut(EFFECTIVE_CHUNK)
            .zip(self.codes.par_chunks(EFFECTIVE_CHUNK))
            .for_each(|(o, c)| {
                for (o, &c) in o.iter_mut().zip(c) {
                    *o = c as f32 / self.s_w;
                }
            });
    }
}

/// What the forward pass quantized, kept for the backward pass.
struct Saved {
    weights: TernaryLinear,
    rows: QuantizedRows,
}

/// The fused layer for one call: `s_w` fixed by the caller (see the module comment).
struct BitLinearOp {
    s_w: f32,
    saved: OnceLock<Saved>,
}

/// `clamp(round(w * s_w), -1, 1)`, halves to even: the operations of
/// [`crate::bitlinear::ternary_codes`] in the same order, so the codes agree bit for bit.
fn weight_code(w: f32, s_w: f32) -> i8 {
    bitnet_quant::round_half_even_small((w * s_w).clamp(-2.0, 2.0)).clamp(-1.0, 1.0) as i8
}

impl BitLinearOp {
    /// The layer's output for `x` and `w` (the operation's arguments).
    fn output(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(Vec<f32>, Shape)> {
        let x = f32_slice(xs, xl, "bitlinear")?;
        let w = f32_slice(ws, wl, "bitlinear")?;
        let (out_f, in_f) = wl.shape().dims2()?;
        if xl.dims().last() != Some(&in_f) {
            candle_core::bail!(
                "bitlinear: weight [{out_f}, {in_f}] for inputs {:?}",
                xl.dims()
            );
        }
        let weights = TernaryLinear::new(w, out_f, in_f, self.s_w)?;
        let rows = QuantizedRows::new(x, in_f, weights.padded_in());
        let y = weights.forward(&rows);
        // One forward per op value (a fresh op per call), so this is set once.
        let _ = self.saved.set(Saved { weights, rows });
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("checked above") = out_f;
        Ok((y, Shape::from(dims)))
    }

    /// The gradients of `x` and `w` for the output gradient `grad` (the straight-through
    /// estimator's products on the values the forward pass used).
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let Some(saved) = self.saved.get() else {
            candle_core::bail!("bitlinear: backward pass without a CPU forward pass");
        };
        let (out_f, in_f) = w.dims2()?;
        let rows = x.elem_count() / in_f.max(1);
        let dev = x.device();
        let w_eff = Tensor::from_vec(saved.weights.effective(), (out_f, in_f), dev)?;
        let x_eff = Tensor::from_vec(saved.rows.dequantized(), (rows, in_f), dev)?;
        let dy = grad.reshape((rows, out_f))?;
        let dx = dy.matmul(&w_eff)?.reshape(x.shape())?;
        let dw = dy.t()?.matmul(&x_eff)?;
        Ok((dx, dw))
    }
}

impl candle_core::CustomOp2 for BitLinearOp {
    fn name(&self) -> &'static str {
        "bitnet-bitlinear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, shape) = self.output(xs, xl, ws, wl)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.grads(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The layer with a residual `r` added to its output (`r + y`, the f32 addition of
/// `r.add(y)`), so that the residual stream needs no separate addition node.
impl candle_core::CustomOp3 for BitLinearOp {
    fn name(&self) -> &'static str {
        "bitnet-bitlinear-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (mut y, shape) = self.output(xs, xl, ws, wl)?;
        let r = f32_slice(rs, rl, "bitlinear residual")?;
        if rl.shape() != &shape {
            candle_core::bail!(
                "bitlinear: residual {:?} for outputs {:?}",
                rl.dims(),
                shape.dims()
            );
        }
        add_into(&mut y, r);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.grads(x, w, grad)?;
        Ok((Some(dx), Some(dw), Some(grad.clone())))
    }
}

/// The fused layer for one call, its scale computed as the composition computes it.
fn op(w: &Tensor) -> Result<BitLinearOp> {
    let s_w = crate::bitlinear::weight_scale(w)?
        .detach()
        .to_scalar::<f32>()?;
    Ok(BitLinearOp {
        s_w,
        saved: OnceLock::new(),
    })
}

/// BitLinear `q(x) @ q(W)^T` of `x [.., in]` and latent weights `w [out, in]` on the CPU, with
/// the straight-through gradient for both (see the module comment). `x` and `w` must be f32
/// CPU tensors.
pub fn bitlinear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op(w)?)?)
}

/// `r + bitlinear(x, w)` as one operation (`r` has the output's shape): the residual stream's
/// addition without a node of its own, whose gradient candle would zero-fill and add.
pub fn bitlinear_add(x: &Tensor, w: &Tensor, r: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &r.contiguous()?, op(w)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitlinear::{matmul_wt, BitLinear};
    use crate::testing::{diff, max_abs, randn, weighted_grads};
    use candle_core::{Device, Var};

    /// The composition the fused layer replaces: the quantizers with the straight-through
    /// estimator, written with candle primitives, and an f32 matrix product.
    fn composed(x: &Tensor, layer: &BitLinear) -> Tensor {
        let xq = crate::bitlinear::straight_through(
            x,
            &crate::bitlinear::quantize_activations(x).unwrap(),
        )
        .unwrap();
        matmul_wt(&xq, &layer.effective_weight().unwrap()).unwrap()
    }

    #[test]
    fn fused_layer_matches_the_composition_with_gradients() {
        // Odd widths (padding inside the kernels' blocks), several leading dims, more rows
        // than one task, and an all-zero input row (scale clamped by the epsilon).
        for (lead, k, n) in [
            (vec![2, 67], 70, 9),
            (vec![3], 300, 130),
            (vec![130], 256, 64),
        ] {
            let rows: usize = lead.iter().product();
            let mut xs = randn(rows * k, k as u64, 1.7);
            xs[..k].fill(0.0);
            let dims = [lead.as_slice(), &[k]].concat();
            let x = Var::from_tensor(&Tensor::from_vec(xs, dims, &Device::Cpu).unwrap()).unwrap();
            let w = Var::from_tensor(
                &Tensor::from_vec(randn(n * k, n as u64, 0.02), (n, k), &Device::Cpu).unwrap(),
            )
            .unwrap();
            let layer = BitLinear::new(w.clone(), true).unwrap();
            let fused = layer.forward(x.as_tensor()).unwrap();
            let reference = composed(x.as_tensor(), &layer);
            assert_eq!(fused.dims(), reference.dims());
            // The same products of the same quantized values: f32 rounding of the sums only.
            let scale = max_abs(&reference);
            assert!(
                diff(&fused, &reference) <= 1e-6 * scale,
                "{} of {scale}",
                diff(&fused, &reference)
            );
            let up =
                Tensor::from_vec(randn(rows * n, 3, 1.0), fused.shape(), &Device::Cpu).unwrap();
            let ga = weighted_grads(&fused, &up);
            let gb = weighted_grads(&reference, &up);
            for v in [&x, &w] {
                let (a, b) = (
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(a.dims(), v.dims());
                let scale = max_abs(b);
                assert!(diff(a, b) <= 1e-6 * scale, "{} of {scale}", diff(a, b));
            }
        }
    }

    /// A linear's normalised input, quantized by the kernel set's fused RMSNorm and
    /// quantizer, against the trainer's RMSNorm written out and then quantized: the same
    /// codes and scales, bit for bit (odd width, padded rows, a zero row, several tasks).
    #[test]
    fn normalized_rows_are_the_norm_then_the_quantizer() {
        let (rows, n, padded) = (130, 70, 128);
        let mut x = randn(rows * n, 5, 2.0);
        x[3 * n..4 * n].fill(0.0);
        let w: Vec<f32> = randn(n, 6, 0.5).iter().map(|v| 1.0 + v).collect();
        let eps = 1e-5;
        let fused = QuantizedRows::normalized(&x, &w, eps, padded);
        let plain = QuantizedRows::new(&crate::fused::rms_norm_rows(&x, &w, eps), n, padded);
        assert_eq!(fused.xq.as_i8(), plain.xq.as_i8());
        let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fused.s_x), bits(&plain.s_x));
    }

    #[test]
    fn residual_form_is_the_layer_plus_the_residual() {
        let (rows, k, n) = (70, 96, 40);
        let var = |len: usize, dims: (usize, usize), seed: u64, scale: f64| {
            Var::from_tensor(
                &Tensor::from_vec(randn(len, seed, scale), dims, &Device::Cpu).unwrap(),
            )
            .unwrap()
        };
        let x = var(rows * k, (rows, k), 1, 1.0);
        let r = var(rows * n, (rows, n), 2, 1.0);
        let w = var(n * k, (n, k), 3, 0.02);
        let layer = BitLinear::new(w.clone(), true).unwrap();
        let fused = layer.forward_add(x.as_tensor(), r.as_tensor()).unwrap();
        let plain = r
            .as_tensor()
            .add(&layer.forward(x.as_tensor()).unwrap())
            .unwrap();
        // The same layer output plus the same f32 addition: equal bits.
        assert_eq!(
            fused.to_vec2::<f32>().unwrap(),
            plain.to_vec2::<f32>().unwrap()
        );
        let up = Tensor::from_vec(randn(rows * n, 4, 1.0), (rows, n), &Device::Cpu).unwrap();
        let (ga, gb) = (weighted_grads(&fused, &up), weighted_grads(&plain, &up));
        for v in [&x, &w, &r] {
            assert_eq!(
                ga.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
                gb.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
            );
        }
    }
}
