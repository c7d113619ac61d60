//! The BitNet b1.58 quantizers, exactly as the reference defines them (FORMATS.md section 2).
//!
//! Rounding is half to even (`round_ties_even`), as `torch.round` does; `f32::round` (half away
//! from zero) would flip codes that sit exactly on a .5 boundary.

/// Smallest absmean / absmax the quantizers divide by, so all-zero inputs stay finite.
pub const QUANT_EPS: f32 = 1e-5;

/// Lanes of the vector accumulator in the reduction that [`torch_sum`] reproduces.
pub const TORCH_SUM_LANES: usize = 8;

/// Sums `x` in f32 in exactly the order of PyTorch's single-threaded CPU `sum` over a
/// contiguous tensor (its cascade reduction): `lanes`-wide vector accumulators, four of them
/// in parallel, folded through four levels of partial sums, then the scalar tail and the lanes.
///
/// The weight scale must equal the reference bit for bit: an f64 sum rounded once differs from
/// PyTorch's f32 cascade by an ulp or two on some tensors, and an ulp of the scale can flip a
/// code or an activation rounding downstream.
pub fn torch_sum(x: &[f32], lanes: usize) -> f32 {
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let vecs = x.len() / lanes;
    let vec = |i: usize| &x[i * lanes..(i + 1) * lanes];
    let add = |acc: &mut [f32], v: &[f32]| acc.iter_mut().zip(v).for_each(|(a, b)| *a += b);
    // Vector "rows" of ILP vectors each, reduced with the multi-level cascade.
    let rows = vecs / ILP;
    let ceil_log2 = if rows <= 1 {
        0
    } else {
        usize::BITS - (rows - 1).leading_zeros()
    } as usize;
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = vec![vec![0f32; ILP * lanes]; LEVELS];
    let mut i = 0;
    while i + level_step <= rows {
        for _ in 0..level_step {
            for k in 0..ILP {
                add(&mut acc[0][k * lanes..(k + 1) * lanes], vec(i * ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lo, hi) = acc.split_at_mut(j);
            add(&mut hi[0], &lo[j - 1]);
            lo[j - 1].fill(0.0);
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        for k in 0..ILP {
            add(&mut acc[0][k * lanes..(k + 1) * lanes], vec(i * ILP + k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        let (lo, hi) = acc.split_at_mut(j);
        add(&mut lo[0], &hi[0]);
    }
    let mut partial: Vec<f32> = acc[0][..lanes].to_vec();
    for v in rows * ILP..vecs {
        add(&mut partial, vec(v));
    }
    for k in 1..ILP {
        add(&mut partial, &acc[0][k * lanes..(k + 1) * lanes]);
    }
    let mut total = 0f32;
    for &t in &x[vecs * lanes..] {
        total += t;
    }
    for p in partial {
        total += p;
    }
    total
}

/// The per-tensor weight scale `s_w = 1 / max(mean(|W|), 1e-5)`, with the mean computed as
/// PyTorch computes it (see [`torch_sum`]), so scales of master weights quantized here equal
/// those of transformers bit for bit.
pub fn weight_scale(w: &[f32]) -> f32 {
    let abs: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    let mean = torch_sum(&abs, TORCH_SUM_LANES) / (w.len().max(1) as f32);
    1.0 / mean.max(QUANT_EPS)
}

/// Ternary codes `clamp(round(w * s_w), -1, 1)` of `w` with the scale of [`weight_scale`].
///
/// Returns the codes (same length as `w`) and `s_w`.
pub fn quantize_weights(w: &[f32]) -> (Vec<i8>, f32) {
    let s = weight_scale(w);
    let codes = w
        .iter()
        .map(|&v| (v * s).round_ties_even().clamp(-1.0, 1.0) as i8)
        .collect();
    (codes, s)
}

/// `v` rounded to the nearest integer, halves to even, for `|v| <= 2^22` (NaN stays NaN):
/// adding and subtracting `1.5 * 2^23` leaves no fraction bits, and the addition rounds to
/// even, as [`f32::round_ties_even`] does. Unlike that function, which compiles to a libm call
/// on baseline x86-64, this is two additions the compiler vectorizes.
#[inline]
pub fn round_half_even_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    (v + MAGIC) - MAGIC
}

/// `v as i8` for an integer `v` in `[-128, 127]`, and 0 for NaN, as that cast gives, but in
/// operations the compiler vectorizes (the saturating cast compiles to scalar code): adding
/// `1.5 * 2^23` leaves `v` in the low mantissa bits, two's complement for negative `v`.
#[inline(always)]
pub fn int8_of_integer(v: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let low = (v + MAGIC).to_bits() as u8 as i8;
    if v.is_nan() {
        0
    } else {
        low
    }
}

/// Quantizes one token's activations to int8 and returns `s_x = 127 / max(max|x|, 1e-5)`.
///
/// The division is computed as PyTorch evaluates `127 / tensor` (`tensor.reciprocal() * 127`):
/// `(1 / m) * 127` in f32, which differs from a direct `127 / m` by an ulp for some `m`.
///
/// `q` may be longer than `x` (kernels want rows padded to whole blocks): the tail is zeroed.
pub fn quantize_activations(x: &[f32], q: &mut [i8]) -> f32 {
    debug_assert!(q.len() >= x.len());
    let amax = x.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
    let s = activation_scale(amax);
    for (qi, &xi) in q.iter_mut().zip(x) {
        *qi = activation_code(xi * s);
    }
    q[x.len()..].fill(0);
    s
}

/// The activation scale `s_x` of a token whose largest magnitude is `amax`, as PyTorch
/// evaluates `127 / max(amax, 1e-5)` (see [`quantize_activations`]).
#[inline]
pub fn activation_scale(amax: f32) -> f32 {
    (1.0 / amax.max(QUANT_EPS)) * 127.0
}

/// The int8 code of one scaled activation `v = x * s_x`: rounded half to even, clamped to
/// `[-128, 127]`, 0 for NaN.
#[inline(always)]
pub fn activation_code(v: f32) -> i8 {
    int8_of_integer(round_half_even_small(v).clamp(-128.0, 127.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_of_integer_is_the_cast() {
        for v in -128..=127 {
            assert_eq!(int8_of_integer(v as f32), v as i8);
        }
        assert_eq!(int8_of_integer(-0.0), 0);
        for nan in [f32::NAN, -f32::NAN, f32::from_bits(0x7fc0_00ff)] {
            assert_eq!(int8_of_integer(nan), 0);
        }
    }

    #[test]
    fn small_rounding_equals_round_ties_even() {
        let mut v = -130.0f32;
        while v <= 130.0 {
            assert_eq!(round_half_even_small(v), v.round_ties_even(), "{v}");
            v += 0.03125; // every quarter, half and odd half in range, exactly
        }
        for v in [0.49999997f32, -0.49999997, 4194303.5, -4194302.5, 1e-30] {
            assert_eq!(round_half_even_small(v), v.round_ties_even(), "{v}");
        }
        assert!(round_half_even_small(f32::NAN).is_nan());
    }

    #[test]
    fn activation_rounding_is_half_to_even() {
        // max 127 gives s_x = 1 exactly, so x*s_x = x and the ties are visible.
        let x = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.4999];
        let mut q = [0i8; 10];
        let s = quantize_activations(&x, &mut q);
        assert_eq!(s, 1.0);
        assert_eq!(q, [127, 0, 2, 2, 0, -2, -2, 3, 0, 0]);
    }

    #[test]
    fn activation_extremes_and_zero_input() {
        let mut q = [0i8; 3];
        let s = quantize_activations(&[-2.0, 1.0, 2.0], &mut q);
        assert_eq!(s, 63.5);
        assert_eq!(q, [-127, 64, 127]); // 63.5 rounds to the even 64
        let s0 = quantize_activations(&[0.0, 0.0, 0.0], &mut q);
        assert_eq!(s0, 127.0 / 1e-5);
        assert_eq!(q, [0, 0, 0]);
    }

    #[test]
    fn torch_sum_is_exact_on_small_integers_of_any_length() {
        // Integers below 2^24 add exactly in any order, so every length and tail path must
        // give the true sum.
        for n in [0usize, 1, 7, 8, 31, 32, 33, 511, 512, 513, 4096, 70_001] {
            let x: Vec<f32> = (0..n).map(|i| (i % 17) as f32).collect();
            let want: u64 = (0..n).map(|i| (i % 17) as u64).sum();
            assert_eq!(torch_sum(&x, TORCH_SUM_LANES) as u64, want, "n = {n}");
        }
    }

    #[test]
    fn weight_codes_follow_absmean() {
        // mean |w| = 1, so s_w = 1: codes are round(w) clamped.
        let w = [0.5, -0.5, 1.5, -2.0, 0.0, 1.5];
        let (codes, s) = quantize_weights(&w);
        assert_eq!(s, 1.0);
        assert_eq!(codes, vec![0, 0, 1, -1, 0, 1]);
        let (zero_codes, s0) = quantize_weights(&[0.0; 4]);
        assert_eq!(s0, 1e5);
        assert_eq!(zero_codes, vec![0; 4]);
    }
}
