//! AdamW with decoupled weight decay, global gradient-norm clipping, and state a checkpoint can
//! hold (first and second moments, step count).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

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
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            total += if g.device().is_cpu() && g.dtype() == DType::F32 {
                // On the pool, in f64: candle's CPU sum is one f32 chain on this thread.
                let g = g.contiguous()?;
                crate::fused::with_cpu_f32([&g], "gradient norm", |[v]| {
                    Ok(crate::fused::sum_f64(v, |x| x as f64 * x as f64))
                })?
            } else {
                g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64
            };
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
        let c = Coefficients {
            gscale,
            beta1: self.beta1,
            beta2: self.beta2,
            inv_bc1: 1.0 / bc1,
            inv_bc2: 1.0 / bc2,
            eps: self.eps,
            lr,
        };
        for (((_, p), st), &decay) in self.params.iter().zip(&mut self.state).zip(&self.decay) {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let keep = if decay { 1.0 - lr * wd } else { 1.0 };
            let next = if p.device().is_cpu() {
                update_cpu(p.as_tensor(), g, st, &c, keep)?
            } else {
                update_composed(p.as_tensor(), g, st, &c, keep)?
            };
            p.set(&next)?;
        }
        Ok(norm)
    }
}

/// The scalars of one AdamW update.
struct Coefficients {
    gscale: f64,
    beta1: f64,
    beta2: f64,
    inv_bc1: f64,
    inv_bc2: f64,
    eps: f64,
    lr: f64,
}

/// One parameter's update composed from candle operations (any device): updates the moments
/// in `st` and returns the new parameter `p * keep - lr * m_hat / (sqrt(v_hat) + eps)`.
fn update_composed(
    p: &Tensor,
    g: &Tensor,
    st: &mut Moments,
    c: &Coefficients,
    keep: f64,
) -> Result<Tensor> {
    let g = g.affine(c.gscale, 0.0)?;
    st.m =
        st.m.affine(c.beta1, 0.0)?
            .add(&g.affine(1.0 - c.beta1, 0.0)?)?;
    st.v =
        st.v.affine(c.beta2, 0.0)?
            .add(&g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
    let denom = st.v.affine(c.inv_bc2, 0.0)?.sqrt()?.affine(1.0, c.eps)?;
    let update = st.m.affine(c.inv_bc1, 0.0)?.div(&denom)?;
    Ok(p.affine(keep, 0.0)?.sub(&update.affine(c.lr, 0.0)?)?)
}

/// [`update_composed`] on the CPU in one parallel pass instead of some fifteen single-threaded
/// ones: the same f32 operations in the same order per element (candle's `affine(a, b)` is
/// `x * a + b` with both in f32), so the same bits.
fn update_cpu(
    p: &Tensor,
    g: &Tensor,
    st: &mut Moments,
    c: &Coefficients,
    keep: f64,
) -> Result<Tensor> {
    use rayon::prelude::*;
    let (p, g) = (p.contiguous()?, g.contiguous()?);
    let (m, v) = (st.m.contiguous()?, st.v.contiguous()?);
    let n = p.elem_count();
    let (mut m_next, mut v_next, mut p_next) = (
        crate::fused::zeroed::<f32>(n),
        crate::fused::zeroed::<f32>(n),
        crate::fused::zeroed::<f32>(n),
    );
    let f = |x: f64| x as f32;
    let (gscale, b1, nb1, b2, nb2) = (
        f(c.gscale),
        f(c.beta1),
        f(1.0 - c.beta1),
        f(c.beta2),
        f(1.0 - c.beta2),
    );
    let (ibc1, ibc2, eps, lr, keep) = (f(c.inv_bc1), f(c.inv_bc2), f(c.eps), f(c.lr), f(keep));
    crate::fused::with_cpu_f32([&p, &g, &m, &v], "AdamW", |[p, g, m, v]| {
        if [g.len(), m.len(), v.len()] != [n; 3] {
            candle_core::bail!(
                "AdamW: parameter of {n} values with gradient {}, moments {} and {}",
                g.len(),
                m.len(),
                v.len()
            );
        }
        const CHUNK: usize = 1 << 14;
        let outputs = m_next
            .par_chunks_mut(CHUNK)
            .zip(v_next.par_chunks_mut(CHUNK))
            .zip(p_next.par_chunks_mut(CHUNK));
        let inputs = m
            .par_chunks(CHUNK)
            .zip(v.par_chunks(CHUNK))
            .zip(p.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)));
        outputs
            .zip(inputs)
            .for_each(|(((mo, vo), po), ((m, v), (p, g)))| {
                let inputs = m.iter().zip(v).zip(p.iter().zip(g));
                for (((mo, vo), po), ((&m, &v), (&p, &g))) in
                    mo.iter_mut().zip(vo).zip(po).zip(inputs)
                {
                    let gk = g * gscale + 0.0;
                    *mo = (m * b1 + 0.0) + (gk * nb1 + 0.0);
                    *vo = (v * b2 + 0.0) + (gk * gk * nb2 + 0.0);
                    let denom = (*vo * ibc2 + 0.0).sqrt() * 1.0 + eps;
                    let update = (*mo * ibc1 + 0.0) / denom;
                    *po = (p * keep + 0.0) - (update * lr + 0.0);
                }
            });
        Ok(())
    })?;
    let dev = p.device();
    st.m = Tensor::from_vec(m_next, st.m.shape(), dev)?;
    st.v = Tensor::from_vec(v_next, st.v.shape(), dev)?;
    Ok(Tensor::from_vec(p_next, p.shape(), dev)?)
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

    /// The gradient norm over several parameters and parallel chunks against the definition.
    #[test]
    fn gradient_norm_is_the_global_l2_norm() {
        let n = 3 * (1 << 15) + 5;
        let a: Vec<f32> = (0..n)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let var = |v: Vec<f32>| Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap();
        let vars = vec![
            ("a".to_string(), var(a.clone())),
            ("b".to_string(), var(vec![2.0, -1.0])),
        ];
        let opt = AdamW::new(vars.clone(), 0.9, 0.95, 1e-8).unwrap();
        // loss = 0.5 sum p^2: the gradient is p itself.
        let loss = vars
            .iter()
            .map(|(_, v)| v.as_tensor().sqr().unwrap().sum_all().unwrap())
            .reduce(|x, y| x.add(&y).unwrap())
            .unwrap()
            .affine(0.5, 0.0)
            .unwrap();
        let norm = opt.grad_norm(&loss.backward().unwrap()).unwrap();
        let want = (a.iter().map(|&v| v as f64 * v as f64).sum::<f64>() + 5.0).sqrt();
        assert!((norm - want).abs() <= want * 1e-12, "{norm} vs {want}");
    }

    /// The one-pass CPU update against the composition of candle operations: the same bits
    /// for the moments and the parameter (odd length, more than one parallel chunk).
    #[test]
    fn cpu_update_equals_the_composition_bit_for_bit() {
        let n = (1 << 14) + 77;
        let t = |seed: u64, scale: f64| {
            Tensor::from_vec(crate::testing::randn(n, seed, scale), n, &Device::Cpu).unwrap()
        };
        let (p, g) = (t(1, 0.05), t(2, 0.01));
        let v0 = t(3, 1e-4).abs().unwrap();
        let c = Coefficients {
            gscale: 0.37,
            beta1: 0.9,
            beta2: 0.95,
            inv_bc1: 1.0 / (1.0 - 0.9f64.powi(3)),
            inv_bc2: 1.0 / (1.0 - 0.95f64.powi(3)),
            eps: 1e-8,
            lr: 3e-3,
        };
        let fresh = || Moments {
            m: t(4, 1e-3),
            v: v0.clone(),
        };
        let (mut a, mut b) = (fresh(), fresh());
        let pa = update_cpu(&p, &g, &mut a, &c, 1.0 - 3e-3 * 0.1).unwrap();
        let pb = update_composed(&p, &g, &mut b, &c, 1.0 - 3e-3 * 0.1).unwrap();
        let bits = |x: &Tensor| -> Vec<u32> {
            x.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(&pa), bits(&pb));
        assert_eq!(bits(&a.m), bits(&b.m));
        assert_eq!(bits(&a.v), bits(&b.v));
        assert_ne!(bits(&pa), bits(&p), "the update moved the parameter");
    }
}
