//! The BitNet b1.58 transformer (FORMATS.md section 1) and its batched forward pass.

mod dense;
mod load;
mod load_gguf;
pub mod ops;

use bitnet_core::ScratchArena;
use bitnet_quant::kernels::Kernels;
use bitnet_quant::{BitLinear, WeightLayout};
use rayon::prelude::*;

pub use dense::{DenseFormat, DenseMatrix};
pub use load_gguf::{config_from_gguf, GgufOptions, GGUF_ARCHITECTURES, I2S_LAYOUT_KEY};

use crate::config::{Activation, ModelConfig};
use crate::kv_cache::{KvCache, KvLayer, KvType};
use crate::{Error, Result};

/// Parallel attention tasks per worker thread: enough to balance uneven sequence lengths.
const ATTENTION_TASKS_PER_THREAD: usize = 4;

/// Cached positions attention takes at a time for every query head of a unit: 32 rows of
/// keys or values are 16 KB at head size 128 in f32, so they stay in L1 between heads.
const ATTENTION_ROWS: usize = 32;

/// Token rows per task of the element-wise passes (the FFN activation, the residual adds):
/// a prefill's rows are shared by the workers, a decode step's one row stays on the caller.
const ELEMENTWISE_ROWS: usize = 4;

/// One decoder layer's weights.
#[derive(Debug, Clone)]
pub struct Layer {
    /// RMSNorm before attention, `[hidden]`.
    pub attn_norm: Vec<f32>,
    /// Query projection `[heads * head_dim, hidden]`.
    pub q: BitLinear,
    /// Key projection `[kv_heads * head_dim, hidden]`.
    pub k: BitLinear,
    /// Value projection `[kv_heads * head_dim, hidden]`.
    pub v: BitLinear,
    /// RMSNorm of the attention output, `[heads * head_dim]`.
    pub attn_sub_norm: Vec<f32>,
    /// Output projection `[hidden, heads * head_dim]`.
    pub o: BitLinear,
    /// RMSNorm before the FFN, `[hidden]`.
    pub ffn_norm: Vec<f32>,
    /// Gate projection `[ffn, hidden]`.
    pub gate: BitLinear,
    /// Up projection `[ffn, hidden]`.
    pub up: BitLinear,
    /// RMSNorm of the FFN's inner activation, `[ffn]`.
    pub ffn_sub_norm: Vec<f32>,
    /// Down projection `[hidden, ffn]`.
    pub down: BitLinear,
}

impl Layer {
    /// The layer with each ternary linear replaced by `f(linear)` and the norms kept (for
    /// instance the steps rounded as a file format stores them).
    pub fn map_linears(&self, f: impl Fn(&BitLinear) -> BitLinear) -> Layer {
        let Ok(layer) = self.try_map_linears(|l| Ok::<_, std::convert::Infallible>(f(l)));
        layer
    }

    /// [`Self::map_linears`] with a fallible `f`: its first error, if any.
    pub fn try_map_linears<E>(
        &self,
        f: impl Fn(&BitLinear) -> std::result::Result<BitLinear, E>,
    ) -> std::result::Result<Layer, E> {
        Ok(Layer {
            q: f(&self.q)?,
            k: f(&self.k)?,
            v: f(&self.v)?,
            o: f(&self.o)?,
            gate: f(&self.gate)?,
            up: f(&self.up)?,
            down: f(&self.down)?,
            ..self.clone()
        })
    }

    /// The layer's ternary linears with their names (q, k, v, o, gate, up, down).
    pub fn linears(&self) -> [(&'static str, &BitLinear); 7] {
        [
            ("q_proj", &self.q),
            ("k_proj", &self.k),
            ("v_proj", &self.v),
            ("o_proj", &self.o),
            ("gate_proj", &self.gate),
            ("up_proj", &self.up),
            ("down_proj", &self.down),
        ]
    }
}

/// Which positions of a sequence step need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// None (the step only fills the cache).
    None,
    /// The last token of the step (sampling).
    Last,
    /// Every token of the step (scoring, perplexity).
    All,
}

/// One sequence's part of a batched forward step: new tokens, its cache, what to return.
#[derive(Debug)]
pub struct SeqStep<'a> {
    /// Tokens to append, at positions `cache.len()..`.
    pub tokens: &'a [u32],
    /// The sequence's KV cache; it grows by `tokens.len()` positions.
    pub cache: &'a mut KvCache,
    /// Which of these positions need logits.
    pub logits: LogitsFor,
}

impl SeqStep<'_> {
    fn logit_rows(&self) -> usize {
        match self.logits {
            LogitsFor::None => 0,
            LogitsFor::Last => usize::from(!self.tokens.is_empty()),
            LogitsFor::All => self.tokens.len(),
        }
    }
}

/// A loaded BitNet b1.58 model, ready to run.
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    embed: DenseMatrix,
    head: Option<DenseMatrix>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
    kernels: &'static Kernels,
    kv_type: KvType,
}

impl Model {
    /// Assembles a model from its parts, checking every shape against `config`.
    pub fn new(
        config: ModelConfig,
        embed: DenseMatrix,
        head: Option<DenseMatrix>,
        norm: Vec<f32>,
        layers: Vec<Layer>,
    ) -> Result<Self> {
        config.validate()?;
        let (h, qd, kvd, f) = (
            config.hidden_size,
            config.q_dim(),
            config.kv_dim(),
            config.intermediate_size,
        );
        let shape_err = |name: String, expected: Vec<usize>, found: Vec<usize>| {
            Err(Error::TensorShape {
                name,
                expected,
                found,
            })
        };
        for (name, m) in
            std::iter::once(("embedding", &embed)).chain(head.iter().map(|m| ("output head", m)))
        {
            if (m.rows(), m.cols()) != (config.vocab_size, h) {
                return shape_err(
                    name.into(),
                    vec![config.vocab_size, h],
                    vec![m.rows(), m.cols()],
                );
            }
        }
        if norm.len() != h {
            return shape_err("final norm".into(), vec![h], vec![norm.len()]);
        }
        if layers.len() != config.num_layers {
            return Err(Error::Config(format!(
                "{} layers given, config says {}",
                layers.len(),
                config.num_layers
            )));
        }
        for (i, l) in layers.iter().enumerate() {
            let want = [(qd, h), (kvd, h), (kvd, h), (h, qd), (f, h), (f, h), (h, f)];
            for ((name, lin), (o, k)) in l.linears().into_iter().zip(want) {
                if (lin.out_features(), lin.in_features()) != (o, k) {
                    return shape_err(
                        format!("layer {i} {name}"),
                        vec![o, k],
                        vec![lin.out_features(), lin.in_features()],
                    );
                }
            }
            for (name, n, len) in [
                ("attn_norm", &l.attn_norm, h),
                ("attn_sub_norm", &l.attn_sub_norm, qd),
                ("ffn_norm", &l.ffn_norm, h),
                ("ffn_sub_norm", &l.ffn_sub_norm, f),
            ] {
                if n.len() != len {
                    return shape_err(format!("layer {i} {name}"), vec![len], vec![n.len()]);
                }
            }
        }
        let mut inv_freq = vec![0.0; config.head_dim / 2];
        ops::rope_inv_freq(config.rope_theta, config.head_dim, &mut inv_freq);
        Ok(Model {
            config,
            embed,
            head,
            norm,
            layers,
            inv_freq,
            kernels: Kernels::get(),
            kv_type: KvType::F32,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The decoder layers.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The token embedding.
    pub fn embedding(&self) -> &DenseMatrix {
        &self.embed
    }

    /// The final RMSNorm's weights.
    pub fn final_norm(&self) -> &[f32] {
        &self.norm
    }

    /// The output head (the embedding when tied).
    pub fn head(&self) -> &DenseMatrix {
        self.head.as_ref().unwrap_or(&self.embed)
    }

    /// Re-encodes the output head in `format` (for a tied model the embedding stays as it is
    /// for lookups and the head becomes a separate matrix). The head is the largest single
    /// stream of weights per generated token, so a smaller format speeds decoding up.
    pub fn set_head_format(&mut self, format: DenseFormat) -> Result<()> {
        let src = self.head();
        if src.format() == format {
            return Ok(());
        }
        let (rows, cols) = (src.rows(), src.cols());
        let row_bytes = format.row_bytes(cols).ok_or_else(|| {
            Error::InvalidInput(format!(
                "the head's rows of {cols} values do not fit {} blocks",
                format.name()
            ))
        })?;
        let mut buf = bitnet_core::AlignedBuffer::zeroed(rows * row_bytes);
        src.encode_rows(format, buf.as_mut_bytes());
        self.head = Some(DenseMatrix::new(
            "output head",
            format,
            rows,
            cols,
            bitnet_core::Storage::heap(buf),
        )?);
        Ok(())
    }

    /// Repacks every ternary layer into `layout` ([`WeightLayout::Base3`]: 20% fewer bytes
    /// per token, about twice the decoding work; see the README). The products stay exact,
    /// so the logits do not change. Fails, leaving the model as it was, for models whose
    /// layers carry per-block scales (they stay in the 2-bit layout).
    pub fn set_weight_layout(&mut self, layout: WeightLayout) -> Result<()> {
        let layers = self
            .layers
            .iter()
            .map(|l| l.try_map_linears(|lin| lin.with_layout(layout)))
            .collect::<bitnet_quant::Result<Vec<_>>>()?;
        self.layers = layers;
        Ok(())
    }

    /// The runtime layout of the ternary layers (that of the first; all share it).
    pub fn weight_layout(&self) -> WeightLayout {
        self.layers
            .first()
            .map_or(WeightLayout::default(), |l| l.q.weight().layout())
    }

    /// The kernel set in use.
    pub fn kernels(&self) -> &'static Kernels {
        self.kernels
    }

    /// Uses `kernels` instead of the detected set (to compare implementations).
    pub fn set_kernels(&mut self, kernels: &'static Kernels) {
        self.kernels = kernels;
    }

    /// A KV cache for this model holding up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::with_type(&self.config, capacity, self.kv_type)
    }

    /// The type of the caches [`Self::new_cache`] makes (f32 unless set).
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Makes [`Self::new_cache`] store keys and values as `kv_type` (caches made before keep
    /// theirs; [`Self::forward`] reads either).
    pub fn set_kv_type(&mut self, kv_type: KvType) {
        self.kv_type = kv_type;
    }

    /// Bytes of weights streamed per generated token (ternary layers plus the head).
    pub fn weight_bytes_per_token(&self) -> usize {
        let ternary: usize = self
            .layers
            .iter()
            .flat_map(|l| l.linears())
            .map(|(_, lin)| lin.weight().bytes().len())
            .sum();
        ternary + self.head().bytes()
    }

    /// Number of logit rows `forward` writes for `batch` (each `vocab_size` wide).
    pub fn logit_rows(batch: &[SeqStep<'_>]) -> usize {
        batch.iter().map(SeqStep::logit_rows).sum()
    }

    fn check_batch(&self, batch: &[SeqStep<'_>], logits_len: usize) -> Result<()> {
        let vocab = self.config.vocab_size;
        for (s, step) in batch.iter().enumerate() {
            if !step.cache.fits(&self.config) {
                return Err(Error::InvalidInput(format!(
                    "sequence {s}: KV cache was made for another model"
                )));
            }
            if step.tokens.len() > step.cache.remaining() {
                return Err(Error::InvalidInput(format!(
                    "sequence {s}: {} new tokens do not fit its KV cache ({} of {} positions used)",
                    step.tokens.len(),
                    step.cache.len(),
                    step.cache.capacity()
                )));
            }
            if let Some(&bad) = step.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::InvalidInput(format!(
                    "token id {bad} is outside the vocabulary (size {vocab})"
                )));
            }
        }
        let want = Self::logit_rows(batch) * vocab;
        if logits_len != want {
            return Err(Error::InvalidInput(format!(
                "logits buffer holds {logits_len} values, the batch needs {want}"
            )));
        }
        Ok(())
    }

    /// Runs one step for a batch of sequences: appends each sequence's tokens to its cache and
    /// writes the logits it asked for into `logits` (rows in batch order, `vocab_size` wide;
    /// see [`Model::logit_rows`]). Working memory comes from `scratch`, so repeated steps of
    /// the same size allocate nothing. Nothing is changed if the batch is invalid. A logit
    /// that comes out NaN or infinite is an error ([`Error::NonFinite`]), raised before the
    /// caches of that sequence and the ones after it advance.
    pub fn forward(
        &self,
        batch: &mut [SeqStep<'_>],
        scratch: &mut ScratchArena,
        logits: &mut [f32],
    ) -> Result<()> {
        self.check_batch(batch, logits.len())?;
        let cfg = &self.config;
        let (h, qd, kvd, f) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let t_all: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if t_all == 0 {
            return Ok(());
        }
        // Attention score rows: a unit's heads for each parallel task (see `Attention::run`;
        // never more than one per (token, head) pair), as long as the largest cache, so the
        // arena keeps one size for the whole life of a set of caches (no growth per token).
        let ctx_cap = batch.iter().map(|s| s.cache.capacity()).max().unwrap_or(0);
        let threads = rayon::current_num_threads();
        let tasks = threads * ATTENTION_TASKS_PER_THREAD;
        let wide = h.max(qd).max(f);
        // Room for the widest input row in either runtime layout.
        let kpad = bitnet_quant::TernaryMatrix::padded_cols(wide)
            .max(bitnet_quant::Base3Matrix::padded_cols(wide));
        // Integer sums of the widest step: q, k and v together, or gate and up together.
        let acc_width = wide.max(qd + 2 * kvd).max(2 * f);
        let ([x, nb, q, k, v, att, proj, gate, up, scores, sx, rope, head_d], [xq], [acc]) =
            scratch.carve(
                [
                    t_all * h,
                    h,
                    t_all * qd,
                    t_all * kvd,
                    t_all * kvd,
                    t_all * qd,
                    t_all * h,
                    t_all * f,
                    t_all * f,
                    (t_all * nh).min(2 * tasks * (nh / nkv)) * ctx_cap,
                    t_all,
                    t_all * hd,
                    // The scales of the final hidden state's Q8_0 blocks (a Q8_0 head only).
                    h.div_ceil(32),
                ],
                [t_all * kpad],
                [t_all * acc_width],
            );

        // Embeddings and the RoPE angles of every new position (shared by all layers).
        let mut t = 0;
        for step in batch.iter() {
            for (i, &tok) in step.tokens.iter().enumerate() {
                self.embed
                    .row_to_f32(tok as usize, &mut x[t * h..(t + 1) * h]);
                ops::rope_angles(
                    &self.inv_freq,
                    step.cache.len() + i,
                    &mut rope[t * hd..(t + 1) * hd],
                );
                t += 1;
            }
        }

        let kern = self.kernels;
        let eps = cfg.rms_norm_eps;
        let scale = (hd as f64).powf(-0.5) as f32;
        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block.
            norm_quantize(kern, x, &layer.attn_norm, eps, xq, sx, layer.q.padded_in());
            let xk = &xq[..t_all * layer.q.padded_in()];
            // q, k and v read the same input: one parallel region for the three (a region
            // costs a wake-up of the other workers, a few hundred of them per token).
            let (acc_q, rest) = acc.split_at_mut(t_all * qd);
            let (acc_k, rest) = rest.split_at_mut(t_all * kvd);
            let acc_v = &mut rest[..t_all * kvd];
            let sx_all = &*sx;
            rayon::join(
                || layer.q.forward_quantized(kern, xk, sx_all, acc_q, q),
                || {
                    rayon::join(
                        || layer.k.forward_quantized(kern, xk, sx_all, acc_k, k),
                        || layer.v.forward_quantized(kern, xk, sx_all, acc_v, v),
                    )
                },
            );

            let mut t0 = 0;
            for step in batch.iter_mut() {
                let n = step.tokens.len();
                let start = step.cache.len();
                for i in 0..n {
                    let t = t0 + i;
                    let cs = &rope[t * hd..(t + 1) * hd];
                    for head in q[t * qd..(t + 1) * qd].chunks_exact_mut(hd) {
                        ops::rope_apply(head, cs);
                    }
                    let kt = &mut k[t * kvd..(t + 1) * kvd];
                    for head in kt.chunks_exact_mut(hd) {
                        ops::rope_apply(head, cs);
                    }
                    step.cache
                        .write_row(li, start + i, kt, &v[t * kvd..(t + 1) * kvd]);
                }
                let at = Attention {
                    kern,
                    q: &q[t0 * qd..(t0 + n) * qd],
                    start,
                    heads: nh,
                    group: nh / nkv,
                    heads_per_unit: heads_per_unit(n, nh, nh / nkv, threads),
                    head_dim: hd,
                    kv_dim: kvd,
                    scale,
                    tasks,
                };
                let out = &mut att[t0 * qd..(t0 + n) * qd];
                match step.cache.layer(li) {
                    KvLayer::F32 { keys, values } => at.run(keys, values, out, scores, ctx_cap),
                    KvLayer::F16 { keys, values } => at.run(keys, values, out, scores, ctx_cap),
                }
                t0 += n;
            }
            norm_quantize(
                kern,
                att,
                &layer.attn_sub_norm,
                eps,
                xq,
                sx,
                layer.o.padded_in(),
            );
            layer.o.forward_quantized(
                kern,
                &xq[..t_all * layer.o.padded_in()],
                sx,
                &mut acc[..t_all * h],
                proj,
            );
            add_in_place(x, proj, h);

            // Feed-forward block.
            norm_quantize(
                kern,
                x,
                &layer.ffn_norm,
                eps,
                xq,
                sx,
                layer.gate.padded_in(),
            );
            let xk = &xq[..t_all * layer.gate.padded_in()];
            let (acc_g, rest) = acc.split_at_mut(t_all * f);
            let acc_u = &mut rest[..t_all * f];
            let sx_all = &*sx;
            rayon::join(
                || layer.gate.forward_quantized(kern, xk, sx_all, acc_g, gate),
                || layer.up.forward_quantized(kern, xk, sx_all, acc_u, up),
            );
            let activation = cfg.activation;
            gate.par_chunks_mut(f * ELEMENTWISE_ROWS)
                .zip(up.par_chunks(f * ELEMENTWISE_ROWS))
                .for_each(|(gate, up)| match activation {
                    Activation::Relu2 => gate.iter_mut().zip(up).for_each(|(g, &u)| {
                        let r = g.max(0.0);
                        *g = (r * r) * u;
                    }),
                    Activation::Silu => gate.iter_mut().zip(up).for_each(|(g, &u)| {
                        *g = (*g / (1.0 + (-*g).exp())) * u;
                    }),
                });
            norm_quantize(
                kern,
                gate,
                &layer.ffn_sub_norm,
                eps,
                xq,
                sx,
                layer.down.padded_in(),
            );
            layer.down.forward_quantized(
                kern,
                &xq[..t_all * layer.down.padded_in()],
                sx,
                &mut acc[..t_all * h],
                proj,
            );
            add_in_place(x, proj, h);
        }

        // Final norm and head, only for the rows that asked for logits.
        let vocab = cfg.vocab_size;
        let head = self.head();
        let mut row = 0;
        let mut t0 = 0;
        for step in batch.iter_mut() {
            let n = step.tokens.len();
            let first = match step.logits {
                LogitsFor::None => n,
                LogitsFor::Last => n.saturating_sub(1),
                LogitsFor::All => 0,
            };
            for t in t0 + first..t0 + n {
                let xn = &mut nb[..h];
                ops::rms_norm(&x[t * h..(t + 1) * h], &self.norm, eps, xn);
                // The layers are done with `xq`: it holds a Q8_0 head's int8 activations.
                let out = &mut logits[row * vocab..(row + 1) * vocab];
                head.matvec(self.kernels, xn, xq, head_d, out);
                // One pass over a row the head has just written (a vocabulary's worth of
                // compares against its vocabulary x hidden products): a NaN or infinite weight
                // anywhere upstream ends here, and must not reach the sampler as silent noise.
                if let Some(bad) = out.iter().position(|v| !v.is_finite()) {
                    return Err(Error::NonFinite(format!(
                        "logit {bad} of position {} is {}: a weight, scale or norm of the \
                         model is NaN or infinite (a damaged file?)",
                        step.cache.len() + t - t0,
                        out[bad]
                    )));
                }
                row += 1;
            }
            step.cache.advance(n);
            t0 += n;
        }
        Ok(())
    }
}

/// Causal attention of one sequence's new tokens over its cache, in parallel units of
/// `heads_per_unit` query heads that share a KV head (one token's).
struct Attention<'a> {
    kern: &'static Kernels,
    /// The new tokens' queries (after RoPE), `[n, heads * head_dim]`.
    q: &'a [f32],
    /// Cache positions before the new tokens.
    start: usize,
    heads: usize,
    /// Query heads per KV head.
    group: usize,
    /// Query heads per parallel unit: a divisor of `group` (see [`heads_per_unit`]).
    heads_per_unit: usize,
    head_dim: usize,
    kv_dim: usize,
    /// `1 / sqrt(head_dim)`.
    scale: f32,
    /// Parallel tasks to aim for (each takes a run of units).
    tasks: usize,
}

impl Attention<'_> {
    /// Writes each (token, head)'s softmax-weighted sum of values into `out` (laid out as
    /// `q`). `scores` holds `heads_per_unit` rows of `ctx_cap` per task: at most one row per
    /// (token, head) pair and at most `2 * tasks * heads_per_unit` rows in all.
    fn run<E: CacheValue>(
        &self,
        keys: &[E],
        values: &[E],
        out: &mut [f32],
        scores: &mut [f32],
        ctx_cap: usize,
    ) {
        let (hd, s) = (self.head_dim, self.heads_per_unit);
        let units = out.len() / (s * hd);
        // Rounded down, so that a few units more than tasks still give every task one (a
        // decode step's 5 or 10 units over 2 threads), at the price of up to twice the tasks.
        let per_task = (units / self.tasks).max(1);
        // Every task must meet its own score rows (`zip` would drop the tasks past them).
        let need = units.div_ceil(per_task) * s * ctx_cap;
        assert!(
            scores.len() >= need,
            "{} score values, {need} needed",
            scores.len()
        );
        out.par_chunks_mut(per_task * s * hd)
            .zip(scores.par_chunks_mut(s * ctx_cap))
            .enumerate()
            .for_each(|(task, (outs, sc))| {
                for (p, out) in outs.chunks_exact_mut(s * hd).enumerate() {
                    // The unit's first (token, head) pair, `q` and `out` being laid out by pair.
                    let first = (task * per_task + p) * s;
                    let (i, head) = (first / self.heads, first % self.heads);
                    let q = &self.q[first * hd..(first + s) * hd];
                    let kv = (head / self.group) * hd;
                    let len = self.start + i + 1;
                    self.unit(q, &keys[kv..], &values[kv..], out, sc, ctx_cap, len);
                }
            });
    }

    /// One unit: the queries `q` (`heads_per_unit` heads) over the first `len` cached rows of
    /// their KV head (`keys` and `values` start at its first row's columns), into `out`.
    /// The rows are walked [`ATTENTION_ROWS`] at a time, every head of the unit taking them
    /// while they are in L1, so the cache is read from memory once per KV head rather than
    /// once per query head. Each score and each output sees the same operations in the same
    /// order as a head computed alone, so the grouping does not change a bit.
    #[allow(clippy::too_many_arguments)]
    fn unit<E: CacheValue>(
        &self,
        q: &[f32],
        keys: &[E],
        values: &[E],
        out: &mut [f32],
        sc: &mut [f32],
        ctx_cap: usize,
        len: usize,
    ) {
        let (hd, kvd) = (self.head_dim, self.kv_dim);
        for j0 in (0..len).step_by(ATTENTION_ROWS) {
            let j1 = (j0 + ATTENTION_ROWS).min(len);
            let k = &keys[j0 * kvd..];
            for (qg, sg) in q.chunks_exact(hd).zip(sc.chunks_mut(ctx_cap)) {
                E::scores(self.kern, qg, k, kvd, &mut sg[j0..j1]);
            }
        }
        for sg in sc.chunks_mut(ctx_cap) {
            (self.kern.softmax)(&mut sg[..len], self.scale);
        }
        out.fill(0.0);
        for j0 in (0..len).step_by(ATTENTION_ROWS) {
            let j1 = (j0 + ATTENTION_ROWS).min(len);
            let v = &values[j0 * kvd..];
            for (og, sg) in out.chunks_exact_mut(hd).zip(sc.chunks(ctx_cap)) {
                E::mix(self.kern, og, &sg[j0..j1], v, kvd);
            }
        }
    }
}

/// Query heads per parallel attention unit: the largest divisor `s` of `group` (query heads
/// per KV head) that still gives every one of `threads` workers a unit (`tokens * heads / s`
/// units), or 1. Decoding reads the whole cache once per unit of a KV head and is bound by
/// memory there, so fewer, larger units win even when they do not split evenly: on two
/// threads, at 1024 cached positions of the 2B-4T shape (20 heads, 5 KV heads), units of 4
/// heads decoded at 10.95 and 10.74 tokens/s, of 2 at 10.89 and 9.46, single heads at 8.80
/// and 9.96 (two alternating runs).
fn heads_per_unit(tokens: usize, heads: usize, group: usize, threads: usize) -> usize {
    (1..=group)
        .rev()
        .filter(|s| group.is_multiple_of(*s))
        .find(|&s| tokens * heads / s >= threads)
        .unwrap_or(1)
}

/// An element of the KV cache, with the kernels that read it.
trait CacheValue: Copy + Send + Sync {
    /// `scores[j] = q . keys[j * stride..]` (see [`bitnet_quant::kernels::ScoreRowsFn`]).
    fn scores(kern: &Kernels, q: &[f32], keys: &[Self], stride: usize, scores: &mut [f32]);
    /// `out += sum_j w[j] * values[j * stride..]` (see [`bitnet_quant::kernels::MixRowsFn`]).
    fn mix(kern: &Kernels, out: &mut [f32], w: &[f32], values: &[Self], stride: usize);
}

impl CacheValue for f32 {
    fn scores(kern: &Kernels, q: &[f32], keys: &[f32], stride: usize, scores: &mut [f32]) {
        (kern.score_rows_f32)(q, keys, stride, scores)
    }
    fn mix(kern: &Kernels, out: &mut [f32], w: &[f32], values: &[f32], stride: usize) {
        (kern.mix_rows_f32)(out, w, values, stride)
    }
}

impl CacheValue for half::f16 {
    fn scores(kern: &Kernels, q: &[f32], keys: &[half::f16], stride: usize, scores: &mut [f32]) {
        (kern.score_rows_f16)(q, keys, stride, scores)
    }
    fn mix(kern: &Kernels, out: &mut [f32], w: &[f32], values: &[half::f16], stride: usize) {
        (kern.mix_rows_f16)(out, w, values, stride)
    }
}

/// RMSNorm with gain `w` of each `w.len()`-wide row of `src` fused with per-token int8
/// quantization into `xq` (rows `kpad` long), scales in `sx`; one row per task.
fn norm_quantize(
    kern: &Kernels,
    src: &[f32],
    w: &[f32],
    eps: f32,
    xq: &mut [i8],
    sx: &mut [f32],
    kpad: usize,
) {
    let rows = sx.len();
    xq[..rows * kpad]
        .par_chunks_mut(kpad)
        .zip(sx.par_iter_mut())
        .zip(src.par_chunks(w.len()))
        .for_each(|((q, s), x)| *s = (kern.rms_norm_quantize)(x, w, eps, q));
}

/// `x += y` over `width`-wide rows, [`ELEMENTWISE_ROWS`] rows per task.
fn add_in_place(x: &mut [f32], y: &[f32], width: usize) {
    x.par_chunks_mut(width * ELEMENTWISE_ROWS)
        .zip(y.par_chunks(width * ELEMENTWISE_ROWS))
        .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(a, &b)| *a += b));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_group_heads_while_every_thread_has_one() {
        // One decode token of the 2B-4T shape (20 heads, 4 per KV head): 5 units of 4 heads
        // while there are at most 5 threads.
        assert_eq!(heads_per_unit(1, 20, 4, 1), 4);
        assert_eq!(heads_per_unit(1, 20, 4, 2), 4);
        assert_eq!(heads_per_unit(1, 20, 4, 5), 4);
        assert_eq!(heads_per_unit(1, 20, 4, 8), 2);
        assert_eq!(heads_per_unit(1, 20, 4, 16), 1);
        assert_eq!(heads_per_unit(1, 20, 4, 64), 1);
        // A prompt: plenty of units whatever their size.
        assert_eq!(heads_per_unit(128, 20, 4, 16), 4);
        // Multi-head attention has nothing to share.
        assert_eq!(heads_per_unit(1, 8, 1, 2), 1);
        // 6 query heads per KV head: units of 3 (4 of them) on four threads.
        assert_eq!(heads_per_unit(1, 12, 6, 1), 6);
        assert_eq!(heads_per_unit(1, 12, 6, 4), 3);
    }

    /// A deterministic pseudo-random value in [-1, 1).
    fn noise(i: usize, salt: u64) -> f32 {
        let mut z = (i as u64)
            .wrapping_add(salt)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }

    /// Each head alone over all its rows with the scalar kernels: the order every grouping and
    /// every kernel set must reproduce bit for bit.
    fn reference<E: CacheValue>(
        at: &Attention<'_>,
        keys: &[E],
        values: &[E],
        n: usize,
    ) -> Vec<f32> {
        let (hd, nh, kvd) = (at.head_dim, at.heads, at.kv_dim);
        let mut out = vec![0f32; n * nh * hd];
        for i in 0..n {
            for head in 0..nh {
                let pair = i * nh + head;
                let kv = (head / at.group) * hd;
                let len = at.start + i + 1;
                let mut sc = vec![0f32; len];
                E::scores(
                    &Kernels::SCALAR,
                    &at.q[pair * hd..(pair + 1) * hd],
                    &keys[kv..],
                    kvd,
                    &mut sc,
                );
                (Kernels::SCALAR.softmax)(&mut sc, at.scale);
                E::mix(
                    &Kernels::SCALAR,
                    &mut out[pair * hd..(pair + 1) * hd],
                    &sc,
                    &values[kv..],
                    kvd,
                );
            }
        }
        out
    }

    fn grouping_keeps_every_bit<E: CacheValue>(to_elem: fn(f32) -> E) {
        // 8 query heads over 2 KV heads, an odd head size (kernel tails), and 70 cached rows
        // (more than two ATTENTION_ROWS chunks, the last one partial).
        let (n, nh, nkv, hd, start) = (3, 8, 2, 20, 67);
        let (kvd, cap) = (nkv * hd, 80);
        let q: Vec<f32> = (0..n * nh * hd).map(|i| 2.0 * noise(i, 1)).collect();
        let keys: Vec<E> = (0..cap * kvd).map(|i| to_elem(noise(i, 2))).collect();
        let values: Vec<E> = (0..cap * kvd).map(|i| to_elem(noise(i, 3))).collect();
        for kern in Kernels::available() {
            for s in [1, 2, 4] {
                for tasks in [1, 3, 16] {
                    let at = Attention {
                        kern,
                        q: &q,
                        start,
                        heads: nh,
                        group: nh / nkv,
                        heads_per_unit: s,
                        head_dim: hd,
                        kv_dim: kvd,
                        scale: (hd as f32).powf(-0.5),
                        tasks,
                    };
                    let want = reference(&at, &keys, &values, n);
                    let mut out = vec![f32::NAN; n * nh * hd];
                    let mut scores = vec![f32::NAN; 2 * tasks * s * cap];
                    at.run(&keys, &values, &mut out, &mut scores, cap);
                    let same = out
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{}: {s} heads per unit, {tasks} tasks", kern.name);
                }
            }
        }
    }

    #[test]
    fn grouped_heads_give_the_bits_of_single_heads_f32() {
        grouping_keeps_every_bit::<f32>(|v| v);
    }

    #[test]
    fn grouped_heads_give_the_bits_of_single_heads_f16() {
        grouping_keeps_every_bit::<half::f16>(half::f16::from_f32);
    }
}
