//! The BitNet b1.58 transformer in candle, laid out exactly as the engine runs it:
//! pre-RMSNorm blocks with `attn_sub_norm` before `o_proj` and `ffn_sub_norm` before
//! `down_proj`, `relu(gate)^2 * up`, RoPE (rotate-half), grouped-query attention, and an
//! embedding / final norm / head in full precision.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};

use crate::attention::{causal_attention, RopeAngles};
use crate::bitlinear::BitLinear;
use crate::block::{block_forward, GradSink};
use crate::config::ModelShape;
use crate::rng::SplitMix64;
use crate::{Result, TrainError};

/// Standard deviation of the normal initialisation of every matrix.
const INIT_STD: f64 = 0.02;

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    /// `input_layernorm`.
    pub attn_norm: Var,
    /// Query projection.
    pub q_proj: BitLinear,
    /// Key projection.
    pub k_proj: BitLinear,
    /// Value projection.
    pub v_proj: BitLinear,
    /// `attn_sub_norm`, before `o_proj`.
    pub attn_sub_norm: Var,
    /// Output projection.
    pub o_proj: BitLinear,
    /// `post_attention_layernorm`.
    pub ffn_norm: Var,
    /// Gate projection.
    pub gate_proj: BitLinear,
    /// Up projection.
    pub up_proj: BitLinear,
    /// `ffn_sub_norm`, before `down_proj`.
    pub ffn_sub_norm: Var,
    /// Down projection.
    pub down_proj: BitLinear,
}

/// The whole model: parameters plus the RoPE tables.
#[derive(Debug, Clone)]
pub struct Transformer {
    shape: ModelShape,
    quantize: bool,
    /// `[vocab, hidden]`.
    pub embed: Var,
    /// The blocks.
    pub blocks: Vec<Block>,
    /// Final RMSNorm.
    pub final_norm: Var,
    /// `[vocab, hidden]` when untied.
    pub head: Option<Var>,
    device: Device,
}

impl Transformer {
    /// A freshly initialised model (normal(0, 0.02) matrices, unit norms), deterministic in
    /// `seed`.
    pub fn new(shape: &ModelShape, quantize: bool, seed: u64, device: &Device) -> Result<Self> {
        shape.validate()?;
        let mut rng = SplitMix64::new(seed);
        let mut named = Vec::new();
        for (name, dims) in Self::param_shapes(shape) {
            let n: usize = dims.iter().product();
            let t = if dims.len() == 1 {
                Tensor::ones(n, DType::F32, device)?
            } else {
                let v: Vec<f32> = (0..n).map(|_| (rng.normal() * INIT_STD) as f32).collect();
                Tensor::from_vec(v, dims.as_slice(), device)?
            };
            named.push((name, t));
        }
        Self::from_tensors(shape, quantize, named, device)
    }

    /// Names and shapes of every parameter, in a fixed order (the order of checkpoints).
    /// Names are those of Hugging Face's BitNet checkpoints.
    pub fn param_shapes(shape: &ModelShape) -> Vec<(String, Vec<usize>)> {
        let (d, f, v) = (shape.hidden_size, shape.intermediate_size, shape.vocab_size);
        let kv = shape.num_kv_heads * shape.head_dim();
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
        for i in 0..shape.num_layers {
            let p = format!("model.layers.{i}");
            out.extend([
                (format!("{p}.input_layernorm.weight"), vec![d]),
                (format!("{p}.self_attn.q_proj.weight"), vec![d, d]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, d]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, d]),
                (format!("{p}.self_attn.attn_sub_norm.weight"), vec![d]),
                (format!("{p}.self_attn.o_proj.weight"), vec![d, d]),
                (format!("{p}.post_attention_layernorm.weight"), vec![d]),
                (format!("{p}.mlp.gate_proj.weight"), vec![f, d]),
                (format!("{p}.mlp.up_proj.weight"), vec![f, d]),
                (format!("{p}.mlp.ffn_sub_norm.weight"), vec![f]),
                (format!("{p}.mlp.down_proj.weight"), vec![d, f]),
            ]);
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        if !shape.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, d]));
        }
        out
    }

    /// A model over given tensors, named and ordered as [`Transformer::param_shapes`].
    pub fn from_tensors(
        shape: &ModelShape,
        quantize: bool,
        tensors: Vec<(String, Tensor)>,
        device: &Device,
    ) -> Result<Self> {
        let expected = Self::param_shapes(shape);
        if tensors.len() != expected.len() {
            return Err(TrainError::Invalid(format!(
                "expected {} parameter tensors, got {}",
                expected.len(),
                tensors.len()
            )));
        }
        let mut vars = Vec::with_capacity(tensors.len());
        for ((name, t), (want_name, dims)) in tensors.into_iter().zip(&expected) {
            if &name != want_name || t.dims() != dims.as_slice() || t.dtype() != DType::F32 {
                return Err(TrainError::Invalid(format!(
                    "parameter {name} {:?} {:?}: expected {want_name} {dims:?} f32",
                    t.dims(),
                    t.dtype()
                )));
            }
            vars.push(Var::from_tensor(&t.to_device(device)?)?);
        }
        let mut it = vars.into_iter();
        let mut next = || it.next().expect("count checked above");
        let embed = next();
        let mut blocks = Vec::with_capacity(shape.num_layers);
        for _ in 0..shape.num_layers {
            blocks.push(Block {
                attn_norm: next(),
                q_proj: BitLinear::new(next(), quantize)?,
                k_proj: BitLinear::new(next(), quantize)?,
                v_proj: BitLinear::new(next(), quantize)?,
                attn_sub_norm: next(),
                o_proj: BitLinear::new(next(), quantize)?,
                ffn_norm: next(),
                gate_proj: BitLinear::new(next(), quantize)?,
                up_proj: BitLinear::new(next(), quantize)?,
                ffn_sub_norm: next(),
                down_proj: BitLinear::new(next(), quantize)?,
            });
        }
        let final_norm = next();
        let head = (!shape.tie_word_embeddings).then(&mut next);
        Ok(Transformer {
            shape: shape.clone(),
            quantize,
            embed,
            blocks,
            final_norm,
            head,
            device: device.clone(),
        })
    }

    /// Every parameter with its name, in checkpoint order.
    pub fn named_params(&self) -> Vec<(String, Var)> {
        let names = Self::param_shapes(&self.shape);
        let mut vars = vec![self.embed.clone()];
        for b in &self.blocks {
            vars.extend([
                b.attn_norm.clone(),
                b.q_proj.weight().clone(),
                b.k_proj.weight().clone(),
                b.v_proj.weight().clone(),
                b.attn_sub_norm.clone(),
                b.o_proj.weight().clone(),
                b.ffn_norm.clone(),
                b.gate_proj.weight().clone(),
                b.up_proj.weight().clone(),
                b.ffn_sub_norm.clone(),
                b.down_proj.weight().clone(),
            ]);
        }
        vars.push(self.final_norm.clone());
        vars.extend(self.head.clone());
        names.into_iter().map(|(n, _)| n).zip(vars).collect()
    }

    /// The model's shape.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// Whether the linears are BitLinear (`false`: the full-precision twin).
    pub fn is_quantized(&self) -> bool {
        self.quantize
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]` (u32), causal.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let logits = self.logits_2d(ids)?;
        Ok(logits.reshape((b, t, self.shape.vocab_size))?)
    }

    /// Logits `[batch * seq, vocab]`: the loss takes them flat, and every reshape is one more
    /// logits-sized gradient in candle's backward pass.
    fn logits_2d(&self, ids: &Tensor) -> Result<Tensor> {
        self.logits_with(ids, None)
    }

    /// [`Self::logits_2d`], with each block one operation when `sink` is given (the quantized
    /// model on the CPU only: see module `block`); the blocks' parameter gradients then
    /// land in `sink`, not in the graph.
    fn logits_with(&self, ids: &Tensor, sink: Option<&Arc<GradSink>>) -> Result<Tensor> {
        let x = self.final_hidden(ids, sink)?;
        let head = self.head_weights();
        if x.device().is_cpu() {
            return crate::fused::product_wt(&x, head);
        }
        Ok(x.matmul(&head.t()?)?)
    }

    /// The output head's weights `[vocab, hidden]`: its own, or the tied embedding.
    fn head_weights(&self) -> &Tensor {
        self.head.as_ref().unwrap_or(&self.embed).as_tensor()
    }

    /// The final norm's output `[batch * seq, hidden]`, the head's input (`sink` as for
    /// [`Self::logits_with`]).
    fn final_hidden(&self, ids: &Tensor, sink: Option<&Arc<GradSink>>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let s = &self.shape;
        let mut x = self
            .embed
            .as_tensor()
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, s.hidden_size))?;
        let rope = RopeAngles::new(s.rope_theta, s.head_dim(), t);
        // The fused CPU attention rotates and masks itself; other devices compose it.
        let composed = if self.device.is_cpu() {
            None
        } else {
            let (cos, sin) = rope_tables(&rope, &self.device)?;
            Some((cos, sin, causal_mask(t, &self.device)?))
        };
        for blk in &self.blocks {
            if let Some(sink) = sink {
                let heads = (s.num_heads, s.num_kv_heads);
                x = block_forward(blk, &x, heads, &rope, s.rms_norm_eps, sink)?;
                continue;
            }
            let h = self.linear_input(&x, &blk.attn_norm)?;
            let a = self.attention(blk, &h, &rope, composed.as_ref())?;
            let a = self.linear_input(&a, &blk.attn_sub_norm)?;
            x = blk.o_proj.forward_add(&a, &x)?;
            let h = self.linear_input(&x, &blk.ffn_norm)?;
            let g = blk.gate_proj.forward(&h)?;
            let u = blk.up_proj.forward(&h)?;
            let gated = if g.device().is_cpu() {
                crate::fused::relu2_gate(&g, &u)?
            } else {
                g.relu()?.sqr()?.mul(&u)?
            };
            let m = self.linear_input(&gated, &blk.ffn_sub_norm)?;
            x = blk.down_proj.forward_add(&m, &x)?;
        }
        let x = if x.device().is_cpu() {
            crate::fused::rms_norm(&x, self.final_norm.as_tensor(), s.rms_norm_eps)?
        } else {
            rms_norm(&x, &self.final_norm, s.rms_norm_eps)?
        };
        Ok(x.reshape((b * t, s.hidden_size))?)
    }

    /// The input of linear layers: RMSNorm of `x` with gain `w` (fused on the CPU). The
    /// layers quantize it themselves (BitLinear's activation quantizer).
    fn linear_input(&self, x: &Tensor, w: &Var) -> Result<Tensor> {
        let eps = self.shape.rms_norm_eps;
        if x.device().is_cpu() {
            return crate::fused::rms_norm(x, w.as_tensor(), eps);
        }
        rms_norm(x, w, eps)
    }

    /// Causal self-attention of one block over `h [b, t, d]`, the already normalised (and, for
    /// BitLinear, quantized) input of the q, k and v projections: fused on the CPU, composed
    /// from the RoPE tables and mask in `composed` elsewhere.
    fn attention(
        &self,
        blk: &Block,
        h: &Tensor,
        rope: &RopeAngles,
        composed: Option<&(Tensor, Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let s = &self.shape;
        let q = blk.q_proj.forward(h)?;
        let k = blk.k_proj.forward(h)?;
        let v = blk.v_proj.forward(h)?;
        match composed {
            None => causal_attention(&q, &k, &v, s.num_heads, s.num_kv_heads, rope),
            Some((cos, sin, mask)) => attention_composed(s, &q, &k, &v, cos, sin, mask),
        }
    }

    /// Mean cross-entropy of next-token prediction over `ids [batch, seq + 1]`.
    pub fn loss(&self, ids: &Tensor) -> Result<Tensor> {
        self.loss_with(ids, None)
    }

    /// The loss over `ids` (as [`Self::loss`]) and the gradients of every parameter: what a
    /// training step needs. The quantized model on the CPU runs each block as one operation
    /// with a hand-written backward pass (module `block`): the same forward bits as
    /// `loss(ids)?.backward()`, gradients equal to f32 rounding, less time spent in candle's
    /// graph. Elsewhere it is exactly `loss(ids)?.backward()`.
    pub fn loss_and_grads(&self, ids: &Tensor) -> Result<(Tensor, GradStore)> {
        if !(self.device.is_cpu() && self.quantize) {
            let loss = self.loss(ids)?;
            let grads = loss.backward()?;
            return Ok((loss, grads));
        }
        let sink = Arc::new(GradSink::default());
        let loss = self.loss_with(ids, Some(&sink))?;
        let mut grads = loss.backward()?;
        sink.drain_into(&mut grads)?;
        Ok((loss, grads))
    }

    /// [`Self::loss`] with the blocks' parameter gradients going to `sink` when given.
    fn loss_with(&self, ids: &Tensor, sink: Option<&Arc<GradSink>>) -> Result<Tensor> {
        let (_, n) = ids.dims2()?;
        let inputs = ids.narrow(1, 0, n - 1)?.contiguous()?;
        let targets = ids.narrow(1, 1, n - 1)?.flatten_all()?;
        if self.device.is_cpu() {
            // Head and loss as one operation: the logits stay out of the graph.
            let x = self.final_hidden(&inputs, sink)?;
            return crate::fused::head_loss(&x, self.head_weights(), &targets);
        }
        let flat = self.logits_with(&inputs, sink)?;
        Ok(candle_nn::loss::cross_entropy(&flat, &targets)?)
    }
}

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Var, eps: f32) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = ms.affine(1.0, eps as f64)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w.as_tensor())?)
}

/// Causal self-attention composed from candle primitives (the devices without the fused CPU
/// operation): `q [b, t, heads * hd]`, `k`, `v [b, t, kv_heads * hd]` (un-rotated projections),
/// RoPE tables `[t, hd]`, additive mask `[t, t]`.
pub(crate) fn attention_composed(
    s: &ModelShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let (b, t, _) = q.dims3()?;
    let hd = s.head_dim();
    let (nh, nkv) = (s.num_heads, s.num_kv_heads);
    let split = |x: &Tensor, heads: usize| -> Result<Tensor> {
        Ok(x.reshape((b, t, heads, hd))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let q = apply_rope(&split(q, nh)?, cos, sin)?;
    let k = apply_rope(&split(k, nkv)?, cos, sin)?;
    let v = split(v, nkv)?;
    let rep = nh / nkv;
    let expand = |x: Tensor| -> Result<Tensor> {
        if rep == 1 {
            return Ok(x);
        }
        Ok(x.unsqueeze(2)?
            .broadcast_as((b, nkv, rep, t, hd))?
            .reshape((b, nh, t, hd))?)
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = q.matmul(&k.t()?)?;
    let masked = scores.affine(scale, 0.0)?.broadcast_add(mask)?;
    let att = candle_nn::ops::softmax(&masked, D::Minus1)?;
    let y = att.matmul(&v)?; // [b, nh, t, hd]
    Ok(y.transpose(1, 2)?.reshape((b, t, nh * hd))?)
}

/// cos and sin tables `[t, head_dim]` of the angles (each half repeated, the rotate-half
/// convention).
pub(crate) fn rope_tables(rope: &RopeAngles, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = rope.half;
    let t = rope.cos.len() / half.max(1);
    let repeat = |a: &[f32]| -> Vec<f32> {
        a.chunks(half.max(1))
            .flat_map(|row| row.iter().chain(row).copied())
            .collect()
    };
    Ok((
        Tensor::from_vec(repeat(&rope.cos), (t, 2 * half), device)?,
        Tensor::from_vec(repeat(&rope.sin), (t, 2 * half), device)?,
    ))
}

/// `x * cos + rotate_half(x) * sin` for `x [b, h, t, hd]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok(x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)?)
}

/// `[t, t]` additive mask: 0 on and below the diagonal, -inf above.
pub(crate) fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(v, (t, t), device)?)
}
