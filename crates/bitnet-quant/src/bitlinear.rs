//! BitLinear for inference: int8 activations times a ternary matrix, rescaled to f32.

use rayon::prelude::*;

use crate::kernels::{GemmFn, GemvFn, Kernels};
use crate::quantize::quantize_activations;
use crate::ternary::{BLOCK_BYTES, BLOCK_ELEMS, ROW_GROUP};
use crate::{Base3Matrix, Error, Result, TernaryMatrix};

/// The runtime layouts a layer's ternary weights can be kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightLayout {
    /// Two bits per weight ([`TernaryMatrix`]): the fastest kernels, the default.
    #[default]
    TwoBit,
    /// Five weights per byte, 1.6 bits per weight ([`Base3Matrix`]): 20% fewer bytes to
    /// stream per token for about twice the decoding work, a gain only where decoding waits
    /// on memory.
    Base3,
}

impl WeightLayout {
    /// Parses `2bit` or `base3` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "2bit" | "2-bit" => Ok(WeightLayout::TwoBit),
            "base3" | "base-3" => Ok(WeightLayout::Base3),
            _ => Err(Error::InvalidInput(format!(
                "unknown weight layout {s:?}: expected 2bit or base3"
            ))),
        }
    }

    /// The name [`Self::parse`] takes.
    pub fn name(self) -> &'static str {
        match self {
            WeightLayout::TwoBit => "2bit",
            WeightLayout::Base3 => "base3",
        }
    }
}

/// A layer's ternary weights in one of the runtime layouts.
#[derive(Debug, Clone)]
pub enum PackedWeights {
    /// The 2-bit layout.
    TwoBit(TernaryMatrix),
    /// The dense base-3 layout.
    Base3(Base3Matrix),
}

impl From<TernaryMatrix> for PackedWeights {
    fn from(m: TernaryMatrix) -> Self {
        PackedWeights::TwoBit(m)
    }
}

impl From<Base3Matrix> for PackedWeights {
    fn from(m: Base3Matrix) -> Self {
        PackedWeights::Base3(m)
    }
}

impl PackedWeights {
    /// The layout the weights are in.
    pub fn layout(&self) -> WeightLayout {
        match self {
            PackedWeights::TwoBit(_) => WeightLayout::TwoBit,
            PackedWeights::Base3(_) => WeightLayout::Base3,
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            PackedWeights::TwoBit(m) => m.rows(),
            PackedWeights::Base3(m) => m.rows(),
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            PackedWeights::TwoBit(m) => m.cols(),
            PackedWeights::Base3(m) => m.cols(),
        }
    }

    /// The packed bytes (what a product streams).
    pub fn bytes(&self) -> &[u8] {
        match self {
            PackedWeights::TwoBit(m) => m.bytes(),
            PackedWeights::Base3(m) => m.bytes(),
        }
    }

    /// Bytes per row, padding included.
    pub fn row_bytes(&self) -> usize {
        match self {
            PackedWeights::TwoBit(m) => m.row_bytes(),
            PackedWeights::Base3(m) => m.row_bytes(),
        }
    }

    /// Length of the padded activation row the layout's kernels take.
    pub fn padded_cols(&self) -> usize {
        match self {
            PackedWeights::TwoBit(m) => TernaryMatrix::padded_cols(m.cols()),
            PackedWeights::Base3(m) => Base3Matrix::padded_cols(m.cols()),
        }
    }

    /// The codes of row `r` into `out` (`cols` of them).
    pub fn row_codes(&self, r: usize, out: &mut [i8]) {
        match self {
            PackedWeights::TwoBit(m) => m.row_codes(r, out),
            PackedWeights::Base3(m) => m.row_codes(r, out),
        }
    }

    /// All codes, row-major `[rows, cols]` (for checks and export, not for the hot path).
    pub fn to_codes(&self) -> Vec<i8> {
        match self {
            PackedWeights::TwoBit(m) => m.to_codes(),
            PackedWeights::Base3(m) => m.to_codes(),
        }
    }

    /// The same weights in `layout` (a copy; repacked if the layout differs).
    pub fn to_layout(&self, layout: WeightLayout) -> PackedWeights {
        match (self, layout) {
            (PackedWeights::TwoBit(m), WeightLayout::Base3) => Base3Matrix::from_ternary(m).into(),
            (PackedWeights::Base3(m), WeightLayout::TwoBit) => m.to_ternary().into(),
            _ => self.clone(),
        }
    }

    /// The matrix-vector and matrix-matrix kernels of this layout in `kernels`.
    fn products(&self, kernels: &Kernels) -> (GemvFn, GemmFn) {
        match self {
            PackedWeights::TwoBit(_) => (kernels.gemv, kernels.gemm),
            PackedWeights::Base3(_) => (kernels.gemv_base3, kernels.gemm_base3),
        }
    }
}

/// How a layer's stored weight scale turns integer sums into outputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightScale {
    /// The scale is `s_w = 1 / absmean` (HF `bitlinear`, and weights quantized at load):
    /// `y = acc / (s_x * s_w)`.
    Inverse(f32),
    /// The scale is `absmean` itself (HF `autobitlinear` offline): `y = acc * scale / s_x`.
    Direct(f32),
}

impl WeightScale {
    /// The ternary step: the weight value that code +1 stands for.
    pub fn step(self) -> f32 {
        match self {
            WeightScale::Inverse(s) => 1.0 / s,
            WeightScale::Direct(a) => a,
        }
    }

    /// Converts an exact integer sum into the layer output for a token with scale `s_x`.
    #[inline]
    pub fn apply(self, acc: i32, s_x: f32) -> f32 {
        match self {
            WeightScale::Inverse(s_w) => acc as f32 / (s_x * s_w),
            WeightScale::Direct(a) => acc as f32 * a / s_x,
        }
    }
}

/// One weight step per block of `block` consecutive weights of a row (GGUF TQ files store
/// one f16 scale per 256 weights): weight = code * `scales[row * blocks_per_row + b]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockScales {
    /// Weights per scale block, a multiple of [`BLOCK_ELEMS`].
    pub block: usize,
    /// Row-major `[rows, cols / block]`.
    pub scales: Vec<f32>,
}

/// A bias-free BitNet linear layer: `[out, in]` ternary weights and one per-tensor scale, or
/// (rare: files whose blocks were quantized separately) one scale per block of weights.
#[derive(Debug, Clone)]
pub struct BitLinear {
    weight: PackedWeights,
    scale: WeightScale,
    block_scales: Option<BlockScales>,
}

/// Rows per parallel task: enough work to amortise a task, few enough to balance threads.
pub const ROWS_PER_TASK: usize = 64;

/// Largest packed weights (bytes) that [`BitLinear::forward_quantized`] runs in token
/// blocks, each task reading all of them: an eighth of a small core's L2 (the trainer's
/// layers are 12-48 KB; a 2B model's are megabytes, and take tasks of rows instead).
pub const SMALL_LAYER_BYTES: usize = 64 * 1024;

/// Tokens per task of the token-block path (its sums, `TOKENS_PER_TASK x ROWS_PER_TASK`
/// i32, are 16 KB on the stack).
pub const TOKENS_PER_TASK: usize = 64;

// Tasks start on row-group boundaries.
const _: () = assert!(ROWS_PER_TASK.is_multiple_of(ROW_GROUP));

impl BitLinear {
    /// A layer from its weights (in either layout) and scale.
    pub fn new(weight: impl Into<PackedWeights>, scale: WeightScale) -> Self {
        BitLinear {
            weight: weight.into(),
            scale,
            block_scales: None,
        }
    }

    /// A layer whose weight steps differ from block to block. `y = sum_b d_b * acc_b / s_x`,
    /// with each block's exact integer sum `acc_b` scaled separately.
    pub fn with_block_scales(weight: TernaryMatrix, scales: BlockScales) -> Result<Self> {
        let cols = weight.cols();
        if scales.block == 0
            || !scales.block.is_multiple_of(BLOCK_ELEMS)
            || !cols.is_multiple_of(scales.block)
        {
            return Err(Error::InvalidInput(format!(
                "scale blocks of {} weights do not tile rows of {cols}",
                scales.block
            )));
        }
        if scales.scales.len() != weight.rows() * (cols / scales.block) {
            return Err(Error::InvalidInput(format!(
                "{} block scales for a [{}, {cols}] matrix with blocks of {}",
                scales.scales.len(),
                weight.rows(),
                scales.block
            )));
        }
        Ok(BitLinear {
            weight: weight.into(),
            scale: WeightScale::Direct(1.0),
            block_scales: Some(scales),
        })
    }

    /// The per-block scales, when the layer has them (then [`Self::scale`] is not used).
    pub fn block_scales(&self) -> Option<&BlockScales> {
        self.block_scales.as_ref()
    }

    /// The ternary weights.
    pub fn weight(&self) -> &PackedWeights {
        &self.weight
    }

    /// The same layer with its weights in `layout`. Layers with per-block scales stay in the
    /// 2-bit layout, whose blocks their scale blocks are made of (an error for
    /// [`WeightLayout::Base3`]).
    pub fn with_layout(&self, layout: WeightLayout) -> Result<BitLinear> {
        if self.block_scales.is_some() && layout != WeightLayout::TwoBit {
            return Err(Error::InvalidInput(format!(
                "the {} layout does not take per-block weight scales; this layer has them",
                layout.name()
            )));
        }
        Ok(BitLinear {
            weight: self.weight.to_layout(layout),
            ..self.clone()
        })
    }

    /// The weight scale.
    pub fn scale(&self) -> WeightScale {
        self.scale
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.cols()
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.rows()
    }

    /// Length of one quantized input row ([`PackedWeights::padded_cols`]).
    pub fn padded_in(&self) -> usize {
        self.weight.padded_cols()
    }

    /// Integer products of `tokens` quantized rows `xq` (each [`Self::padded_in`] long),
    /// exact, so independent of the thread count. The rows are cut into tasks of
    /// [`ROWS_PER_TASK`]; task `i` (rows `r0..r0 + n`) writes its `tokens x n` block at
    /// `acc[r0 * tokens..]`, token-major, so that one kernel call serves all tokens of a task
    /// and each weight block is loaded once for several tokens. [`Self::acc_index`] maps a
    /// (token, row) pair into this layout; for one token it is plain `acc[r]`.
    pub fn forward_i32(&self, kernels: &Kernels, xq: &[i8], tokens: usize, acc: &mut [i32]) {
        let (w, rb) = (self.weight.bytes(), self.weight.row_bytes());
        let (gemv, gemm) = self.weight.products(kernels);
        debug_assert_eq!(xq.len(), tokens * self.padded_in());
        debug_assert_eq!(acc.len(), tokens * self.out_features());
        if tokens == 0 {
            return;
        }
        acc.par_chunks_mut(ROWS_PER_TASK * tokens)
            .enumerate()
            .for_each(|(i, out)| {
                let r0 = i * ROWS_PER_TASK;
                let n = out.len() / tokens;
                // Whole row groups: `r0` is a multiple of ROW_GROUP, the end is rounded up.
                let rows = &w[r0 * rb..TernaryMatrix::padded_rows(r0 + n) * rb];
                if tokens == 1 {
                    gemv(rows, rb, xq, out);
                } else {
                    gemm(rows, rb, xq, tokens, out);
                }
            });
    }

    /// Where [`Self::forward_i32`] puts the sum of token `t` and row `r`.
    #[inline]
    pub fn acc_index(&self, tokens: usize, t: usize, r: usize) -> usize {
        let r0 = r / ROWS_PER_TASK * ROWS_PER_TASK;
        let n = ROWS_PER_TASK.min(self.out_features() - r0);
        r0 * tokens + t * n + (r - r0)
    }

    /// Whether [`Self::forward_quantized`] for `tokens` tokens goes through its `acc` scratch
    /// (`tokens * out` sums). It does not when the layer has per-block scales, or when its
    /// packed weights fit [`SMALL_LAYER_BYTES`] and there are several tokens: then each task
    /// takes a block of tokens through all of the weights, keeping its sums on the stack, and
    /// `acc` may be empty.
    pub fn uses_acc(&self, tokens: usize) -> bool {
        self.block_scales.is_none()
            && (tokens <= 1 || self.weight.bytes().len() > SMALL_LAYER_BYTES)
    }

    /// The layer's output for already quantized inputs: `y[t * out + r]` from the exact
    /// integer sums (in `acc`, when [`Self::uses_acc`]) and the per-token activation scales
    /// `s_x`. Either way gives the same bits.
    pub fn forward_quantized(
        &self,
        kernels: &Kernels,
        xq: &[i8],
        s_x: &[f32],
        acc: &mut [i32],
        y: &mut [f32],
    ) {
        if let Some(bs) = &self.block_scales {
            self.forward_block_scaled(kernels, bs, xq, s_x, y);
        } else if self.uses_acc(s_x.len()) {
            self.forward_row_tasks(kernels, xq, s_x, acc, y);
        } else {
            self.forward_token_blocks(kernels, xq, s_x, y);
        }
    }

    /// [`Self::forward_quantized`] with tasks of [`ROWS_PER_TASK`] rows over every token
    /// (each task's weights read once), the sums through `acc`.
    fn forward_row_tasks(
        &self,
        kernels: &Kernels,
        xq: &[i8],
        s_x: &[f32],
        acc: &mut [i32],
        y: &mut [f32],
    ) {
        let tokens = s_x.len();
        self.forward_i32(kernels, xq, tokens, acc);
        let rows = self.out_features();
        let acc = &*acc;
        y.par_chunks_mut(rows)
            .zip(s_x.par_iter())
            .enumerate()
            .for_each(|(t, (yt, &s))| {
                // Task i's block holds token t's sums of its rows side by side (see
                // `forward_i32`), so each run of `ROWS_PER_TASK` outputs reads one slice.
                for (i, yc) in yt.chunks_mut(ROWS_PER_TASK).enumerate() {
                    let (at, n) = (self.acc_index(tokens, t, i * ROWS_PER_TASK), yc.len());
                    for (yo, &a) in yc.iter_mut().zip(&acc[at..at + n]) {
                        *yo = self.scale.apply(a, s);
                    }
                }
            });
    }

    /// [`Self::forward_quantized`] with tasks of [`TOKENS_PER_TASK`] tokens through all of
    /// the weights (which a small layer keeps in cache), [`ROWS_PER_TASK`] rows at a time: each
    /// run of sums is converted while it is still on the stack, and a task writes one
    /// contiguous block of `y`.
    fn forward_token_blocks(&self, kernels: &Kernels, xq: &[i8], s_x: &[f32], y: &mut [f32]) {
        let (w, rb) = (self.weight.bytes(), self.weight.row_bytes());
        let (gemv, gemm) = self.weight.products(kernels);
        let (k, rows) = (self.padded_in(), self.out_features());
        debug_assert_eq!(xq.len(), s_x.len() * k);
        if rows == 0 {
            return;
        }
        y.par_chunks_mut(TOKENS_PER_TASK * rows)
            .zip(xq.par_chunks(TOKENS_PER_TASK * k))
            .zip(s_x.par_chunks(TOKENS_PER_TASK))
            .for_each(|((yb, xb), sb)| {
                let tokens = sb.len();
                let mut sums = [0i32; TOKENS_PER_TASK * ROWS_PER_TASK];
                for r0 in (0..rows).step_by(ROWS_PER_TASK) {
                    let n = ROWS_PER_TASK.min(rows - r0);
                    let group = &w[r0 * rb..TernaryMatrix::padded_rows(r0 + n) * rb];
                    let out = &mut sums[..tokens * n];
                    if tokens == 1 {
                        gemv(group, rb, xb, out);
                    } else {
                        gemm(group, rb, xb, tokens, out);
                    }
                    for ((yt, &s), st) in yb.chunks_mut(rows).zip(sb).zip(out.chunks(n)) {
                        for (yo, &a) in yt[r0..r0 + n].iter_mut().zip(st) {
                            *yo = self.scale.apply(a, s);
                        }
                    }
                }
            });
    }

    fn forward_block_scaled(
        &self,
        kernels: &Kernels,
        bs: &BlockScales,
        xq: &[i8],
        s_x: &[f32],
        y: &mut [f32],
    ) {
        // `with_layout` keeps block-scaled layers in the 2-bit layout.
        debug_assert_eq!(self.weight.layout(), WeightLayout::TwoBit);
        let (w, rb) = (self.weight.bytes(), self.weight.row_bytes());
        let (rows, k) = (self.out_features(), self.padded_in());
        let per_row = self.in_features() / bs.block;
        let block_bytes = bs.block / BLOCK_ELEMS * BLOCK_BYTES;
        // The run of blocks `b * block_bytes..` of one row group is itself a row group of
        // `block_bytes`-byte rows, so one kernel call gives the group's four partial sums.
        let group_bytes = ROW_GROUP * rb;
        y.par_chunks_mut(rows)
            .zip(xq.par_chunks(k))
            .zip(s_x.par_iter())
            .for_each(|((yt, x), &s)| {
                for (g, (yg, scales)) in yt
                    .chunks_mut(ROW_GROUP)
                    .zip(bs.scales.chunks(ROW_GROUP * per_row))
                    .enumerate()
                {
                    let group = &w[g * group_bytes..(g + 1) * group_bytes];
                    let mut sums = [0f32; ROW_GROUP];
                    for b in 0..per_row {
                        let mut acc = [0i32; ROW_GROUP];
                        let at = b * ROW_GROUP * block_bytes;
                        (kernels.gemv)(
                            &group[at..at + ROW_GROUP * block_bytes],
                            block_bytes,
                            &x[b * bs.block..(b + 1) * bs.block],
                            &mut acc[..yg.len()],
                        );
                        // `scales` holds this group's rows only: the padding rows have none.
                        for (i, (sum, &a)) in sums.iter_mut().zip(&acc[..yg.len()]).enumerate() {
                            *sum += a as f32 * scales[i * per_row + b];
                        }
                    }
                    for (yo, sum) in yg.iter_mut().zip(sums) {
                        *yo = sum / s;
                    }
                }
            });
    }

    /// Convenience for tests and tools: quantizes `x` (`tokens * in` f32) and returns
    /// the int8 rows, their scales and the outputs. Allocates; the engine uses
    /// [`Self::forward_quantized`] with its scratch buffers instead.
    pub fn forward_f32(&self, kernels: &Kernels, x: &[f32]) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
        let cols = self.in_features();
        let tokens = x.len() / cols.max(1);
        let k = self.padded_in();
        let mut xq = vec![0i8; tokens * k];
        let s_x: Vec<f32> = x
            .chunks_exact(cols)
            .zip(xq.chunks_exact_mut(k))
            .map(|(xr, qr)| quantize_activations(xr, qr))
            .collect();
        let mut acc = vec![0i32; tokens * self.out_features()];
        let mut y = vec![0f32; tokens * self.out_features()];
        self.forward_quantized(kernels, &xq, &s_x, &mut acc, &mut y);
        (xq, s_x, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_apply_as_the_reference_does() {
        let s = WeightScale::Inverse(4.0);
        assert_eq!(s.apply(8, 2.0), 1.0);
        assert_eq!(s.step(), 0.25);
        let d = WeightScale::Direct(0.25);
        assert_eq!(d.apply(8, 2.0), 1.0);
    }

    #[test]
    fn forward_matches_float_math_on_exact_values() {
        // Weights {-1,0,1} * 0.5, inputs whose absmax is 127 (s_x = 1): exact arithmetic.
        let codes = [1i8, 0, -1, 1, 1, 1];
        let w = TernaryMatrix::from_codes(&codes, 2, 3).unwrap();
        let layer = BitLinear::new(w, WeightScale::Direct(0.5));
        let (q, sx, y) = layer.forward_f32(Kernels::get(), &[127.0, 3.0, -5.0, 1.0, 2.0, -127.0]);
        assert_eq!(sx, vec![1.0, 1.0]);
        assert_eq!(&q[..3], &[127, 3, -5]);
        assert_eq!(y, vec![66.0, 62.5, 64.0, -62.0]);
    }

    #[test]
    fn chunked_accumulators_map_back_to_every_token_and_row() {
        // 70 rows: one full task of 64 rows and a partial one; 3 tokens, and 70 (a full task
        // of 64 tokens and a partial one in the token-block path); 1 token (a product of
        // one row).
        for tokens in [3, 70, 1] {
            sums_map_back_to_every_token_and_row(tokens);
        }
    }

    fn sums_map_back_to_every_token_and_row(tokens: usize) {
        let (rows, cols) = (70usize, 200usize);
        let codes: Vec<i8> = (0..rows * cols)
            .map(|i| ((i * 7 + i / 13) % 3) as i8 - 1)
            .collect();
        let layer = BitLinear::new(
            TernaryMatrix::from_codes(&codes, rows, cols).unwrap(),
            WeightScale::Direct(1.0),
        );
        let x: Vec<f32> = (0..tokens * cols)
            .map(|i| {
                if i % cols == 0 {
                    127.0
                } else {
                    ((i * 31) % 255) as f32 - 127.0
                }
            })
            .collect();
        // Both runtime layouts, through the same task chunking.
        let dense = layer.with_layout(WeightLayout::Base3).unwrap();
        assert_eq!(dense.weight().layout(), WeightLayout::Base3);
        assert_eq!(dense.padded_in(), 320);
        for layer in [&layer, &dense] {
            // A small layer: the token-block path (unless one token).
            assert_eq!(layer.uses_acc(tokens), tokens == 1);
            for kernels in Kernels::available() {
                let (q, sx, y) = layer.forward_f32(kernels, &x);
                assert_eq!(sx, vec![1.0; tokens]);
                // The row-task path, through `acc`, on the same rows.
                let mut acc = vec![0i32; tokens * rows];
                let mut by_rows = vec![0f32; tokens * rows];
                layer.forward_row_tasks(kernels, &q, &sx, &mut acc, &mut by_rows);
                let k = layer.padded_in();
                for t in 0..tokens {
                    for r in 0..rows {
                        let want: i32 = (0..cols)
                            .map(|c| codes[r * cols + c] as i32 * q[t * k + c] as i32)
                            .sum();
                        let what =
                            format!("{} {:?} t{t} r{r}", kernels.name, layer.weight().layout());
                        assert_eq!(y[t * rows + r], want as f32, "{what}");
                        assert_eq!(by_rows[t * rows + r], want as f32, "rows: {what}");
                    }
                }
            }
        }
    }

    #[test]
    fn layouts_parse_and_block_scaled_layers_stay_two_bit() {
        assert_eq!(WeightLayout::parse("BASE3").unwrap(), WeightLayout::Base3);
        assert_eq!(WeightLayout::parse("2bit").unwrap(), WeightLayout::TwoBit);
        assert!(WeightLayout::parse("base4").is_err());
        let w = TernaryMatrix::from_codes(&[1i8; 256], 1, 256).unwrap();
        let bs = BlockScales {
            block: 128,
            scales: vec![0.5, 2.0],
        };
        let layer = BitLinear::with_block_scales(w, bs).unwrap();
        let err = layer.with_layout(WeightLayout::Base3).unwrap_err();
        assert!(err.to_string().contains("per-block"), "{err}");
        assert!(layer.with_layout(WeightLayout::TwoBit).is_ok());
    }

    #[test]
    fn block_scales_weight_each_block() {
        // One row of 256 weights: +1 everywhere; block 0 step 0.5, block 1 step 2.
        let w = TernaryMatrix::from_codes(&[1i8; 256], 1, 256).unwrap();
        let bs = BlockScales {
            block: 128,
            scales: vec![0.5, 2.0],
        };
        let layer = BitLinear::with_block_scales(w.clone(), bs).unwrap();
        let mut x = vec![1.0f32; 256];
        x[0] = 127.0; // s_x = 1
        let (_, _, y) = layer.forward_f32(Kernels::get(), &x);
        assert_eq!(y, vec![0.5 * (127.0 + 127.0) + 2.0 * 128.0]);
        let bad = BlockScales {
            block: 100,
            scales: vec![1.0; 3],
        };
        assert!(BitLinear::with_block_scales(w, bad).is_err());

        // Six rows (a whole row group and part of the next), a scale per row and block.
        let (rows, cols) = (6, 256);
        let codes: Vec<i8> = (0..rows * cols).map(|i| (i * 5 % 3) as i8 - 1).collect();
        let scales: Vec<f32> = (0..rows * 2).map(|i| [0.5, 0.25, 2.0][i % 3]).collect();
        let w = TernaryMatrix::from_codes(&codes, rows, cols).unwrap();
        let bs = BlockScales {
            block: 128,
            scales: scales.clone(),
        };
        let layer = BitLinear::with_block_scales(w, bs).unwrap();
        let mut x: Vec<f32> = (0..cols).map(|k| (k % 7) as f32 - 3.0).collect();
        x[5] = 127.0; // s_x = 1: the integer sums scale exactly
        for kernels in Kernels::available() {
            let (_, _, y) = layer.forward_f32(kernels, &x);
            for r in 0..rows {
                let want: f32 = (0..2)
                    .map(|b| {
                        let s: i32 = (b * 128..(b + 1) * 128)
                            .map(|k| codes[r * cols + k] as i32 * x[k] as i32)
                            .sum();
                        s as f32 * scales[r * 2 + b]
                    })
                    .sum();
                assert_eq!(y[r], want, "{} row {r}", kernels.name);
            }
        }
    }
}
