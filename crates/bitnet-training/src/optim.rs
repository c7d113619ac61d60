//! AdamW with decoupled weight decay, global gradient-norm clipping, and state a checkpoint can
//! hold (first and second moments, step count).

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::{Result, TrainError};

/// One parameter's optimizer state.
#[derive(Debug, Clone)]
pub struct Moments {
    /// First moment (running mean of gradients).
    pub m: Tensor,
    /// Second moment (running mean of squared gradients).
    pub v: Tensor,
}

/// AdamW over a fixed list of parameters.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Var)>,
    /// Whether each parameter is decayed (matrices are, norm gains are not).
    decay: Vec<bool>,
    state: Vec<Moments>,
    /// Steps taken so far (bias correction uses `step + 1` for the next one).
    pub step: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl AdamW {
    /// A fresh optimizer over `params`; vectors (norm gains) get no weight decay.
    pub fn new(params: Vec<(String, Var)>, beta1: f64, beta2: f64, eps: f64) -> Result<Self> {
        let decay = params.iter().map(|(_, p)| p.rank() >= 2).collect();
        let state = params
            .iter()
            .map(|(_, p)| {
                Ok(Moments {
                    m: p.zeros_like()?,
                    v: p.zeros_like()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            decay,
            state,
            step: 0,
            beta1,
            beta2,
            eps,
        })
    }

    /// Parameter names with their moments, for checkpoints.
    pub fn state(&self) -> impl Iterator<Item = (&str, &Moments)> {
        self.params.iter().map(|(n, _)| n.as_str()).zip(&self.state)
    }

    /// Replaces the moments (from a checkpoint), in parameter order.
    pub fn set_state(&mut self, state: Vec<Moments>, step: u64) -> Result<()> {
        if state.len() != self.params.len() {
            return Err(TrainError::Invalid(format!(
                "optimizer state has {} entries, the model {} parameters",
                state.len(),
                self.params.len()
            )));
        }
        for ((name, p), s) in self.params.iter().zip(&state) {
            if s.m.dims() != p.dims() || s.v.dims() != p.dims() {
                return Err(TrainError::Invalid(format!(
                    "optimizer state of {name} has shape {:?}, the parameter {:?}",
                    s.m.dims(),
                    p.dims()
                )));
            }
        }
        self.state = state;
        self.step = step;
        Ok(())
    }

    /// The global L2 norm of all gradients (missing gradients count as zero).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0f64;
        for (_, p) in &self.params {
            if let Some(g) = grads.get(p.as_tensor()) {
                total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        Ok(total.sqrt())
    }

    /// One AdamW update with learning rate `lr` and decoupled weight decay `wd`; gradients are
    /// scaled down first so that their global norm is at most `clip` (`clip <= 0`: no clipping).
    /// Returns the gradient norm before clipping.
    pub fn step(&mut self, grads: &GradStore, lr: f64, wd: f64, clip: f64) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        if !norm.is_finite() {
            return Err(TrainError::Invalid(format!(
                "gradient norm is {norm} at step {}: training diverged",
                self.step
            )));
        }
        let gscale = if clip > 0.0 && norm > clip {
            clip / norm
        } else {
            1.0
        };
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for (((_, p), st), &decay) in self.params.iter().zip(&mut self.state).zip(&self.decay) {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let g = g.affine(gscale, 0.0)?;
            st.m =
                st.m.affine(self.beta1, 0.0)?
                    .add(&g.affine(1.0 - self.beta1, 0.0)?)?;
            st.v =
                st.v.affine(self.beta2, 0.0)?
                    .add(&g.sqr()?.affine(1.0 - self.beta2, 0.0)?)?;
            let denom = st.v.affine(1.0 / bc2, 0.0)?.sqrt()?.affine(1.0, self.eps)?;
            let update = st.m.affine(1.0 / bc1, 0.0)?.div(&denom)?;
            let keep = if decay { 1.0 - lr * wd } else { 1.0 };
            let next = p
                .as_tensor()
                .affine(keep, 0.0)?
                .sub(&update.affine(lr, 0.0)?)?;
            p.set(&next)?;
        }
        Ok(norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One step against the closed form: with m0 = v0 = 0 the first AdamW update is
    /// `p (1 - lr wd) - lr g / (|g| + eps)` (bias correction cancels the betas).
    #[test]
    fn first_step_matches_closed_form() {
        let p =
            Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap())
                .unwrap();
        let loss = p.as_tensor().sqr().unwrap().sum_all().unwrap(); // grad = 2p
        let grads = loss.backward().unwrap();
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], 0.9, 0.95, 1e-8).unwrap();
        let (lr, wd) = (0.1, 0.5);
        let norm = opt.step(&grads, lr, wd, 0.0).unwrap();
        assert!((norm - (4.0f64 + 16.0 + 1.0 + 36.0).sqrt()).abs() < 1e-5);
        let got = p.as_tensor().to_vec2::<f32>().unwrap();
        let want = |x: f64| x * (1.0 - lr * wd) - lr * (2.0 * x) / ((2.0 * x).abs() + 1e-8);
        for (g, w) in got.iter().flatten().zip([1.0, -2.0, 0.5, 3.0]) {
            assert!((*g as f64 - want(w)).abs() < 1e-6, "{g} vs {}", want(w));
        }
    }

    #[test]
    fn clipping_scales_the_gradient() {
        let p = Var::from_tensor(&Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()).unwrap();
        // grad = p -> norm 5; clip 1 -> g = p / 5; with two steps the moments see the scaled g.
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], 0.9, 0.95, 1e-8).unwrap();
        let loss = p
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .affine(0.5, 0.0)
            .unwrap();
        let norm = opt.step(&loss.backward().unwrap(), 0.0, 0.0, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let m = opt.state().next().unwrap().1.m.to_vec1::<f32>().unwrap();
        assert!(
            (m[0] - 0.1 * 0.6).abs() < 1e-7 && (m[1] - 0.1 * 0.8).abs() < 1e-7,
            "{m:?}"
        );
    }
}
