//! Helpers shared by the crate's unit tests.

use candle_core::Tensor;

/// Gradients of `sum(y * w)`: a loss whose gradient with respect to `y` is `w`.
pub fn weighted_grads(y: &Tensor, w: &Tensor) -> candle_core::backprop::GradStore {
    y.mul(w).unwrap().sum_all().unwrap().backward().unwrap()
}

/// `max |a - b|`.
pub fn diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = a.sub(b).unwrap().abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap()
}

/// `max |t|`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `n` normal values with standard deviation `scale`, deterministic in `seed`.
pub fn randn(n: usize, seed: u64, scale: f64) -> Vec<f32> {
    let mut r = crate::rng::SplitMix64::new(seed);
    (0..n).map(|_| (r.normal() * scale) as f32).collect()
}
