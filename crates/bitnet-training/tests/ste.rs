//! The straight-through estimator checked against its definition with finite differences.
//!
//! With the STE each quantizer `Q` acts in the forward pass and is skipped in the backward pass:
//! `W + (Q(W) - W).detach()` is the weight `V = Q(W)` entering the product, and the latent `W`
//! receives `dL/dV`; likewise an input `x` receives `dL/dx_q` at `x_q = Q(x)`. For a composition
//! the STE gradient is therefore the ordinary gradient of a *surrogate* loss in which every
//! quantized quantity is a free variable (`V1`, `V2`, `x_q`) and every quantizer inside the
//! network is a frozen offset (`h_q = h + c` with `c = Q(h0) - h0` fixed at the point of
//! evaluation). The surrogate is smooth, so it is differentiated here by central differences in
//! f64, independently of candle, and compared with candle's autograd through `BitLinear`.
//!
//! The network: `L = sum(R * y2^2)`, `y2 = l2(silu(l1(x)))`, two bias-free BitLinear layers,
//! `R` fixed random weights (so the loss is not a symmetric function of the outputs).
//!
//! What makes these tests fail: a backward pass that does not pass gradients straight through a
//! quantizer (zero or scaled gradients, gradients masked where a value was clipped), one that
//! multiplies by the latent `W` where the forward used `Q(W)` (or the reverse), a wrong
//! transpose in `matmul_wt`, or a forward that does not use the dequantized values at all.
//! `the_true_derivative_through_the_quantizers_is_not_the_ste` shows the comparison has teeth:
//! the finite-difference derivative of the real (quantized) loss with respect to the latent
//! weights is not what the STE gives.

use bitnet_training::bitlinear::{
    matmul_wt, quantize_activations, quantize_weights, straight_through, ternary_codes, BitLinear,
};
use bitnet_training::rng::SplitMix64;
use candle_core::{Device, Tensor, Var};

/// Tokens, input width, hidden width, output width.
const N: usize = 4;
const K: usize = 16;
const M: usize = 12;
const P: usize = 8;

/// How the network is built in candle.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    /// `BitLinear::forward` with its quantizers (on the CPU: the fused activation quantizer).
    BitLinear,
    /// The same with the public pieces, `straight_through(x, quantize_*(x))` and `matmul_wt`:
    /// what `BitLinear` runs on devices without the fused operation.
    Composition,
    /// `BitLinear` with the quantizers off (the full-precision twin).
    FullPrecision,
}

/// The fixed problem: input, latent weights, loss weights (f32 values, as candle holds them).
struct Problem {
    x: Vec<f32>,
    w1: Vec<f32>,
    w2: Vec<f32>,
    r: Vec<f32>,
}

impl Problem {
    fn new(seed: u64) -> Problem {
        let mut rng = SplitMix64::new(seed);
        let mut draw =
            |n: usize, s: f64| -> Vec<f32> { (0..n).map(|_| (rng.normal() * s) as f32).collect() };
        Problem {
            x: draw(N * K, 1.0),
            w1: draw(M * K, 0.5),
            w2: draw(P * M, 0.5),
            r: draw(N * P, 1.0),
        }
    }
}

/// What candle computes: the loss, the gradients w.r.t. `x`, `W1`, `W2`, the values the forward
/// pass multiplied (`x_q`, `V1`, `V2`) and the second layer's input before and after its
/// quantizer (`h`, `h_q`), all as f64.
struct Autograd {
    loss: f64,
    gx: Vec<f64>,
    gw1: Vec<f64>,
    gw2: Vec<f64>,
    xq: Vec<f64>,
    v1: Vec<f64>,
    v2: Vec<f64>,
    hq: Vec<f64>,
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn autograd(p: &Problem, path: Path) -> Autograd {
    let dev = Device::Cpu;
    let var = |v: &[f32], r: usize, c: usize| {
        Var::from_tensor(&Tensor::from_vec(v.to_vec(), (r, c), &dev).unwrap()).unwrap()
    };
    let (x, w1, w2) = (var(&p.x, N, K), var(&p.w1, M, K), var(&p.w2, P, M));
    let r = Tensor::from_vec(p.r.clone(), (N, P), &dev).unwrap();
    let quantize = path != Path::FullPrecision;
    let l1 = BitLinear::new(w1.clone(), quantize).unwrap();
    let l2 = BitLinear::new(w2.clone(), quantize).unwrap();
    let (y2, h) = match path {
        Path::BitLinear | Path::FullPrecision => {
            let h = l1.forward(x.as_tensor()).unwrap().silu().unwrap();
            (l2.forward(&h).unwrap(), h)
        }
        Path::Composition => {
            let ste_a =
                |t: &Tensor| straight_through(t, &quantize_activations(t).unwrap()).unwrap();
            let ste_w = |t: &Tensor| straight_through(t, &quantize_weights(t).unwrap()).unwrap();
            let y1 = matmul_wt(&ste_a(x.as_tensor()), &ste_w(w1.as_tensor())).unwrap();
            let h = y1.silu().unwrap();
            (matmul_wt(&ste_a(&h), &ste_w(w2.as_tensor())).unwrap(), h)
        }
    };
    let loss = y2.sqr().unwrap().mul(&r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = |v: &Var| flat(grads.get(v.as_tensor()).expect("a gradient"));
    let (xq, v1, v2, hq) = if quantize {
        (
            flat(&quantize_activations(x.as_tensor()).unwrap()),
            flat(&quantize_weights(w1.as_tensor()).unwrap()),
            flat(&quantize_weights(w2.as_tensor()).unwrap()),
            flat(&quantize_activations(&h.detach()).unwrap()),
        )
    } else {
        (
            flat(x.as_tensor()),
            flat(w1.as_tensor()),
            flat(w2.as_tensor()),
            flat(&h),
        )
    };
    Autograd {
        loss: f64::from(loss.to_scalar::<f32>().unwrap()),
        gx: g(&x),
        gw1: g(&w1),
        gw2: g(&w2),
        xq,
        v1,
        v2,
        hq,
    }
}

/// `x [n, k] @ w[m, k]^T` in f64.
fn mm_t(x: &[f64], w: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
    let mut y = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            y[i * m + j] = (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum();
        }
    }
    y
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// The first layer and the nonlinearity: `h = silu(x_q V1^T)`.
fn hidden(xq: &[f64], v1: &[f64]) -> Vec<f64> {
    mm_t(xq, v1, N, K, M).into_iter().map(silu).collect()
}

/// `sum(R * (h_q V2^T)^2)`.
fn head_loss(hq: &[f64], v2: &[f64], r: &[f32]) -> f64 {
    let y2 = mm_t(hq, v2, N, M, P);
    y2.iter().zip(r).map(|(y, &r)| f64::from(r) * y * y).sum()
}

/// The surrogate loss whose gradient the STE is: free `x_q`, `V1`, `V2`, and the second
/// quantizer a frozen offset `c` (zero for the full-precision path, where it is the plain loss).
fn surrogate(xq: &[f64], v1: &[f64], v2: &[f64], c: &[f64], r: &[f32]) -> f64 {
    let hq: Vec<f64> = hidden(xq, v1).iter().zip(c).map(|(h, c)| h + c).collect();
    head_loss(&hq, v2, r)
}

/// Central differences of `f` at `at`, every coordinate, step `h`.
fn central_diff(at: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut v = at.to_vec();
    (0..at.len())
        .map(|i| {
            v[i] = at[i] + h;
            let up = f(&v);
            v[i] = at[i] - h;
            let down = f(&v);
            v[i] = at[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Finite-difference step for the smooth surrogate (f64, every variable of order 0.1 to 3):
/// truncation error ~ h^2 |f'''| ~ 1e-10 and rounding ~ 1e-16 |L| / h ~ 1e-10, both five orders of
/// magnitude below the tolerance.
const FD_STEP: f64 = 1e-5;

/// Allowed deviation of the f32 autograd gradient from the f64 finite difference, relative to
/// the largest entry of the gradient. f32 carries ~1.2e-7 relative error per operation and
/// the gradients are sums of at most 16 products of O(1) terms: the deviations measured here
/// are 0.6e-7 to 2.7e-7. 1e-5 leaves a margin of more than 30 for other CPUs' summation orders
/// while every bug named at the top of the file moves entries by a sizeable fraction of the
/// scale (using the latent weights in the backward pass: 1.4, see
/// `latent_weights_in_the_backward_would_be_caught`).
const REL_TOL: f64 = 1e-5;

/// Largest `|a - b|` over the entries, relative to the largest `|b|`.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(
        scale > 1e-3,
        "a degenerate gradient (scale {scale}) would prove nothing"
    );
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Checks candle's gradients on `path` against finite differences of the surrogate.
fn check_against_definition(path: Path, seed: u64) {
    let p = Problem::new(seed);
    let a = autograd(&p, path);
    // The second quantizer as a frozen offset at this point: h_q = h + c reproduces candle's
    // h_q exactly at the base point and moves with h around it.
    let h0 = hidden(&a.xq, &a.v1);
    let c: Vec<f64> = if path == Path::FullPrecision {
        vec![0.0; N * M]
    } else {
        a.hq.iter().zip(&h0).map(|(q, h)| q - h).collect()
    };
    if path != Path::FullPrecision {
        // The quantizers did something: otherwise the test would not tell V from W.
        let moved = |q: &[f64], w: &[f32]| {
            q.iter()
                .zip(w)
                .any(|(q, &w)| (q - f64::from(w)).abs() > 1e-3)
        };
        assert!(moved(&a.v1, &p.w1) && moved(&a.xq, &p.x));
        assert!(c.iter().any(|c| c.abs() > 1e-4), "h was not quantized");
    }
    // The reference models the same function: its value at the base point is candle's loss.
    let l0 = surrogate(&a.xq, &a.v1, &a.v2, &c, &p.r);
    assert!(
        (l0 - a.loss).abs() <= 1e-5 * l0.abs().max(1.0),
        "{path:?}: reference loss {l0} vs candle {}",
        a.loss
    );

    let fd_v1 = central_diff(&a.v1, FD_STEP, |v1| surrogate(&a.xq, v1, &a.v2, &c, &p.r));
    let fd_v2 = central_diff(&a.v2, FD_STEP, |v2| surrogate(&a.xq, &a.v1, v2, &c, &p.r));
    let fd_xq = central_diff(&a.xq, FD_STEP, |xq| surrogate(xq, &a.v1, &a.v2, &c, &p.r));
    for (name, auto, fd) in [
        ("dL/dW1", &a.gw1, &fd_v1),
        ("dL/dW2", &a.gw2, &fd_v2),
        ("dL/dx", &a.gx, &fd_xq),
    ] {
        let e = rel_err(auto, fd);
        assert!(e < REL_TOL, "{path:?} {name}: relative error {e:.2e}");
    }
}

#[test]
fn bitlinear_gradients_are_the_ste_definition() {
    for seed in [1, 2, 3] {
        check_against_definition(Path::BitLinear, seed);
    }
}

#[test]
fn composition_gradients_are_the_ste_definition() {
    // The unfused form, which other devices run, obeys the same definition...
    check_against_definition(Path::Composition, 1);
    // ... and on the CPU agrees with the fused layer, forward and backward. Not bit for bit:
    // the fused forward sums the int8 x ternary products exactly in integers (the engine's
    // kernels) and scales once, the composition multiplies dequantized f32 values.
    let p = Problem::new(4);
    let (a, b) = (
        autograd(&p, Path::BitLinear),
        autograd(&p, Path::Composition),
    );
    assert!(
        (a.loss - b.loss).abs() <= 1e-6 * b.loss.abs(),
        "{} vs {}",
        a.loss,
        b.loss
    );
    for (name, x, y) in [
        ("dx", &a.gx, &b.gx),
        ("dW1", &a.gw1, &b.gw1),
        ("dW2", &a.gw2, &b.gw2),
    ] {
        let e = rel_err(x, y);
        assert!(e <= 1e-5, "{name}: fused vs composition {e:.2e}");
    }
}

#[test]
fn full_precision_gradients_match_finite_differences() {
    for seed in [1, 5] {
        check_against_definition(Path::FullPrecision, seed);
    }
}

/// Ternary weights in f64, as `bitlinear::quantize_weights` defines them.
fn q_weights(w: &[f64]) -> Vec<f64> {
    let mean = w.iter().map(|v| v.abs()).sum::<f64>() / w.len() as f64;
    let s = 1.0 / mean.max(1e-5);
    w.iter()
        .map(|v| (v * s).round_ties_even().clamp(-1.0, 1.0) / s)
        .collect()
}

/// Per-token int8 activations in f64, as `bitlinear::quantize_activations` defines them.
fn q_acts(x: &[f64], width: usize) -> Vec<f64> {
    x.chunks(width)
        .flat_map(|row| {
            let amax = row.iter().fold(0f64, |m, v| m.max(v.abs()));
            let s = 127.0 / amax.max(1e-5);
            row.iter()
                .map(move |v| (v * s).round_ties_even().clamp(-128.0, 127.0) / s)
        })
        .collect()
}

/// The real quantized loss as a function of the latent weights and the raw input.
fn true_loss(x: &[f64], w1: &[f64], w2: &[f64], r: &[f32]) -> f64 {
    let h = hidden(&q_acts(x, K), &q_weights(w1));
    head_loss(&q_acts(&h, M), &q_weights(w2), r)
}

#[test]
fn the_true_derivative_through_the_quantizers_is_not_the_ste() {
    let p = Problem::new(1);
    let a = autograd(&p, Path::BitLinear);
    let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    let (x, w1, w2) = (f64s(&p.x), f64s(&p.w1), f64s(&p.w2));
    // The f64 quantizers reproduce the forward pass: same loss as candle.
    let codes = ternary_codes(&Tensor::from_vec(p.w1.clone(), (M, K), &Device::Cpu).unwrap())
        .unwrap()
        .0;
    let s1 = 1.0 / (w1.iter().map(|v| v.abs()).sum::<f64>() / w1.len() as f64);
    let ours: Vec<f64> = q_weights(&w1).iter().map(|v| v * s1).collect();
    assert_eq!(
        ours.iter().map(|v| v.round()).collect::<Vec<_>>(),
        flat(&codes)
    );
    let l0 = true_loss(&x, &w1, &w2, &p.r);
    assert!(
        (l0 - a.loss).abs() <= 1e-5 * l0.abs().max(1.0),
        "{l0} vs {}",
        a.loss
    );

    // A step small enough to rarely cross a rounding boundary: the quantized loss is piecewise
    // smooth in the latent values, with jumps where a code flips.
    let h = 1e-7;
    let fd_w1 = central_diff(&w1, h, |w| true_loss(&x, w, &w2, &p.r));
    let fd_x = central_diff(&x, h, |xv| true_loss(xv, &w1, &w2, &p.r));
    // Between jumps a latent entry moves the real loss only through the shared scale
    // `mean|W1|` (every code stays put), so its derivative is `sign(w) * c` with one `c` for
    // the whole matrix; the STE gradient `dL/dV1` has a different value in every entry.
    let c = fd_w1[0].abs();
    let same = |g: &[f64]| g.iter().filter(|v| (v.abs() - c).abs() <= 1e-6 * c).count();
    assert!(c > 0.0 && same(&fd_w1) >= w1.len() * 9 / 10, "{fd_w1:?}");
    assert!(same(&a.gw1) <= 1, "{:?}", a.gw1);
    assert!(rel_err(&fd_w1, &a.gw1) > 0.5);
    // Through the activation quantizer only each token's largest entry (through the scale)
    // moves the loss; every other derivative is exactly zero (or a jump), while the STE's are
    // not.
    let zero_true = fd_x.iter().filter(|v| **v == 0.0).count();
    let zero_ste = a.gx.iter().filter(|v| **v == 0.0).count();
    assert!(
        zero_true >= N * (K - 1) * 3 / 4,
        "{zero_true} of {}",
        x.len()
    );
    assert_eq!(zero_ste, 0);
    assert!(rel_err(&fd_x, &a.gx) > 0.5);
}

#[test]
fn latent_weights_in_the_backward_would_be_caught() {
    // A plausible bug: dL/dx computed with the latent W1 where the forward used V1 = Q(W1).
    // The surrogate with V1 replaced by W1 gives that wrong gradient; it must differ from the
    // right one by far more than REL_TOL.
    let p = Problem::new(1);
    let a = autograd(&p, Path::BitLinear);
    let h0 = hidden(&a.xq, &a.v1);
    let c: Vec<f64> = a.hq.iter().zip(&h0).map(|(q, h)| q - h).collect();
    let w1: Vec<f64> = p.w1.iter().map(|&v| f64::from(v)).collect();
    let wrong = central_diff(&a.xq, FD_STEP, |xq| surrogate(xq, &w1, &a.v2, &c, &p.r));
    let e = rel_err(&wrong, &a.gx);
    assert!(e > 100.0 * REL_TOL, "{e}");
}
