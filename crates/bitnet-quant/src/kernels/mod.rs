//! The kernels behind one dispatch table: ternary x int8 products, the output head's dense dot
//! products, attention over the KV cache (scores, softmax, weighted sum), and the tile of the
//! f32 matrix products ([`crate::sgemm`]) the trainer's gradients use.
//!
//! [`Kernels::get`] picks the table once, from the CPU features detected at start-up. The
//! ternary kernels compute exact i32 sums and the float kernels follow a fixed order of
//! operations, so every implementation must agree bit for bit with [`scalar`], the reference.
//!
//! Sets: `scalar` (everywhere), `avx2` (x86-64 CPUs that report AVX2), `avxvnni` (AVX2 with
//! the VEX-encoded `vpdpbusd`: Alder Lake and later Intel cores, AMD Zen 5), `avx512vnni`
//! (AVX-512 F, BW and VNNI: Ice Lake, Cascade Lake and later Intel servers, AMD Zen 4 and 5),
//! `amx` (the AVX-512 VNNI set with an AMX-INT8 matrix-matrix product, where Linux grants the
//! tile registers: Sapphire Rapids and later Xeons), `neon` (AArch64) and `neon-dotprod`
//! (AArch64 CPUs that report the dot-product extension). The x86 sets other than `avx2`
//! replace only the ternary products; the head's and the attention's kernels are the same in
//! all x86 sets (AVX2/F16C), as in both AArch64 sets (NEON). Every set also has the products
//! for the dense base-3 layout ([`crate::base3`]: `gemv_base3`, `gemm_base3`); all x86 sets
//! share AVX2's, and the two AArch64 sets have their own (`smlal` and `sdot`).
//!
//! # Overriding the choice
//!
//! The environment variable `BITNET_KERNELS` names the set to use, for example
//! `BITNET_KERNELS=scalar` to compare against the reference or to rule out a SIMD bug. It is
//! read once, on the first call to [`Kernels::get`]. A name that is unknown, or names a set this
//! CPU cannot run, is ignored and the detected best set is used; `bitnet inspect --cpu` shows
//! the sets this CPU runs and which one was chosen, and why.

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;

use std::sync::OnceLock;

/// `out[r] = sum_k t[r, k] * x[k]` for the rows `r < min(out.len(), w.len() / row_bytes)`;
/// `w` holds whole row groups of the runtime layout (`row_bytes` per row, see
/// [`crate::ternary`]) and `x` is one padded activation row of `row_bytes * 4` int8 values.
pub type GemvFn = fn(w: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]);

///
/// The dense set's `gemv_base3` has the same contract for the dense layout
/// ([`crate::base3`]: 32-byte blocks of 160 weights), with activation rows of
/// `row_bytes * 5`.
///
/// The same for `tokens` activation rows laid end to end in `x`:
/// `out[t * rows + r] = sum_k t[r, k] * x[t, k]` with `rows = out.len() / tokens`, which must
/// not exceed the rows `w` holds.
pub type GemmFn = fn(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]);

/// Rows of `w` that a SIMD kernel call may read, after the checks that make its unchecked
/// loads sound: `row_bytes` a positive multiple of a block, `w` whole row groups and `x` long
/// enough for `tokens` rows of `row_bytes * per_byte` activations (`per_byte`: 4 in the 2-bit
/// layout, 5 in the dense one; both have 32-byte blocks). Panics otherwise (a caller bug, not
/// bad input: `BitLinear` builds these arguments).
#[allow(dead_code)] // used only by the SIMD modules compiled for this target
pub(crate) fn checked_rows(
    w: &[u8],
    row_bytes: usize,
    x_len: usize,
    tokens: usize,
    per_byte: usize,
) -> usize {
    use crate::ternary::{BLOCK_BYTES, ROW_GROUP};
    assert!(
        row_bytes > 0 && row_bytes.is_multiple_of(BLOCK_BYTES),
        "row_bytes {row_bytes} is not a positive multiple of {BLOCK_BYTES}"
    );
    assert!(
        w.len().is_multiple_of(ROW_GROUP * row_bytes),
        "{} weight bytes are not whole groups of {ROW_GROUP} rows of {row_bytes}",
        w.len()
    );
    assert!(
        x_len >= tokens * row_bytes * per_byte,
        "{x_len} activations cannot hold {tokens} rows of {}",
        row_bytes * per_byte
    );
    w.len() / row_bytes
}

/// Output rows of a SIMD matrix-matrix call (`out.len() / tokens`, `tokens > 0`), after
/// [`checked_rows`] and the check that the weights hold that many rows. Panics otherwise (a
/// caller bug, as for [`checked_rows`]).
#[allow(dead_code)] // used only by the SIMD modules compiled for this target
pub(crate) fn checked_gemm_rows(
    w: &[u8],
    row_bytes: usize,
    x_len: usize,
    tokens: usize,
    out_len: usize,
    per_byte: usize,
) -> usize {
    let held = checked_rows(w, row_bytes, x_len, tokens, per_byte);
    let rows = out_len / tokens;
    assert!(
        rows <= held,
        "{rows} output rows, but the weights hold {held}"
    );
    rows
}

/// `sum_k w[k] * x[k]` over `min(w.len(), x.len())` values, with [`DOT_SUMS`] = 32 running
/// f32 sums (sum `j` takes `k = j mod 32`, products rounded before they are added), combined
/// by [`combine_sums`]. The order is part of the contract, so every implementation gives the
/// same bits. (32 sums are four 8-lane vectors: four independent additions in flight, which
/// one vector's add latency would otherwise serialise.)
pub type DotF16Fn = fn(w: &[half::f16], x: &[f32]) -> f32;

/// Attention scores: `scores[j] = sum_k q[k] * keys[j * stride + k]` over `k < q.len()`, for
/// `j < scores.len()`, each with [`SCORE_SUMS`] = 8 running sums (sum `i` takes the `k` with
/// `k mod 8 = i`, in order of `k`), every step one fused multiply-add (`q[k] * key + sum`,
/// rounded once), combined by [`combine_lanes`]. One vector of sums per score leaves the SIMD
/// sets registers to score several rows at once, each row its own chain of fused steps.
/// Panics if `keys` is shorter than the last row's end.
pub type ScoreRowsFn<E> = fn(q: &[f32], keys: &[E], stride: usize, scores: &mut [f32]);

/// Attention's weighted sum of values: `out[i] += sum_j w[j] * values[j * stride + i]` for
/// `i < out.len()`, the rows added one after another in order of `j`, each product rounded
/// before its addition (no fused multiply-add). Panics if `values` is shorter than the last
/// row's end.
pub type MixRowsFn<E> = fn(out: &mut [f32], w: &[f32], values: &[E], stride: usize);

/// Attention's softmax of one row of scores, in place: `y_i = x_i * scale`, `m = max y_i`,
/// `e_i = exp(y_i - m)` by [`scalar::exp_nonpositive`], `x_i = e_i * (1 / s)` with `s` the sum
/// of the `e_i` in [`SOFTMAX_SUMS`] running sums (sum `j` takes `i mod 8`, in order of `i`)
/// combined by [`combine_lanes`]. Every step is one rounded f32 operation (no fused
/// multiply-add), so every implementation gives the same bits for finite scores. A NaN score
/// makes the whole row NaN.
pub type SoftmaxFn = fn(x: &mut [f32], scale: f32);

/// The cross-entropy's softmax denominator: `sum_i exp(x_i - shift)` by
/// [`scalar::exp_nonpositive`] (every `x_i <= shift`: `shift` is the row's maximum), in
/// [`SOFTMAX_SUMS`] running sums (sum `j` takes `i mod 8`, in order of `i`) combined by
/// [`combine_lanes`], as [`SoftmaxFn`] sums. One rounded f32 operation per step, so every
/// implementation gives the same bits.
pub type ExpSumFn = fn(x: &[f32], shift: f32) -> f32;

/// The cross-entropy's gradient row: `out_i = exp(x_i - shift) * scale` by
/// [`scalar::exp_nonpositive`] (`shift` at least every `x_i`), for `i < x.len()`. Panics if
/// `out` is shorter than `x`.
pub type ExpScaledFn = fn(x: &[f32], shift: f32, scale: f32, out: &mut [f32]);

/// Rows of an f32 matrix-product tile ([`SgemmTilesFn`]).
pub const SGEMM_MR: usize = 6;

/// Columns of an f32 matrix-product tile ([`SgemmTilesFn`]).
pub const SGEMM_NR: usize = 16;

/// A row of tiles of an f32 matrix product (the inner kernel of [`crate::sgemm`]): `panels`
/// tiles side by side, tile `q` being
/// `c[i * ldc + 16 q + j] = sum_k a[rows[i] + k * a_step] * b[(q * kc + k) * SGEMM_NR + j]`
/// for `i < SGEMM_MR`, `j < SGEMM_NR`, `k < kc`. Each element is one chain of fused
/// multiply-adds (`a * b + sum`, rounded once) in order of `k`, starting from its value in `c`
/// when `accumulate`, from +0 otherwise, so every implementation gives the same bits. `b` holds
/// `panels` packed panels one after the other, each with row `k`'s 16 values at
/// `k * SGEMM_NR`. One call per row of tiles, not per tile, so the checks and the dispatch are
/// paid once for the row (a tile of a short sum is a few hundred cycles). `kc = 0` is the
/// empty sum and `panels = 0` no tiles (the SIMD sets hand both to the scalar kernel). Panics
/// if `ldc < 16 * panels` or if any index falls outside `a`, `b` or `c`.
pub type SgemmTilesFn = fn(
    kc: usize,
    a: &[f32],
    rows: &[usize; SGEMM_MR],
    a_step: usize,
    b: &[f32],
    panels: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
);

/// Checks the bounds every [`SgemmTilesFn`] relies on (see its contract). Panics otherwise.
#[allow(dead_code)] // used only by the SIMD modules compiled for this target
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_sgemm_tiles(
    kc: usize,
    a_len: usize,
    rows: &[usize; SGEMM_MR],
    a_step: usize,
    b_len: usize,
    panels: usize,
    c_len: usize,
    ldc: usize,
) {
    assert!(
        kc > 0 && panels > 0,
        "an empty row of tiles has nothing to load"
    );
    let width = panels.checked_mul(SGEMM_NR);
    assert!(
        width
            .and_then(|w| w.checked_mul(kc))
            .is_some_and(|len| b_len >= len),
        "{b_len} values for {panels} panels of {kc} rows"
    );
    let width = width.unwrap_or(usize::MAX);
    assert!(
        ldc >= width
            && (SGEMM_MR - 1)
                .checked_mul(ldc)
                .and_then(|v| v.checked_add(width))
                .is_some_and(|end| c_len >= end),
        "{panels} tiles in {c_len} values with rows {ldc} apart"
    );
    for &r in rows {
        let last = (kc - 1).checked_mul(a_step).and_then(|v| v.checked_add(r));
        assert!(
            last.is_some_and(|l| l < a_len),
            "row at {r} with step {a_step} leaves {a_len} values"
        );
    }
}

/// Running sums of one attention score ([`ScoreRowsFn`]): one vector of eight lanes.
pub const SCORE_SUMS: usize = 8;

/// Running sums of the softmax's denominator ([`SoftmaxFn`]): one vector of eight lanes.
pub const SOFTMAX_SUMS: usize = 8;

/// The blocks the SIMD weighted sums hold in registers: `(first output, groups of eight)` with
/// up to eight groups (64 outputs) each, over the first `n / 8 * 8` outputs; the rest is
/// [`scalar::mix_rows_from`]'s.
#[allow(dead_code)] // used only by the SIMD modules compiled for this target
pub(crate) fn mix_blocks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let full = n / 8 * 8;
    (0..full)
        .step_by(64)
        .map(move |b0| (b0, ((full - b0) / 8).min(8)))
}

/// The length `rows` rows of `len` values, `stride` apart, need (0 for no rows).
#[inline]
pub(crate) fn rows_span(rows: usize, stride: usize, len: usize) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * stride + len
    }
}

/// The dot product of a row of ggml Q8_0 blocks (f16 `d_w`, 32 int8 `q_w`) with activations
/// quantized the same way ([`crate::q8_0::quantize_q8_0_activations`]: int8 `xq` in
/// `[-127, 127]`, one f32 scale `xd[b]` per block), over `min(blocks, xd.len())` blocks.
///
/// The order is part of the contract: in block `b`, each group of four products `j` (values
/// `4j..4j + 4`) is summed exactly in i32, converted to f32, multiplied by `d_w * xd[b]`
/// (rounded once) and added to running sum `8 * (b mod 2) + j`; the 16 sums are combined as
/// `a_j = s_j + s_{8+j}`, then `((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))`.
pub type DotQ8_0Fn = fn(row: &[u8], xq: &[i8], xd: &[f32]) -> f32;

/// The dot product of a row of ggml Q6_K blocks ([`crate::q6_k`]) with Q8_0 activations (as
/// for [`DotQ8_0Fn`]: each run of 32 values of a block meets one activation block), over
/// `min(blocks, xd.len() / 8)` blocks.
///
/// The order is part of the contract: for activation block `b` (run `b mod 8` of Q6_K block
/// `b / 8`), each group of four products `j` (values `4j..4j + 4` of the run, signed codes
/// `c - 32` times activations) is summed exactly in i32 and multiplied by its 16-value scale
/// (exact in i32), converted to f32, multiplied by `d_w * xd[b]` (rounded once) and added to
/// running sum `8 * (b mod 2) + j`; the 16 sums are combined by [`combine_q8_sums`].
pub type DotQ6KFn = fn(row: &[u8], xq: &[i8], xd: &[f32]) -> f32;

/// RMSNorm of one token's row fused with its per-token int8 quantization: the codes of
/// [`crate::quantize_activations`] applied to `y = w * (x * r)`, written to `q` (as long as
/// `x` or longer: the tail is zeroed) without writing `y` out; returns the activation scale
/// `s_x`. `w` is as long as `x`.
///
/// The order is part of the contract: the sum of squares is [`scalar::sum_squares`]' (f64,
/// [`SQUARE_SUMS`] running sums), `r = 1 / sqrt(f32(sum) / n + eps)` ([`inv_rms`]), and each
/// `y` is rounded twice (`x * r`, then times `w`: no FMA), so every set gives the same codes
/// and scale bits.
pub type RmsNormQuantizeFn = fn(x: &[f32], w: &[f32], eps: f32, q: &mut [i8]) -> f32;

/// Running sums of [`scalar::sum_squares`]: square `i` goes to sum `i mod 16`, as four AVX2
/// or eight NEON f64 vectors hold them.
pub const SQUARE_SUMS: usize = 16;

/// The fixed combination of the [`SQUARE_SUMS`] running sums: halves added element-wise
/// (`s_j + s_{j+8}`, then `+ s_{j+4}`, then `+ s_{j+2}`) down to `s_0 + s_1`.
#[inline]
pub fn combine_square_sums(s: &[f64; SQUARE_SUMS]) -> f64 {
    let a: [f64; 8] = std::array::from_fn(|j| s[j] + s[j + 8]);
    let b: [f64; 4] = std::array::from_fn(|j| a[j] + a[j + 4]);
    (b[0] + b[2]) + (b[1] + b[3])
}

/// RMSNorm's `1 / sqrt(mean(x^2) + eps)` from the f64 sum of squares of `n` values, rounded
/// once to f32 (the correctly rounded mean that PyTorch's cascaded f32 reduction reaches in
/// practice).
#[inline]
pub fn inv_rms(sum_squares: f64, n: usize, eps: f32) -> f32 {
    let mean = (sum_squares as f32) / n as f32;
    1.0 / (mean + eps).sqrt()
}

/// Running sums of the f16 dot product ([`DotF16Fn`]).
pub const DOT_SUMS: usize = 32;

/// Running sums of the Q8_0 dot product ([`DotQ8_0Fn`]).
pub const Q8_DOT_SUMS: usize = 16;

/// The fixed combination of eight running sums (one vector's lanes):
/// `((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))`, the last step of every dense dot
/// product.
#[inline]
pub fn combine_lanes(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// The fixed combination of the [`Q8_DOT_SUMS`] running sums (see [`DotQ8_0Fn`]).
#[inline]
pub fn combine_q8_sums(s: &[f32; Q8_DOT_SUMS]) -> f32 {
    combine_lanes(&std::array::from_fn(|j| s[j] + s[8 + j]))
}

/// The fixed combination of the [`DOT_SUMS`] running sums: the four groups of eight are added
/// element-wise as `(s0 + s1) + (s2 + s3)`, then the eight results by [`combine_lanes`].
#[inline]
pub fn combine_sums(s: &[f32; DOT_SUMS]) -> f32 {
    combine_lanes(&std::array::from_fn(|j| {
        (s[j] + s[8 + j]) + (s[16 + j] + s[24 + j])
    }))
}

/// A set of kernels for one instruction set.
#[derive(Clone, Copy)]
pub struct Kernels {
    /// Name shown by `bitnet inspect --cpu` and the bench output.
    pub name: &'static str,
    /// Matrix-vector product (decode).
    pub gemv: GemvFn,
    /// Matrix-matrix product (prefill, batches).
    pub gemm: GemmFn,
    /// Matrix-vector product in the dense layout ([`crate::base3`]).
    pub gemv_base3: GemvFn,
    /// Matrix-matrix product in the dense layout.
    pub gemm_base3: GemmFn,
    /// Dot product of an f16 row with f32 values (the output head).
    pub dot_f16: DotF16Fn,
    /// Attention scores against an f32 KV cache's keys.
    pub score_rows_f32: ScoreRowsFn<f32>,
    /// Attention scores against an f16 KV cache's keys.
    pub score_rows_f16: ScoreRowsFn<half::f16>,
    /// Weighted sum of an f32 KV cache's values.
    pub mix_rows_f32: MixRowsFn<f32>,
    /// Weighted sum of an f16 KV cache's values.
    pub mix_rows_f16: MixRowsFn<half::f16>,
    /// Softmax of a row of attention scores.
    pub softmax: SoftmaxFn,
    /// Sum of a row's shifted exponentials (the trainer's cross-entropy).
    pub exp_sum: ExpSumFn,
    /// A row's shifted exponentials, scaled (the cross-entropy's gradient).
    pub exp_scaled: ExpScaledFn,
    /// Dot product of a Q8_0 row with f32 values (a quantized output head).
    pub dot_q8_0: DotQ8_0Fn,
    /// Dot product of a Q6_K row with Q8_0 activations (a Q6_K output head).
    pub dot_q6_k: DotQ6KFn,
    /// A row of tiles of an f32 matrix product ([`crate::sgemm`]).
    pub sgemm_tiles: SgemmTilesFn,
    /// RMSNorm and int8 quantization of one token's row (each BitLinear's input).
    pub rms_norm_quantize: RmsNormQuantizeFn,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernels({})", self.name)
    }
}

impl Kernels {
    /// The scalar reference set.
    pub const SCALAR: Kernels = Kernels {
        name: "scalar",
        gemv: scalar::gemv,
        gemm: scalar::gemm,
        gemv_base3: scalar::gemv_base3,
        gemm_base3: scalar::gemm_base3,
        dot_f16: scalar::dot_f16,
        score_rows_f32: scalar::score_rows::<f32>,
        score_rows_f16: scalar::score_rows::<half::f16>,
        mix_rows_f32: scalar::mix_rows::<f32>,
        mix_rows_f16: scalar::mix_rows::<half::f16>,
        softmax: scalar::softmax,
        exp_sum: scalar::exp_sum,
        exp_scaled: scalar::exp_scaled,
        dot_q8_0: scalar::dot_q8_0,
        dot_q6_k: scalar::dot_q6_k,
        sgemm_tiles: scalar::sgemm_tiles,
        rms_norm_quantize: scalar::rms_norm_quantize,
    };

    /// The AVX2 set (x86-64). Its functions check for AVX2 on every call and fall back to the
    /// scalar ones without it, so they are safe to call anywhere, but only fast with AVX2.
    #[cfg(target_arch = "x86_64")]
    pub const AVX2: Kernels = Kernels {
        name: "avx2",
        gemv: x86::avx2::gemv,
        gemm: x86::avx2::gemm,
        gemv_base3: x86::base3::gemv,
        gemm_base3: x86::base3::gemm,
        dot_f16: x86::avx2::dot_f16,
        score_rows_f32: x86::attention::score_rows::<f32>,
        score_rows_f16: x86::attention::score_rows::<half::f16>,
        mix_rows_f32: x86::attention::mix_rows::<f32>,
        mix_rows_f16: x86::attention::mix_rows::<half::f16>,
        softmax: x86::attention::softmax,
        exp_sum: x86::attention::exp_sum,
        exp_scaled: x86::attention::exp_scaled,
        dot_q8_0: x86::avx2::dot_q8_0,
        dot_q6_k: x86::avx2::dot_q6_k,
        sgemm_tiles: x86::sgemm::tiles,
        rms_norm_quantize: x86::norm::rms_norm_quantize,
    };

    /// The AVX-VNNI set (x86-64): AVX2's with `vpdpbusd` in the ternary products. Its functions
    /// fall back to the AVX2 ones without AVX-VNNI.
    #[cfg(target_arch = "x86_64")]
    pub const AVXVNNI: Kernels = Kernels {
        name: "avxvnni",
        gemv: x86::avxvnni::gemv,
        gemm: x86::avxvnni::gemm,
        ..Kernels::AVX2
    };

    /// The AVX-512 VNNI set (x86-64): 512-bit `vpdpbusd` in the ternary products. Its
    /// functions fall back to the AVX2 ones without AVX-512 F, BW and VNNI.
    #[cfg(target_arch = "x86_64")]
    pub const AVX512VNNI: Kernels = Kernels {
        name: "avx512vnni",
        gemv: x86::avx512::gemv,
        gemm: x86::avx512::gemm,
        ..Kernels::AVX2
    };

    /// The AMX set (x86-64): the AVX-512 VNNI set with its matrix-matrix product on AMX-INT8
    /// tiles. Its product falls back to the AVX-512 VNNI one where the tiles are not granted.
    #[cfg(target_arch = "x86_64")]
    pub const AMX: Kernels = Kernels {
        name: "amx",
        gemm: x86::amx::gemm,
        ..Kernels::AVX512VNNI
    };

    /// The NEON set (AArch64, where NEON is always present). Its functions check for NEON on
    /// every call and fall back to the scalar ones without it.
    #[cfg(target_arch = "aarch64")]
    pub const NEON: Kernels = Kernels {
        name: "neon",
        gemv: aarch64::neon::gemv,
        gemm: aarch64::neon::gemm,
        gemv_base3: aarch64::base3::gemv,
        gemm_base3: aarch64::base3::gemm,
        dot_f16: aarch64::neon::dot_f16,
        score_rows_f32: aarch64::attention::score_rows::<f32>,
        score_rows_f16: aarch64::attention::score_rows::<half::f16>,
        mix_rows_f32: aarch64::attention::mix_rows::<f32>,
        mix_rows_f16: aarch64::attention::mix_rows::<half::f16>,
        softmax: aarch64::attention::softmax,
        exp_sum: aarch64::attention::exp_sum,
        exp_scaled: aarch64::attention::exp_scaled,
        dot_q8_0: aarch64::neon::dot_q8_0,
        dot_q6_k: aarch64::neon::dot_q6_k,
        sgemm_tiles: aarch64::sgemm::tiles,
        rms_norm_quantize: aarch64::norm::rms_norm_quantize,
    };

    /// The NEON set with the dot-product extension (`sdot`, Armv8.2 and later). Its functions
    /// check for it on every call and fall back to the [`NEON`](Self::NEON) ones without it.
    #[cfg(target_arch = "aarch64")]
    pub const NEON_DOTPROD: Kernels = Kernels {
        name: "neon-dotprod",
        gemv: aarch64::neon::gemv_dotprod,
        gemm: aarch64::neon::gemm_dotprod,
        gemv_base3: aarch64::base3::gemv_dotprod,
        gemm_base3: aarch64::base3::gemm_dotprod,
        dot_f16: aarch64::neon::dot_f16,
        score_rows_f32: aarch64::attention::score_rows::<f32>,
        score_rows_f16: aarch64::attention::score_rows::<half::f16>,
        mix_rows_f32: aarch64::attention::mix_rows::<f32>,
        mix_rows_f16: aarch64::attention::mix_rows::<half::f16>,
        softmax: aarch64::attention::softmax,
        exp_sum: aarch64::attention::exp_sum,
        exp_scaled: aarch64::attention::exp_scaled,
        dot_q8_0: aarch64::neon::dot_q8_0,
        dot_q6_k: aarch64::neon::dot_q6_k,
        sgemm_tiles: aarch64::sgemm::tiles,
        rms_norm_quantize: aarch64::norm::rms_norm_quantize,
    };

    /// The best set for this CPU, or the one `BITNET_KERNELS` names (see the module docs),
    /// chosen on first call.
    pub fn get() -> &'static Kernels {
        static CHOSEN: OnceLock<Kernels> = OnceLock::new();
        CHOSEN.get_or_init(Self::select)
    }

    /// Every set this CPU can run, the scalar reference first and the best last.
    pub fn available() -> Vec<&'static Kernels> {
        #[allow(unused_mut)]
        let mut sets: Vec<&'static Kernels> = vec![&Kernels::SCALAR];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            sets.push(&Kernels::AVX2);
            if x86::avxvnni::detected() {
                sets.push(&Kernels::AVXVNNI);
            }
            if x86::avx512::detected() {
                sets.push(&Kernels::AVX512VNNI);
            }
            if x86::amx::detected() {
                sets.push(&Kernels::AMX);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            sets.push(&Kernels::NEON);
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                sets.push(&Kernels::NEON_DOTPROD);
            }
        }
        sets
    }

    /// The set named `name` (case-insensitive, surrounding spaces ignored) if this CPU can
    /// run it.
    pub fn by_name(name: &str) -> Option<&'static Kernels> {
        let name = name.trim();
        Self::available()
            .into_iter()
            .find(|k| k.name.eq_ignore_ascii_case(name))
    }

    fn select() -> Kernels {
        let available = Self::available();
        let best = *available
            .last()
            .expect("the scalar set is always available");
        std::env::var("BITNET_KERNELS")
            .ok()
            .and_then(|name| Self::by_name(&name))
            .copied()
            .unwrap_or(*best)
    }
}

#[cfg(test)]
mod tests {
    /// `n` int8 activations in `[-127, 127]` (all -127 when `extreme`) and their `n / 32`
    /// block scales, as the Q8_0 and Q6_K dot products take them.
    fn q8_activations(
        next: &mut impl FnMut() -> u64,
        n: usize,
        extreme: bool,
    ) -> (Vec<i8>, Vec<f32>) {
        let xq = (0..n)
            .map(|_| {
                if extreme {
                    -127
                } else {
                    ((next() % 255) as i32 - 127) as i8
                }
            })
            .collect();
        let xd = (0..n / 32).map(|_| (next() % 997) as f32 * 1e-3).collect();
        (xq, xd)
    }

    /// A xorshift64 stream: cheap, deterministic test data.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    #[test]
    fn dot_q8_0_sets_match_scalar_bit_for_bit() {
        let mut next = xorshift(0x0fed_cba9_8765_4321u64);
        for blocks in [0usize, 1, 2, 3, 7, 80] {
            for extreme in [false, true] {
                let mut row = Vec::new();
                for _ in 0..blocks {
                    row.extend_from_slice(
                        &half::f16::from_f32((next() % 1000) as f32 * 1e-4).to_le_bytes(),
                    );
                    // -128 is a valid stored byte even though ggml's quantizer never writes it.
                    row.extend((0..32).map(|_| if extreme { 0x80 } else { next() as u8 }));
                }
                let (xq, xd) = q8_activations(&mut next, blocks * 32, extreme);
                let want = scalar::dot_q8_0(&row, &xq, &xd);
                // The value against f64 arithmetic, the kernels for the bits.
                let exact: f64 = (0..blocks * 32)
                    .map(|k| {
                        let b = &row[k / 32 * 34..];
                        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32() as f64;
                        d * (b[2 + k % 32] as i8) as f64 * xq[k] as f64 * xd[k / 32] as f64
                    })
                    .sum();
                assert!((want as f64 - exact).abs() <= 1e-4 * (1.0 + exact.abs()));
                for k in Kernels::available() {
                    assert_eq!(
                        (k.dot_q8_0)(&row, &xq, &xd).to_bits(),
                        want.to_bits(),
                        "{} {blocks} extreme={extreme}",
                        k.name
                    );
                }
            }
        }
    }

    #[test]
    fn dot_q6_k_sets_match_scalar_bit_for_bit() {
        use crate::q6_k::{dequantize_q6_k, Q6_K_BLOCK, Q6_K_BYTES};
        let mut next = xorshift(0x5eed_0f00_d6d6_1234u64);
        for blocks in [0usize, 1, 2, 3, 10] {
            for extreme in [false, true] {
                let mut row: Vec<u8> = (0..blocks * Q6_K_BYTES)
                    .map(|_| if extreme { 0xff } else { next() as u8 })
                    .collect();
                for b in row.chunks_exact_mut(Q6_K_BYTES) {
                    let d = half::f16::from_f32((next() % 1000) as f32 * 1e-5);
                    b[208..].copy_from_slice(&d.to_le_bytes());
                    if extreme {
                        b[192..208].fill(0x80); // scale -128 with code 63 - 32 = 31
                    }
                }
                let (xq, xd) = q8_activations(&mut next, blocks * Q6_K_BLOCK, extreme);
                let want = scalar::dot_q6_k(&row, &xq, &xd);
                // The value against the decoded row in f64, the kernels for the bits.
                let mut w = vec![0f32; blocks * Q6_K_BLOCK];
                dequantize_q6_k(&row, &mut w);
                let exact: f64 = (0..w.len())
                    .map(|k| w[k] as f64 * xq[k] as f64 * xd[k / 32] as f64)
                    .sum();
                let size: f64 = (0..w.len())
                    .map(|k| (w[k] as f64 * xq[k] as f64 * xd[k / 32] as f64).abs())
                    .sum();
                assert!(
                    (want as f64 - exact).abs() <= 1e-5 * (1.0 + size),
                    "{want} vs {exact}"
                );
                for k in Kernels::available() {
                    assert_eq!(
                        (k.dot_q6_k)(&row, &xq, &xd).to_bits(),
                        want.to_bits(),
                        "{} {blocks} extreme={extreme}",
                        k.name
                    );
                }
                // Fewer activation blocks than the row holds: only whole Q6_K blocks count.
                if blocks > 1 {
                    let part = scalar::dot_q6_k(&row, &xq, &xd[..8 * (blocks - 1) + 3]);
                    let first = scalar::dot_q6_k(&row[..(blocks - 1) * Q6_K_BYTES], &xq, &xd);
                    assert_eq!(part.to_bits(), first.to_bits());
                }
            }
        }
    }

    #[test]
    fn dot_f16_sets_match_scalar_bit_for_bit() {
        let mut bits = xorshift(0x1234_5678_9abc_def0u64);
        let mut next = || ((bits() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
        for n in [
            0usize, 1, 7, 8, 9, 31, 32, 33, 63, 255, 256, 257, 2560, 2561,
        ] {
            let w: Vec<half::f16> = (0..n).map(|_| half::f16::from_f32(next() * 0.1)).collect();
            let x: Vec<f32> = (0..n).map(|_| next() * 10.0).collect();
            let want = scalar::dot_f16(&w, &x);
            for k in Kernels::available() {
                assert_eq!(
                    (k.dot_f16)(&w, &x).to_bits(),
                    want.to_bits(),
                    "{} n={n}",
                    k.name
                );
            }
        }
    }

    /// Attention's rows in both cache types: every set against the scalar one, bit for bit,
    /// on head sizes with and without a tail, and the scalar one against the definition.
    #[test]
    fn attention_rows_sets_match_scalar_bit_for_bit() {
        use half::f16;
        let mut bits = xorshift(0x0bad_cafe_f00d_1234u64);
        let mut next = || ((bits() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
        for hd in [1usize, 7, 8, 31, 32, 33, 64, 96, 100, 128, 200] {
            for rows in [0usize, 1, 5, 17] {
                let stride = hd + 3;
                let len = rows_span(rows, stride, hd);
                let q: Vec<f32> = (0..hd).map(|_| next() * 3.0).collect();
                let kv: Vec<f32> = (0..len).map(|_| next()).collect();
                let kv16: Vec<f16> = kv.iter().map(|&v| f16::from_f32(v)).collect();
                let w: Vec<f32> = (0..rows).map(|_| next().abs()).collect();
                let out0: Vec<f32> = (0..hd).map(|_| next()).collect();
                let mut want32 = vec![0f32; rows];
                scalar::score_rows(&q, &kv, stride, &mut want32);
                let mut want16 = vec![0f32; rows];
                scalar::score_rows(&q, &kv16, stride, &mut want16);
                for j in 0..rows {
                    let row = &kv[j * stride..j * stride + hd];
                    // The order of ScoreRowsFn, spelled out: 8 running sums of fused steps,
                    // then combine_lanes.
                    let spelled = |row: &mut dyn Iterator<Item = f32>| {
                        let mut sums = [0f32; SCORE_SUMS];
                        for (i, (&a, b)) in q.iter().zip(row).enumerate() {
                            sums[i % SCORE_SUMS] = a.mul_add(b, sums[i % SCORE_SUMS]);
                        }
                        combine_lanes(&sums)
                    };
                    let want = spelled(&mut row.iter().copied());
                    assert_eq!(want32[j].to_bits(), want.to_bits());
                    let exact: f64 = q.iter().zip(row).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let size: f64 = q
                        .iter()
                        .zip(row)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum();
                    assert!((want32[j] as f64 - exact).abs() <= 1e-6 * (1.0 + size));
                    let row16 = &kv16[j * stride..j * stride + hd];
                    let want = spelled(&mut row16.iter().map(|v| v.to_f32()));
                    assert_eq!(want16[j].to_bits(), want.to_bits());
                }
                let mut mix32 = out0.clone();
                scalar::mix_rows(&mut mix32, &w, &kv, stride);
                let mut mix16 = out0.clone();
                scalar::mix_rows(&mut mix16, &w, &kv16, stride);
                for i in 0..hd {
                    let mut e32 = out0[i];
                    let mut e16 = out0[i];
                    for j in 0..rows {
                        e32 += w[j] * kv[j * stride + i];
                        e16 += w[j] * kv16[j * stride + i].to_f32();
                    }
                    assert_eq!(mix32[i].to_bits(), e32.to_bits(), "mix f32 hd={hd} i={i}");
                    assert_eq!(mix16[i].to_bits(), e16.to_bits(), "mix f16 hd={hd} i={i}");
                }
                let same =
                    |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                for k in Kernels::available() {
                    let what = format!("{} hd={hd} rows={rows}", k.name);
                    let mut got = vec![7f32; rows];
                    (k.score_rows_f32)(&q, &kv, stride, &mut got);
                    assert!(same(&got, &want32), "score f32 {what}");
                    (k.score_rows_f16)(&q, &kv16, stride, &mut got);
                    assert!(same(&got, &want16), "score f16 {what}");
                    let mut got = out0.clone();
                    (k.mix_rows_f32)(&mut got, &w, &kv, stride);
                    assert!(same(&got, &mix32), "mix f32 {what}");
                    let mut got = out0.clone();
                    (k.mix_rows_f16)(&mut got, &w, &kv16, stride);
                    assert!(same(&got, &mix16), "mix f16 {what}");
                }
            }
        }
    }

    /// The exponential against f64's, over the whole range a softmax feeds it, and at its
    /// edges.
    #[test]
    fn exp_nonpositive_is_within_2_to_the_minus_22_of_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let d = -(i as f32) * (87.0 / 200_000.0);
            let got = scalar::exp_nonpositive(d) as f64;
            let want = (d as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        // 2 ulp of f32 at the top of a binade, 4 at its bottom.
        assert!(worst <= 2.0f64.powi(-22), "relative error {worst:e}");
        assert_eq!(scalar::exp_nonpositive(0.0), 1.0);
        assert_eq!(scalar::exp_nonpositive(-0.0), 1.0);
        assert_eq!(scalar::exp_nonpositive(-87.5), 0.0);
        assert_eq!(scalar::exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(scalar::exp_nonpositive(f32::NAN).is_nan());
    }

    /// The cross-entropy's exponentials: every set against the scalar one, bit for bit, on
    /// lengths with and without a tail; the scalar sum against f64's within its rounding.
    #[test]
    fn exp_sum_and_scaled_sets_match_scalar_bit_for_bit() {
        let mut bits = xorshift(0x5eed_e4b5_0c1a_0002u64);
        let mut next = || ((bits() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
        for n in [1usize, 3, 7, 8, 9, 15, 16, 17, 100, 2048, 2053] {
            for spread in [0.5f32, 8.0, 60.0, 200.0] {
                let x: Vec<f32> = (0..n).map(|_| next() * spread).collect();
                let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let want = scalar::exp_sum(&x, m);
                let exact: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
                // Each term within a few ulp (see `exponential_matches_f64`), the n additions
                // within one rounding each.
                let bound = exact * (n as f64 + 8.0) * 2f64.powi(-23);
                assert!(
                    (want as f64 - exact).abs() <= bound,
                    "n={n}: {want} vs {exact}"
                );
                let mut want_scaled = vec![0f32; n];
                scalar::exp_scaled(&x, m, 0.37, &mut want_scaled);
                for (i, &v) in x.iter().enumerate() {
                    let e = scalar::exp_nonpositive(v - m) * 0.37;
                    assert_eq!(want_scaled[i].to_bits(), e.to_bits());
                }
                for k in Kernels::available() {
                    let got = (k.exp_sum)(&x, m);
                    assert_eq!(got.to_bits(), want.to_bits(), "{} n={n}", k.name);
                    // A longer output keeps its values past `x.len()`.
                    let mut out = vec![5.0f32; n + 3];
                    (k.exp_scaled)(&x, m, 0.37, &mut out);
                    let same = out[..n]
                        .iter()
                        .zip(&want_scaled)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same && out[n..] == [5.0; 3], "{} n={n}", k.name);
                }
            }
        }
        for k in Kernels::available() {
            // exp(0) terms: the sum counts them exactly; a NaN poisons the sum.
            assert_eq!((k.exp_sum)(&[2.0; 19], 2.0), 19.0, "{}", k.name);
            let mut x = vec![0.0f32; 12];
            x[10] = f32::NAN;
            assert!((k.exp_sum)(&x, 0.0).is_nan(), "{}", k.name);
        }
    }

    /// RMSNorm with the activation quantizer: the scalar kernel against the two steps it
    /// fuses and a closed form; every set against the scalar one, bit for bit, on lengths with
    /// and without tails, tiny, huge, zero and non-finite rows.
    #[test]
    fn rms_norm_quantize_sets_match_scalar_bit_for_bit() {
        let mut bits = xorshift(0x5eed_a0b5_3d1e_0003u64);
        let mut next = || ((bits() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
        let mut rows: Vec<Vec<f32>> = Vec::new();
        for n in [1usize, 3, 7, 8, 15, 16, 17, 31, 32, 33, 47, 100, 2560, 2563] {
            for scale in [1e-30f32, 1e-3, 1.0, 40.0, 1e18] {
                rows.push((0..n).map(|_| next() * scale).collect());
            }
        }
        rows.push(vec![0.0; 40]);
        let mut nan = rows[62].clone();
        nan[5] = f32::NAN;
        let mut inf = rows[62].clone();
        inf[33] = f32::INFINITY;
        rows.extend([nan, inf]);
        for (t, x) in rows.iter().enumerate() {
            let n = x.len();
            let w: Vec<f32> = (0..n).map(|i| 0.5 + ((i * 7) % 13) as f32 * 0.1).collect();
            let eps = 1e-5;
            // The two steps it fuses: the normalised row written out, then quantized.
            let r = inv_rms(scalar::sum_squares(x), n, eps);
            let y: Vec<f32> = x.iter().zip(&w).map(|(&v, &g)| g * (v * r)).collect();
            let mut want_q = vec![0i8; n + 5];
            let want_s = crate::quantize_activations(&y, &mut want_q);
            let mut q = vec![9i8; n + 5];
            let s = scalar::rms_norm_quantize(x, &w, eps, &mut q);
            assert_eq!((s.to_bits(), &q), (want_s.to_bits(), &want_q), "row {t}");
            for k in Kernels::available() {
                let mut got = vec![9i8; n + 5];
                let s = (k.rms_norm_quantize)(x, &w, eps, &mut got);
                assert_eq!(s.to_bits(), want_s.to_bits(), "{} row {t} (n={n})", k.name);
                assert_eq!(got, want_q, "{} row {t} (n={n})", k.name);
            }
        }
        // The sixteen f64 sums of exact squares against one sum, within their roundings.
        let x = &rows[67];
        let one: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        let sixteen = scalar::sum_squares(x);
        assert!((sixteen - one).abs() <= one * x.len() as f64 * f64::EPSILON);
        // mean(x^2) = 12.5: y = (3, 4) / sqrt(12.5), s = 127 / y_1, codes round(y * s).
        let mut q = [0i8; 2];
        let s = scalar::rms_norm_quantize(&[3.0, 4.0], &[1.0, 1.0], 0.0, &mut q);
        let y1 = 4.0 * (1.0 / 12.5f32.sqrt());
        assert_eq!(s, (1.0 / y1) * 127.0);
        assert_eq!(q, [95, 127]);
    }

    /// Softmax: every set against the scalar one, bit for bit, on lengths with and without a
    /// tail; the scalar one against the f64 definition and closed forms.
    #[test]
    fn softmax_sets_match_scalar_bit_for_bit() {
        let mut bits = xorshift(0x5eed_50f7_3a40_0001u64);
        let mut next = || ((bits() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
        for n in [1usize, 2, 7, 8, 9, 16, 31, 33, 100, 257, 1030] {
            for spread in [0.5f32, 8.0, 60.0, 400.0] {
                let scores: Vec<f32> = (0..n).map(|_| next() * spread).collect();
                let scale = 0.088_388_35;
                let mut want = scores.clone();
                scalar::softmax(&mut want, scale);
                // The f64 softmax of the same scaled scores.
                let y: Vec<f64> = scores.iter().map(|&v| (v * scale) as f64).collect();
                let m = y.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = y.iter().map(|v| (v - m).exp()).sum();
                for (i, (&g, v)) in want.iter().zip(&y).enumerate() {
                    let e = (v - m).exp() / z;
                    // f32 rounds `y - m` by up to half an ulp of its size, which moves the
                    // exponential by that much relatively; the exponential, the sum and the
                    // division add a few ulp.
                    let bound = ((v - m).abs() * 2f64.powi(-24) + 1e-6) * e;
                    assert!((g as f64 - e).abs() <= bound, "n={n} i={i}: {g} vs {e}");
                }
                for k in Kernels::available() {
                    let mut got = scores.clone();
                    (k.softmax)(&mut got, scale);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{} n={n} spread={spread}", k.name);
                }
            }
        }
        for k in Kernels::available() {
            // Equal scores share the mass equally; a masked (-inf) score gets none; a NaN
            // score makes the row NaN rather than quietly dropping out.
            let mut x = vec![3.0f32; 12];
            (k.softmax)(&mut x, 1.0);
            assert!(x.iter().all(|&v| v == 1.0 / 12.0), "{}", k.name);
            let mut x = vec![
                1.0f32,
                2.0,
                f32::NEG_INFINITY,
                3.0,
                0.5,
                0.25,
                -1.0,
                2.5,
                -7.0,
            ];
            (k.softmax)(&mut x, 1.0);
            assert_eq!(x[2], 0.0, "{}", k.name);
            assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{}", k.name);
            let mut x = vec![1.0f32; 10];
            x[9] = f32::NAN;
            (k.softmax)(&mut x, 1.0);
            assert!(x.iter().all(|v| v.is_nan()), "{}", k.name);
        }
    }

    use super::*;
    use crate::{Base3Matrix, TernaryMatrix, ROW_GROUP};
    use proptest::prelude::*;

    /// xorshift64*: a tiny seeded generator, enough for test data.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn code(&mut self) -> i8 {
            ((self.next() >> 33) % 3) as i8 - 1
        }

        fn i8(&mut self) -> i8 {
            (self.next() >> 56) as u8 as i8
        }
    }

    /// How a case's codes and activations are drawn.
    #[derive(Clone, Copy, Debug)]
    enum Fill {
        /// Uniform codes and uniform int8 activations (-128 and 127 included).
        Random,
        /// Uniform codes, activations only -128 or 127.
        Extremes,
        /// Every code +1, every activation -128: the most negative sums.
        PlusOnesMin,
        /// Every code -1, every activation -128: the most positive sums.
        MinusOnesMin,
        /// Uniform codes and activations, and garbage (not zeros) in the activation padding,
        /// which weight-0 padding codes must cancel.
        DirtyPadding,
    }

    const FILLS: [Fill; 5] = [
        Fill::Random,
        Fill::Extremes,
        Fill::PlusOnesMin,
        Fill::MinusOnesMin,
        Fill::DirtyPadding,
    ];

    struct Case {
        rows: usize,
        cols: usize,
        tokens: usize,
        codes: Vec<i8>,
        m: TernaryMatrix,
        /// `tokens` padded activation rows, end to end.
        x: Vec<i8>,
        /// The same codes in the dense layout.
        m3: Base3Matrix,
        /// The same activations padded for the dense layout (its own padding drawn anew).
        x3: Vec<i8>,
    }

    impl Case {
        fn new(rows: usize, cols: usize, tokens: usize, fill: Fill, seed: u64) -> Case {
            let mut rng = Rng::new(seed ^ ((rows * 1_000_003 + cols * 7919 + tokens) as u64));
            let codes: Vec<i8> = (0..rows * cols)
                .map(|_| match fill {
                    Fill::PlusOnesMin => 1,
                    Fill::MinusOnesMin => -1,
                    _ => rng.code(),
                })
                .collect();
            let m = TernaryMatrix::from_codes(&codes, rows, cols).unwrap();
            let m3 = Base3Matrix::from_codes(&codes, rows, cols).unwrap();
            let (k, k3) = (
                TernaryMatrix::padded_cols(cols),
                Base3Matrix::padded_cols(cols),
            );
            let mut x = vec![0i8; tokens * k];
            let mut x3 = vec![0i8; tokens * k3];
            for (row, row3) in x.chunks_exact_mut(k).zip(x3.chunks_exact_mut(k3)) {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = Self::activation(&mut rng, fill, i >= cols);
                }
                row3[..cols].copy_from_slice(&row[..cols]);
                for v in &mut row3[cols..] {
                    *v = Self::activation(&mut rng, fill, true);
                }
            }
            Case {
                rows,
                cols,
                tokens,
                codes,
                m,
                x,
                m3,
                x3,
            }
        }

        /// One activation of `fill`, in the padding or not.
        fn activation(rng: &mut Rng, fill: Fill, padding: bool) -> i8 {
            match fill {
                _ if padding && !matches!(fill, Fill::DirtyPadding) => 0,
                Fill::Random | Fill::DirtyPadding => rng.i8(),
                Fill::Extremes => [-128, 127][(rng.next() >> 63) as usize],
                Fill::PlusOnesMin | Fill::MinusOnesMin => -128,
            }
        }

        /// The definition, in i64 so that it cannot overflow.
        fn expected(&self) -> Vec<i32> {
            let k = TernaryMatrix::padded_cols(self.cols);
            let mut out = vec![0i32; self.tokens * self.rows];
            for t in 0..self.tokens {
                for r in 0..self.rows {
                    let s: i64 = (0..self.cols)
                        .map(|c| self.codes[r * self.cols + c] as i64 * self.x[t * k + c] as i64)
                        .sum();
                    out[t * self.rows + r] = i32::try_from(s).unwrap();
                }
            }
            out
        }

        /// Checks every available set against the definition, in both layouts, with `gemm`
        /// on all tokens, `gemv` on each token, and both on row chunks as `BitLinear` calls
        /// them.
        fn check(&self) {
            let want = self.expected();
            let what = format!("[{}, {}] x {} tokens", self.rows, self.cols, self.tokens);
            for ks in Kernels::available() {
                let layouts = [
                    (
                        "2-bit",
                        self.m.bytes(),
                        self.m.row_bytes(),
                        4,
                        ks.gemv,
                        ks.gemm,
                        &self.x,
                    ),
                    (
                        "base-3",
                        self.m3.bytes(),
                        self.m3.row_bytes(),
                        5,
                        ks.gemv_base3,
                        ks.gemm_base3,
                        &self.x3,
                    ),
                ];
                for (layout, w, rb, per_byte, gemv, gemm, x) in layouts {
                    let what = format!("{} {layout} {what}", ks.name);
                    self.check_layout(&want, w, rb, rb * per_byte, gemv, gemm, x, &what);
                }
            }
        }

        #[allow(clippy::too_many_arguments)]
        fn check_layout(
            &self,
            want: &[i32],
            w: &[u8],
            rb: usize,
            k: usize,
            gemv: GemvFn,
            gemm: GemmFn,
            x: &[i8],
            what: &str,
        ) {
            // Sentinels catch outputs that are never written.
            let mut out = vec![0x5A5A_5A5A; self.tokens * self.rows];
            gemm(w, rb, x, self.tokens, &mut out);
            assert_eq!(out, want, "gemm {what}");
            for t in 0..self.tokens {
                let want_t = &want[t * self.rows..(t + 1) * self.rows];
                let x_t = &x[t * k..(t + 1) * k];
                let mut out = vec![0x5A5A_5A5A; self.rows];
                gemv(w, rb, x_t, &mut out);
                assert_eq!(out, want_t, "gemv token {t} {what}");
                // Chunks of whole row groups, as BitLinear's tasks call the kernels.
                for chunk in [ROW_GROUP, 2 * ROW_GROUP] {
                    let mut out = vec![0x5A5A_5A5A; self.rows];
                    for (i, o) in out.chunks_mut(chunk).enumerate() {
                        let r0 = i * chunk;
                        let end = TernaryMatrix::padded_rows(r0 + o.len());
                        gemv(&w[r0 * rb..end * rb], rb, x_t, o);
                    }
                    assert_eq!(out, want_t, "chunked gemv token {t} {what}");
                }
            }
            let chunk = 2 * ROW_GROUP;
            for r0 in (0..self.rows).step_by(chunk) {
                let n = chunk.min(self.rows - r0);
                let end = TernaryMatrix::padded_rows(r0 + n);
                let mut out = vec![0x5A5A_5A5A; self.tokens * n];
                gemm(&w[r0 * rb..end * rb], rb, x, self.tokens, &mut out);
                for t in 0..self.tokens {
                    assert_eq!(
                        &out[t * n..(t + 1) * n],
                        &want[t * self.rows + r0..t * self.rows + r0 + n],
                        "chunked gemm rows {r0}.. token {t} {what}"
                    );
                }
            }
        }
    }

    const ROWS: [usize; 7] = [1, 2, 3, 5, 17, 64, 65];
    const COLS: [usize; 11] = [1, 31, 127, 128, 129, 255, 256, 300, 1000, 2560, 6912];
    const TOKENS: [usize; 6] = [1, 2, 3, 4, 5, 9];

    fn all_shapes(fill: Fill) {
        for &rows in &ROWS {
            for &cols in &COLS {
                for &tokens in &TOKENS {
                    Case::new(rows, cols, tokens, fill, 0xB17E7).check();
                }
            }
        }
    }

    #[test]
    fn all_sets_match_the_definition_on_random_data() {
        all_shapes(Fill::Random);
    }

    #[test]
    fn all_sets_match_the_definition_on_extreme_activations() {
        all_shapes(Fill::Extremes);
    }

    #[test]
    fn all_sets_survive_the_largest_sums() {
        all_shapes(Fill::PlusOnesMin);
        all_shapes(Fill::MinusOnesMin);
        // Rows far longer than any model's: still exact (no i16 overflow inside).
        for fill in [Fill::PlusOnesMin, Fill::MinusOnesMin, Fill::Extremes] {
            for cols in [16384, 65536 + 1] {
                Case::new(2, cols, 5, fill, 1).check();
            }
        }
    }

    #[test]
    fn all_sets_match_on_prefill_sized_batches() {
        // Sixteen tokens and more: the AMX set's tiles, with its leftover tokens, partial
        // row tiles and passes cut short by the rows a call holds.
        let shapes = [
            (1, 1),
            (8, 128),
            (17, 300),
            (33, 2560),
            (70, 1000),
            (64, 6912),
        ];
        for fill in FILLS {
            for (rows, cols) in shapes {
                for tokens in [16, 17, 32, 33, 48, 50] {
                    Case::new(rows, cols, tokens, fill, 0x7A11).check();
                }
            }
        }
    }

    #[test]
    fn all_sets_ignore_activation_padding() {
        all_shapes(Fill::DirtyPadding);
    }

    #[test]
    fn block_scaled_slices_match() {
        // BitLinear's block-scaled path calls gemv on one row group's run of blocks, which is
        // itself a row group of shorter rows.
        let c = Case::new(7, 1024, 1, Fill::Random, 9);
        let (w, rb) = (c.m.bytes(), c.m.row_bytes());
        let want_rows = c.expected();
        for block in [128, 256, 512] {
            let bb = block / 4;
            for g in 0..c.rows.div_ceil(ROW_GROUP) {
                let mut whole = [0i32; ROW_GROUP];
                for b in 0..c.cols / block {
                    let at = g * ROW_GROUP * rb + b * ROW_GROUP * bb;
                    let part = &w[at..at + ROW_GROUP * bb];
                    let x = &c.x[b * block..(b + 1) * block];
                    let mut want = [0i32; ROW_GROUP];
                    scalar::gemv(part, bb, x, &mut want);
                    for ks in Kernels::available() {
                        let mut got = [7i32; ROW_GROUP];
                        (ks.gemv)(part, bb, x, &mut got);
                        assert_eq!(got, want, "{} block {block} group {g} #{b}", ks.name);
                    }
                    for (s, v) in whole.iter_mut().zip(want) {
                        *s += v;
                    }
                }
                for (i, &s) in whole.iter().enumerate() {
                    if let Some(&r) = want_rows.get(g * ROW_GROUP + i) {
                        assert_eq!(s, r, "the parts of row {} add up", g * ROW_GROUP + i);
                    }
                }
            }
        }
    }

    #[test]
    fn available_sets_and_names() {
        let sets = Kernels::available();
        assert_eq!(sets[0].name, "scalar");
        let names: Vec<_> = sets.iter().map(|k| k.name).collect();
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            names.contains(&"avx2"),
            is_x86_feature_detected!("avx2"),
            "{names:?}"
        );
        #[cfg(target_arch = "aarch64")]
        {
            use std::arch::is_aarch64_feature_detected;
            let neon = is_aarch64_feature_detected!("neon");
            let dot = neon && is_aarch64_feature_detected!("dotprod");
            assert_eq!(names.contains(&"neon"), neon, "{names:?}");
            assert_eq!(names.contains(&"neon-dotprod"), dot, "{names:?}");
            assert_eq!(Kernels::by_name("NEON-DotProd").is_some(), dot);
        }
        assert_eq!(Kernels::by_name("scalar").unwrap().name, "scalar");
        assert_eq!(Kernels::by_name(" Scalar\n").unwrap().name, "scalar");
        assert!(Kernels::by_name("avx512").is_none());
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(
                names.contains(&"avxvnni"),
                x86::avxvnni::detected(),
                "{names:?}"
            );
            assert_eq!(
                names.contains(&"avx512vnni"),
                x86::avx512::detected(),
                "{names:?}"
            );
            assert_eq!(names.contains(&"amx"), x86::amx::detected(), "{names:?}");
        }
        assert!(Kernels::by_name("").is_none());
        for k in &sets {
            assert_eq!(Kernels::by_name(k.name).unwrap().name, k.name);
        }
        // `get` honours BITNET_KERNELS when it names an available set, else picks the best.
        let want = std::env::var("BITNET_KERNELS")
            .ok()
            .and_then(|n| Kernels::by_name(&n))
            .unwrap_or(sets[sets.len() - 1]);
        assert_eq!(Kernels::get().name, want.name);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn all_sets_match_on_random_shapes(
            rows in 1usize..70,
            cols in 1usize..3000,
            tokens in 1usize..40,
            fill in 0usize..FILLS.len(),
            seed in any::<u64>(),
        ) {
            Case::new(rows, cols, tokens, FILLS[fill], seed).check();
        }
    }
}
