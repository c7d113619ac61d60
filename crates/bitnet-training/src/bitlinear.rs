//! BitLinear for candle: ternary weights and int8 activations in the forward pass, identity
//! gradients through both quantizers (the straight-through estimator of BitNet b1.58).
//!
//! The quantizers follow `FORMATS.md` section 2 exactly:
//! weights `W_q = clamp(round(W * s_w), -1, 1) / s_w` with `s_w = 1 / max(mean|W|, 1e-5)`,
//! activations per token `X_q = clamp(round(X * s_x), -128, 127) / s_x` with
//! `s_x = (1 / max(max|X|, 1e-5)) * 127`, rounding half to even. They are written with
//! candle's primitive operations only, so they run on any candle device, and the STE is the
//! recipe's `x + (q(x) - x).detach()`.

use candle_core::{DType, Tensor, Var, D};

use crate::Result;

/// Below this magnitude the BitNet formulas clamp their denominators.
pub const QUANT_EPS: f64 = 1e-5;

/// Adding then subtracting 1.5 * 2^23 rounds an f32 of magnitude below 2^22 to the nearest
/// integer, ties to even (IEEE round-to-nearest-even does the work).
const ROUND_MAGIC: f64 = 12_582_912.0;

/// `round(x)` with ties to even, for `|x| < 2^22` (callers clamp first).
fn round_half_even(x: &Tensor) -> Result<Tensor> {
    Ok(x.affine(1.0, ROUND_MAGIC)?.affine(1.0, -ROUND_MAGIC)?)
}

/// The per-tensor weight scale `s_w = 1 / max(mean |w|, QUANT_EPS)` as a 0-d f32 tensor.
///
/// For f32 CPU weights the mean is a sum in f64 on the thread pool
/// (fixed chunks, so the same bits for any thread count), rounded to f32 once; on other
/// devices, candle's f32 mean.
/// Every user of the scale (the fused and composed layers, export) calls this function, so
/// they agree on its bits.
pub fn weight_scale(w: &Tensor) -> Result<Tensor> {
    if w.device().is_cpu() && w.dtype() == DType::F32 {
        let w = w.contiguous()?;
        let mean = crate::fused::with_cpu_f32([&w], "weight scale", |[v]| {
            Ok(crate::fused::sum_f64(v, |x| x.abs() as f64) / v.len().max(1) as f64)
        })? as f32;
        return Ok(Tensor::new(1.0 / mean.max(QUANT_EPS as f32), w.device())?);
    }
    Ok(w.abs()?.mean_all()?.maximum(QUANT_EPS)?.recip()?)
}

/// Ternary codes of `w` (same shape, values -1, 0, 1 as f32) and `s_w`: what the forward pass
/// uses and what export writes.
pub fn ternary_codes(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = weight_scale(w)?;
    // Clamping to +-2 before rounding changes nothing after the final clamp to +-1 and keeps the
    // value inside the exact range of the rounding trick.
    let v = w.broadcast_mul(&s)?.clamp(-2f32, 2f32)?;
    let codes = round_half_even(&v)?.clamp(-1f32, 1f32)?;
    Ok((codes, s))
}

/// The dequantized ternary weights `codes / s_w`, with no gradient.
pub fn quantize_weights(w: &Tensor) -> Result<Tensor> {
    let (codes, s) = ternary_codes(w)?;
    Ok(codes.broadcast_div(&s)?)
}

/// Per-token (last dimension) int8 quantize-dequantize of activations, with no gradient.
pub fn quantize_activations(x: &Tensor) -> Result<Tensor> {
    let amax = x.abs()?.max_keepdim(D::Minus1)?;
    let s = amax.maximum(QUANT_EPS)?.recip()?.affine(127.0, 0.0)?;
    let v = x.broadcast_mul(&s)?;
    let q = round_half_even(&v)?.clamp(-128f32, 127f32)?;
    Ok(q.broadcast_div(&s)?)
}

/// `x + (q(x) - x).detach()`: forward value `q(x)`, gradient identity.
pub fn straight_through(x: &Tensor, q: &Tensor) -> Result<Tensor> {
    Ok(x.add(&q.sub(x)?.detach())?)
}

/// A bias-free linear layer `y = x W^T` with f32 latent weights `[out, in]`; when `quantize` is
/// set both `W` and `x` pass through their quantizers (BitLinear), otherwise it is a plain
/// linear layer (the full-precision twin).
#[derive(Debug, Clone)]
pub struct BitLinear {
    weight: Var,
    quantize: bool,
}

impl BitLinear {
    /// A layer over the latent weight `weight` (`[out, in]`, f32).
    pub fn new(weight: Var, quantize: bool) -> Result<Self> {
        if weight.dtype() != DType::F32 || weight.rank() != 2 {
            return Err(crate::TrainError::Invalid(format!(
                "BitLinear wants an f32 [out, in] weight, got {:?} {:?}",
                weight.dtype(),
                weight.shape()
            )));
        }
        Ok(BitLinear { weight, quantize })
    }

    /// The latent weight.
    pub fn weight(&self) -> &Var {
        &self.weight
    }

    /// Whether the quantizers are on.
    pub fn is_quantized(&self) -> bool {
        self.quantize
    }

    /// The weight the forward pass multiplies by (dequantized ternary, or the latent weight).
    pub fn effective_weight(&self) -> Result<Tensor> {
        let w = self.weight.as_tensor();
        if self.quantize {
            straight_through(w, &quantize_weights(w)?)
        } else {
            Ok(w.clone())
        }
    }

    /// The input the forward pass multiplies (int8 quantized and dequantized per token, or `x`).
    pub fn effective_input(&self, x: &Tensor) -> Result<Tensor> {
        if !self.quantize {
            Ok(x.clone())
        } else if x.device().is_cpu() {
            crate::fused::act_quant_ste(x)
        } else {
            straight_through(x, &quantize_activations(x)?)
        }
    }

    /// `x [.., in] -> [.., out]`. On the CPU a quantized layer is one fused operation whose
    /// forward product runs on the engine's integer kernels ([`crate::fused_linear`]); the
    /// value is the composition's up to f32 rounding of the sums.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.quantize && x.device().is_cpu() {
            return crate::fused_linear::bitlinear(x, self.weight.as_tensor());
        }
        let xq = self.effective_input(x)?;
        let w = self.effective_weight()?;
        matmul_wt(&xq, &w)
    }

    /// `r + forward(x)`: a residual connection, one fused operation on the CPU.
    pub fn forward_add(&self, x: &Tensor, r: &Tensor) -> Result<Tensor> {
        if self.quantize && x.device().is_cpu() {
            return crate::fused_linear::bitlinear_add(x, self.weight.as_tensor(), r);
        }
        Ok(r.add(&self.forward(x)?)?)
    }
}

/// `x [.., in] @ w[out, in]^T -> [.., out]`, flattening the leading dimensions.
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().expect("rank >= 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, k))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    Ok(y.reshape(out)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn weight_codes_follow_the_definition() {
        // mean |w| = 0.5 -> s_w = 2; w * 2 = [0.5 -> 0 (even), 1.5 -> 2 -> 1, -0.3 -> -1 (-0.6),
        // 0.2 -> 0 (0.4), -0.5 -> -1 ... ] checked against bitnet-quant's reference.
        let vals = [0.25f32, 0.75, -0.3, 0.2, -0.5, 1.0, -0.9, 0.1];
        let w = Tensor::new(&vals, &Device::Cpu).unwrap();
        let (codes, s) = ternary_codes(&w).unwrap();
        let (ref_codes, ref_s) = bitnet_quant::quantize::quantize_weights(&vals);
        let got: Vec<i8> = codes
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&c| c as i8)
            .collect();
        assert_eq!(got, ref_codes);
        let s = s.to_scalar::<f32>().unwrap();
        assert!((s - ref_s).abs() <= ref_s * 1e-6, "{s} vs {ref_s}");
    }

    /// The CPU scale against the definition in f64 (several parallel chunks and a tail), the
    /// same bits on one thread and on three, for a transposed view, and near candle's f32 mean.
    #[test]
    fn weight_scale_is_the_inverse_absolute_mean() {
        let mut rng = crate::rng::SplitMix64::new(9);
        let (rows, cols) = (311, 331);
        let vals: Vec<f32> = (0..rows * cols)
            .map(|_| (rng.normal() * 0.02) as f32)
            .collect();
        let w = Tensor::from_vec(vals.clone(), (rows, cols), &Device::Cpu).unwrap();
        let mean = vals.iter().map(|&v| v.abs() as f64).sum::<f64>() / vals.len() as f64;
        let s = weight_scale(&w).unwrap().to_scalar::<f32>().unwrap();
        let want = 1.0 / mean as f32;
        assert!(
            (s - want).abs() <= want * 2.0 * f32::EPSILON,
            "{s} vs {want}"
        );
        let on = |threads: usize, w: &Tensor| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| weight_scale(w).unwrap().to_scalar::<f32>().unwrap())
        };
        assert_eq!(on(1, &w).to_bits(), s.to_bits());
        assert_eq!(on(3, &w).to_bits(), s.to_bits());
        let t = w.t().unwrap();
        assert_eq!(weight_scale(&t).unwrap().to_scalar::<f32>().unwrap(), s);
        let composed = w
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .recip()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((s - composed).abs() <= s * 1e-5, "{s} vs {composed}");
        // All zeros: the epsilon.
        let z = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
        let sz = weight_scale(&z).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(sz, 1.0 / QUANT_EPS as f32);
    }

    #[test]
    fn activation_quantizer_matches_the_engine_bit_for_bit() {
        let mut rng = crate::rng::SplitMix64::new(5);
        for n in [1usize, 7, 64, 300] {
            let x: Vec<f32> = (0..3 * n).map(|_| (rng.normal() * 3.0) as f32).collect();
            let t = Tensor::from_vec(x.clone(), (3, n), &Device::Cpu).unwrap();
            let got = quantize_activations(&t).unwrap().to_vec2::<f32>().unwrap();
            for (row, g) in x.chunks(n).zip(&got) {
                let mut q = vec![0i8; n];
                let s = bitnet_quant::quantize::quantize_activations(row, &mut q);
                let want: Vec<f32> = q.iter().map(|&v| v as f32 / s).collect();
                assert_eq!(g, &want);
            }
        }
    }

    #[test]
    fn rounding_is_half_to_even() {
        let x = Tensor::new(&[0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5, 3.4999], &Device::Cpu).unwrap();
        let r = round_half_even(&x).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(r, [0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 3.0]);
    }
}
