//! The trainer's fused CPU operations at the training benchmark's size (batch 16 of 256
//! positions, 8 heads over 4 KV heads of 32; `scripts/bench_training_vs_torch.sh`), on the
//! thread pool as `bitnet train` runs them.
//!
//! `cargo bench -p bitnet-training --bench training_ops -- --warm-up-time 1 --measurement-time 5`
//!
//! `attention/forward` is the causal attention's output; `attention/forward_backward` adds
//! the gradients of q, k and v (throughput in positions).
//!
//! `train_step/loss_and_grads` is the loss and every parameter's gradient of the benchmark's
//! model (hidden 256, 4 layers, ffn 768, vocabulary 2048, tied head) for one batch: a training
//! step but the optimizer's update (throughput in tokens).

use std::hint::black_box;

use bitnet_training::attention::{causal_attention, RopeAngles};
use bitnet_training::config::ModelShape;
use bitnet_training::model::Transformer;
use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BATCH: usize = 16;
const T: usize = 256;
const HEADS: usize = 8;
const KV_HEADS: usize = 4;
const HEAD_DIM: usize = 32;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn attention(c: &mut Criterion) {
    let dev = &Device::Cpu;
    let var = |width: usize, seed: u64| {
        let t = Tensor::from_vec(values(BATCH * T * width, seed), (BATCH, T, width), dev);
        Var::from_tensor(&t.expect("shape")).expect("var")
    };
    let (q, k, v) = (
        var(HEADS * HEAD_DIM, 1),
        var(KV_HEADS * HEAD_DIM, 2),
        var(KV_HEADS * HEAD_DIM, 3),
    );
    let w = Tensor::from_vec(
        values(BATCH * T * HEADS * HEAD_DIM, 4),
        (BATCH, T, HEADS * HEAD_DIM),
        dev,
    )
    .expect("shape");
    let rope = RopeAngles::new(10000.0, HEAD_DIM, T);
    let run = || causal_attention(&q, &k, &v, HEADS, KV_HEADS, &rope).expect("attention");
    let mut g = c.benchmark_group("attention");
    g.throughput(Throughput::Elements((BATCH * T) as u64));
    g.bench_function("forward", |b| b.iter(|| black_box(run())));
    g.bench_function("forward_backward", |b| {
        b.iter(|| {
            let loss = run().mul(&w).and_then(|y| y.sum_all()).expect("loss");
            black_box(loss.backward().expect("backward"))
        })
    });
    g.finish();
}

fn train_step(c: &mut Criterion) {
    // As `bitnet train` runs: freed tensors stay in the heap for the next step (without it
    // the step also measures page faults and the kernel zeroing pages).
    bitnet_core::heap::keep_freed_memory();
    let shape = ModelShape {
        hidden_size: 256,
        intermediate_size: 768,
        num_layers: 4,
        num_heads: HEADS,
        num_kv_heads: KV_HEADS,
        vocab_size: 2048,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: true,
    };
    let model = Transformer::new(&shape, true, 1234, &Device::Cpu).expect("model");
    let ids: Vec<u32> = values(BATCH * (T + 1), 5)
        .iter()
        .map(|v| ((v + 1.0) * 1023.0) as u32 % 2048)
        .collect();
    let ids = Tensor::from_vec(ids, (BATCH, T + 1), &Device::Cpu).expect("ids");
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10);
    g.throughput(Throughput::Elements((BATCH * T) as u64));
    g.bench_function("loss_and_grads", |b| {
        b.iter(|| black_box(model.loss_and_grads(&ids).expect("step")))
    });
    g.finish();
}

/// The block's f32 gradient products over the batch's 4096 rows, candle's product (the `gemm`
/// crate) against `bitnet_quant::sgemm`: weight gradients `dy^T @ x` (`wgrad`, `[out, in]`,
/// q/k/v, o and down, gate/up stacked) and input gradients `dy @ w` (`xgrad`, `dy [rows, out]`).
fn gradient_products(c: &mut Criterion) {
    use bitnet_quant::kernels::Kernels;
    use bitnet_quant::sgemm::{sgemm, MatRef};
    let rows = BATCH * T;
    let mut g = c.benchmark_group("gradient_products");
    let shapes = [
        ("wgrad", 512, 256),
        ("wgrad", 256, 256),
        ("wgrad", 256, 768),
        ("wgrad", 1536, 256),
        ("xgrad", 512, 256),
        ("xgrad", 256, 768),
        ("xgrad", 1536, 256),
    ];
    for (kind, out_f, in_f) in shapes {
        let wgrad = kind == "wgrad";
        let dy = values(rows * out_f, 6);
        let other = values(if wgrad { rows * in_f } else { out_f * in_f }, 7);
        g.throughput(Throughput::Elements((rows * out_f * in_f) as u64));
        let dev = &Device::Cpu;
        let dy_t = Tensor::from_vec(dy.clone(), (rows, out_f), dev).expect("dy");
        let other_dims = if wgrad { (rows, in_f) } else { (out_f, in_f) };
        let other_t = Tensor::from_vec(other.clone(), other_dims, dev).expect("x");
        let name = format!("{kind}_{out_f}x{in_f}");
        g.bench_function(format!("candle/{name}"), |b| {
            b.iter(|| {
                let lhs = if wgrad {
                    dy_t.t().expect("t")
                } else {
                    dy_t.clone()
                };
                black_box(lhs.matmul(&other_t).expect("matmul"))
            })
        });
        let mut out = vec![0f32; if wgrad { out_f * in_f } else { rows * in_f }];
        g.bench_function(format!("sgemm/{name}"), |b| {
            b.iter(|| {
                let dy = MatRef::row_major(&dy, rows, out_f).expect("dy");
                let lhs = if wgrad { dy.t() } else { dy };
                let rhs = MatRef::row_major(&other, other_dims.0, other_dims.1).expect("rhs");
                sgemm(Kernels::get(), lhs, rhs, &mut out).expect("sgemm");
                black_box(&out);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, attention, train_step, gradient_products);
criterion_main!(benches);
