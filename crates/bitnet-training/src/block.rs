//! One transformer block of the quantized model on the CPU as a single candle operation, its
//! backward pass written out by hand.
//!
//! Built from the fused per-layer operations, a block is a dozen graph nodes, and candle's
//! backward pass gives every node's activation-sized input gradient a zero-filled tensor and an
//! addition, on the one thread that walks the graph while the pool waits (about 90 ms of a
//! 1.5 s step at the training benchmark's size). As one node, a block has one such input, the
//! residual stream, and its backward pass runs on the pool. It computes what the per-layer
//! nodes compute, with the same functions (RMSNorm, BitLinear's exact integer forward and
//! straight-through products, the attention, the gate), so its forward pass gives the same
//! bits; its gradients agree with theirs to f32 rounding (the gradient products run on
//! `bitnet_quant::sgemm`, and the gradients of a shared input are summed in another order).
//! Being whole, it also quantizes the input that q, k and v share once, and that of gate and
//! up, and takes each group's gradients as one product per kind (their output gradients side
//! by side against their weights stacked): one input gradient, no additions of partial ones.
//!
//! A single-input operation cannot hand the parameters' gradients back through candle's graph,
//! so the block leaves them in a [`GradSink`], which
//! [`crate::model::Transformer::loss_and_grads`] merges into the gradient store after the
//! backward pass.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::attention::{CausalAttention, RopeAngles};
use crate::fused::{
    add_into, f32_slice, product, product_tn_codes, relu2_gate_grads, relu2_gate_values,
    rms_norm_grads, with_cpu_f32,
};
use crate::fused_linear::{QuantizedRows, TernaryLinear};
use crate::model::Block;
use crate::scratch;
use crate::Result;

/// The operation's name in error messages.
const BLOCK: &str = "transformer block";

/// Parameter gradients that block operations hand over outside candle's graph.
#[derive(Debug, Default)]
pub(crate) struct GradSink(Mutex<Vec<(Tensor, Tensor)>>);

impl GradSink {
    fn push(&self, param: &Tensor, grad: Tensor) -> candle_core::Result<()> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{BLOCK}: gradient sink poisoned")))?
            .push((param.clone(), grad));
        Ok(())
    }

    /// Moves every gradient left here into `grads`, adding it to one already there.
    pub(crate) fn drain_into(&self, grads: &mut GradStore) -> Result<()> {
        let mut held = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{BLOCK}: gradient sink poisoned")))?;
        for (param, grad) in held.drain(..) {
            let sum = match grads.remove(&param) {
                Some(prev) => prev.add(&grad)?,
                None => grad,
            };
            grads.insert(&param, sum);
        }
        Ok(())
    }
}

/// The block's linears, in the order of [`BlockOp::linears`].
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// The block's norms, in the order of [`BlockOp::norms`].
const ATTN_NORM: usize = 0;
const ATTN_SUB_NORM: usize = 1;
const FFN_NORM: usize = 2;
const FFN_SUB_NORM: usize = 3;

/// What the forward pass computed and the backward pass reads.
struct Saved {
    /// The linears' codes for this pass, in [`BlockOp::linears`] order.
    weights: Vec<TernaryLinear>,
    /// Quantized input of q, k and v.
    hq: QuantizedRows,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output (the input of `attn_sub_norm`).
    a: Vec<f32>,
    /// The attention's probabilities.
    probs: Vec<f32>,
    /// Quantized input of `o_proj`.
    aq: QuantizedRows,
    /// The residual stream after the attention half.
    x1: Vec<f32>,
    /// Quantized input of gate and up.
    h2q: QuantizedRows,
    g: Vec<f32>,
    u: Vec<f32>,
    /// The gate's output (the input of `ffn_sub_norm`).
    m: Vec<f32>,
    /// Quantized input of `down_proj`.
    mq: QuantizedRows,
}

impl Drop for Saved {
    fn drop(&mut self) {
        for v in [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.a,
            &mut self.probs,
            &mut self.x1,
            &mut self.g,
            &mut self.u,
            &mut self.m,
        ] {
            scratch::give_back(std::mem::take(v));
        }
    }
}

/// One block for one forward pass (a fresh operation per call).
pub(crate) struct BlockOp {
    hidden: usize,
    ffn: usize,
    q_width: usize,
    kv_width: usize,
    eps: f32,
    attention: CausalAttention,
    /// `attn_norm`, `attn_sub_norm`, `ffn_norm`, `ffn_sub_norm` gains.
    norms: [Tensor; 4],
    /// q, k, v, o, gate, up, down latent weights with their `s_w` (computed as the per-layer
    /// operation computes it, so the codes and the exported scale agree).
    linears: [(Tensor, f32); 7],
    saved: OnceLock<Saved>,
    sink: Arc<GradSink>,
}

impl BlockOp {
    /// The operation for `blk` with `heads` / `kv_heads` attention heads, RoPE by `rope`.
    pub(crate) fn new(
        blk: &Block,
        (heads, kv_heads): (usize, usize),
        rope: &RopeAngles,
        eps: f32,
        sink: &Arc<GradSink>,
    ) -> Result<BlockOp> {
        let scaled = |l: &crate::bitlinear::BitLinear| -> Result<(Tensor, f32)> {
            let w = l.weight().as_tensor().clone();
            let s_w = crate::bitlinear::weight_scale(&w)?
                .detach()
                .to_scalar::<f32>()?;
            Ok((w, s_w))
        };
        let linears = [
            scaled(&blk.q_proj)?,
            scaled(&blk.k_proj)?,
            scaled(&blk.v_proj)?,
            scaled(&blk.o_proj)?,
            scaled(&blk.gate_proj)?,
            scaled(&blk.up_proj)?,
            scaled(&blk.down_proj)?,
        ];
        let head_dim = 2 * rope.half;
        let hidden = linears[Q].0.dims2()?.1;
        let ffn = linears[GATE].0.dims2()?.0;
        let norms = [
            blk.attn_norm.as_tensor().clone(),
            blk.attn_sub_norm.as_tensor().clone(),
            blk.ffn_norm.as_tensor().clone(),
            blk.ffn_sub_norm.as_tensor().clone(),
        ];
        // The slice-level norms take their row width from the gain: check it here.
        let widths = [hidden, heads * head_dim, hidden, ffn];
        if let Some((n, w)) = norms.iter().zip(widths).find(|(n, w)| n.dims() != [*w]) {
            return Err(candle_core::Error::Msg(format!(
                "{BLOCK}: a norm gain of {:?} where rows are {w} wide",
                n.dims()
            ))
            .into());
        }
        Ok(BlockOp {
            hidden,
            ffn,
            q_width: heads * head_dim,
            kv_width: kv_heads * head_dim,
            eps,
            attention: CausalAttention::new(heads, kv_heads, rope)?,
            norms,
            linears,
            saved: OnceLock::new(),
            sink: sink.clone(),
        })
    }

    /// `[out, in]` of linear `i`.
    fn linear_dims(&self, i: usize) -> (usize, usize) {
        let (h, f, qw, kw) = (self.hidden, self.ffn, self.q_width, self.kv_width);
        match i {
            Q => (qw, h),
            K | V => (kw, h),
            O => (h, qw),
            GATE | UP => (f, h),
            _ => (h, f),
        }
    }

    /// The block's output for `x` (`batch * t` rows of `hidden`), keeping what the backward
    /// pass needs.
    fn output(&self, x: &[f32], batch: usize, t: usize) -> candle_core::Result<Vec<f32>> {
        let eps = self.eps;
        let weight_refs: [&Tensor; 7] = std::array::from_fn(|i| &self.linears[i].0);
        let weights = with_cpu_f32(weight_refs, BLOCK, |ws| {
            ws.iter()
                .enumerate()
                .map(|(i, w)| {
                    let (out_f, in_f) = self.linear_dims(i);
                    TernaryLinear::new(w, out_f, in_f, self.linears[i].1)
                })
                .collect::<candle_core::Result<Vec<_>>>()
        })?;
        let norm_refs: [&Tensor; 4] = std::array::from_fn(|i| &self.norms[i]);
        with_cpu_f32(norm_refs, BLOCK, |[an, asn, fnn, fsn]| {
            // Each linear's input is the RMSNorm of a stream, quantized row by row.
            let quantized = |v: &[f32], gain: &[f32], layer: usize| {
                QuantizedRows::normalized(v, gain, eps, weights[layer].padded_in())
            };
            let hq = quantized(x, an, Q);
            let (q, k, v) = (
                weights[Q].forward(&hq),
                weights[K].forward(&hq),
                weights[V].forward(&hq),
            );
            let (a, probs) = self.attention.forward_rows((&q, &k, &v), batch, t);
            let aq = quantized(&a, asn, O);
            let mut x1 = weights[O].forward(&aq);
            add_into(&mut x1, x);
            let h2q = quantized(&x1, fnn, GATE);
            let (g, u) = (weights[GATE].forward(&h2q), weights[UP].forward(&h2q));
            let m = relu2_gate_values(&g, &u);
            let mq = quantized(&m, fsn, DOWN);
            let mut out = weights[DOWN].forward(&mq);
            add_into(&mut out, &x1);
            // One forward per operation value (a fresh one per call), so this is set once.
            let _ = self.saved.set(Saved {
                weights,
                hq,
                q,
                k,
                v,
                a,
                probs,
                aq,
                x1,
                h2q,
                g,
                u,
                m,
                mq,
            });
            Ok(out)
        })
    }

    /// The straight-through products of linears `ids` for their output gradients `dy`
    /// (`[rows, sum of their outs]`, side by side in the order of `ids`) and their shared
    /// quantized input: the input's gradient `dy @ (codes / s_w)` and the weights' gradients
    /// `dy^T @ (q / s_x)`, each one product for all of the linears (their weights stacked),
    /// the weights' handed to the sink.
    fn linear_grads(
        &self,
        saved: &Saved,
        ids: &[usize],
        dy: &[f32],
        input: &QuantizedRows,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Vec<f32>> {
        let (rows, in_f) = (input.rows(), self.linear_dims(ids[0]).1);
        let width: usize = ids.iter().map(|&i| self.linear_dims(i).0).sum();
        // The linears' weights stacked, each written in full.
        let mut w_eff = scratch::take(width * in_f);
        let mut at = 0;
        for &i in ids {
            let part = self.linear_dims(i).0 * in_f;
            saved.weights[i].effective_into(&mut w_eff[at..at + part]);
            at += part;
        }
        let dx = product(dy, (rows, width), &w_eff, in_f, false, BLOCK)?;
        scratch::give_back(w_eff);
        let codes = input
            .codes()
            .map_err(|e| candle_core::Error::Msg(format!("{BLOCK}: {e}")))?;
        let mut dw = product_tn_codes(dy, (rows, width), codes, BLOCK)?;
        // The last linears' parts split off the end; what is left is the first one's.
        for (n, &i) in ids.iter().enumerate().rev() {
            let out_f = self.linear_dims(i).0;
            let part = if n == 0 {
                std::mem::take(&mut dw)
            } else {
                dw.split_off(dw.len() - out_f * in_f)
            };
            self.sink.push(
                &self.linears[i].0,
                Tensor::from_vec(part, (out_f, in_f), dev)?,
            )?;
        }
        Ok(dx)
    }

    /// RMSNorm `n`'s backward pass for input `x` and output gradient `g` (`width` wide): the
    /// input's gradient; the gain's goes to the sink.
    fn norm_grads(
        &self,
        n: usize,
        x: &[f32],
        g: &[f32],
        width: usize,
        w: &[f32],
    ) -> candle_core::Result<Vec<f32>> {
        let (dx, dw) = rms_norm_grads(x, w, g, self.eps);
        self.sink.push(
            &self.norms[n],
            Tensor::from_vec(dw, width, self.norms[n].device())?,
        )?;
        Ok(dx)
    }

    /// The input's gradient for output gradient `dy` (`[rows, hidden]`), with every
    /// parameter's gradient handed to the sink.
    fn grads(&self, x: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
        let Some(s) = self.saved.get() else {
            candle_core::bail!("{BLOCK}: backward pass without a CPU forward pass");
        };
        let (h, f, qw) = (self.hidden, self.ffn, self.q_width);
        let dev = x.device();
        let (batch, t) = (x.dims()[0], x.dims()[1]);
        let rows = batch * t;
        let dy = dy.contiguous()?.reshape((rows, h))?;
        let norm_refs: [&Tensor; 4] = std::array::from_fn(|i| &self.norms[i]);
        let dx = with_cpu_f32([x, &dy], BLOCK, |[x, dy_v]| {
            with_cpu_f32(norm_refs, BLOCK, |[an, asn, fnn, fsn]| {
                // Feed-forward half: down, its norm, the gate, gate and up, their norm.
                // Each activation-sized gradient goes back to the scratch pool after its
                // last use.
                let dmn = self.linear_grads(s, &[DOWN], dy_v, &s.mq, dev)?;
                let dm = self.norm_grads(FFN_SUB_NORM, &s.m, &dmn, f, fsn)?;
                scratch::give_back(dmn);
                // Both halves written for every row.
                let mut dgu = scratch::take(2 * dm.len());
                relu2_gate_grads(&s.g, &s.u, &dm, f, &mut dgu);
                scratch::give_back(dm);
                let dh2 = self.linear_grads(s, &[GATE, UP], &dgu, &s.h2q, dev)?;
                scratch::give_back(dgu);
                let mut dx1 = self.norm_grads(FFN_NORM, &s.x1, &dh2, h, fnn)?;
                scratch::give_back(dh2);
                add_into(&mut dx1, dy_v);
                // Attention half: o, its norm, the attention, q/k/v, their norm.
                let dan = self.linear_grads(s, &[O], &dx1, &s.aq, dev)?;
                let da = self.norm_grads(ATTN_SUB_NORM, &s.a, &dan, qw, asn)?;
                scratch::give_back(dan);
                let dqkv = self.attention.backward_rows(
                    (&s.q, &s.k, &s.v),
                    (&s.a, &da),
                    &s.probs,
                    batch,
                    t,
                );
                scratch::give_back(da);
                let dh = self.linear_grads(s, &[Q, K, V], &dqkv, &s.hq, dev)?;
                scratch::give_back(dqkv);
                let mut dx = self.norm_grads(ATTN_NORM, x, &dh, h, an)?;
                scratch::give_back(dh);
                add_into(&mut dx, &dx1);
                scratch::give_back(dx1);
                Ok(dx)
            })
        })?;
        Tensor::from_vec(dx, x.shape(), dev)
    }
}

impl CustomOp1 for BlockOp {
    fn name(&self) -> &'static str {
        "bitnet-transformer-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, BLOCK)?;
        let &[batch, t, h] = l.dims() else {
            candle_core::bail!("{BLOCK}: input {:?} is not [batch, t, hidden]", l.dims());
        };
        if h != self.hidden {
            candle_core::bail!("{BLOCK}: rows of {h} for a hidden size of {}", self.hidden);
        }
        let out = self.output(x, batch, t)?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.grads(x, grad)?))
    }
}

/// `blk` applied to the residual stream `x [batch, t, hidden]` as one operation, its
/// parameters' gradients left in `sink` by the backward pass. CPU f32 tensors only.
pub(crate) fn block_forward(
    blk: &Block,
    x: &Tensor,
    (heads, kv_heads): (usize, usize),
    rope: &RopeAngles,
    eps: f32,
    sink: &Arc<GradSink>,
) -> Result<Tensor> {
    let op = BlockOp::new(blk, (heads, kv_heads), rope, eps, sink)?;
    Ok(x.contiguous()?.apply_op1(op)?)
}

#[cfg(test)]
mod tests {
    use crate::config::ModelShape;
    use crate::model::Transformer;
    use crate::testing::{diff, max_abs};
    use candle_core::{Device, Tensor};

    #[test]
    fn a_norm_of_the_wrong_width_is_an_error() {
        let shape = ModelShape {
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            vocab_size: 11,
            rms_norm_eps: 1e-5,
            rope_theta: 500.0,
            tie_word_embeddings: true,
        };
        let m = Transformer::new(&shape, true, 3, &Device::Cpu).unwrap();
        let mut blk = m.blocks[0].clone();
        blk.ffn_sub_norm =
            candle_core::Var::ones(16, candle_core::DType::F32, &Device::Cpu).unwrap();
        let rope = crate::attention::RopeAngles::new(500.0, 8, 4);
        let sink = std::sync::Arc::new(super::GradSink::default());
        let x = Tensor::zeros((1, 4, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = super::block_forward(&blk, &x, (2, 1), &rope, 1e-5, &sink).unwrap_err();
        assert!(
            err.to_string()
                .contains("norm gain of [16] where rows are 24"),
            "{err}"
        );
    }

    /// The block operations against the per-operation graph on a small model with odd widths
    /// (rows padded for the kernels), grouped KV heads and an untied head: the same loss bits
    /// (same functions in the same order) and every parameter's gradient equal to f32
    /// rounding (sums taken in another order).
    #[test]
    fn block_operations_match_the_per_operation_graph() {
        for tied in [true, false] {
            let shape = ModelShape {
                hidden_size: 48,
                intermediate_size: 80,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: 2,
                vocab_size: 37,
                rms_norm_eps: 1e-5,
                rope_theta: 500.0,
                tie_word_embeddings: tied,
            };
            let m = Transformer::new(&shape, true, 11, &Device::Cpu).unwrap();
            let ids: Vec<u32> = (0..3 * 10).map(|i| (i * 7 + i / 5) % 37).collect();
            let ids = Tensor::from_vec(ids, (3, 10), &Device::Cpu).unwrap();
            // Twice: the second pass runs on the buffers the first gave back to the scratch
            // pool, stale values in them, and must give the same bits.
            let (first, first_grads) = m.loss_and_grads(&ids).unwrap();
            let (loss, grads) = m.loss_and_grads(&ids).unwrap();
            assert_eq!(
                first.to_scalar::<f32>().unwrap().to_bits(),
                loss.to_scalar::<f32>().unwrap().to_bits()
            );
            for (name, var) in m.named_params() {
                let (a, b) = (first_grads.get(&var).unwrap(), grads.get(&var).unwrap());
                assert_eq!(
                    a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    "{name}"
                );
            }
            let want_loss = m.loss(&ids).unwrap();
            let want = want_loss.backward().unwrap();
            assert_eq!(
                loss.to_scalar::<f32>().unwrap().to_bits(),
                want_loss.to_scalar::<f32>().unwrap().to_bits()
            );
            for (name, var) in m.named_params() {
                let (got, exp) = (grads.get(&var), want.get(&var));
                let (Some(got), Some(exp)) = (got, exp) else {
                    panic!("{name}: gradient missing");
                };
                let scale = max_abs(exp);
                assert!(scale > 0.0, "{name}: zero gradient");
                let d = diff(got, exp);
                assert!(d <= 1e-5 * scale, "{name}: {d} off (of {scale})");
            }
        }
    }
}
