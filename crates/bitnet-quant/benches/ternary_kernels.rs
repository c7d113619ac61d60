//! Ternary x int8 kernels on the BitNet b1.58 2B-4T shapes, one thread, for every kernel set
//! this CPU can run. Throughput is in multiply-adds (`rows * cols * tokens`).
//!
//! `cargo bench -p bitnet-quant --bench ternary_kernels -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use bitnet_quant::kernels::Kernels;
use bitnet_quant::TernaryMatrix;
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};

/// `[out, in]` of the 2B-4T projections: q/o and the square ones, gate/up, down, k/v.
const SHAPES: [(usize, usize); 4] = [(2560, 2560), (6912, 2560), (2560, 6912), (640, 2560)];

fn lcg(s: &mut u64) -> u64 {
    *s = s
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *s >> 33
}

fn matrix(rows: usize, cols: usize) -> TernaryMatrix {
    let mut s = (rows * cols) as u64;
    let codes: Vec<i8> = (0..rows * cols)
        .map(|_| (lcg(&mut s) % 3) as i8 - 1)
        .collect();
    TernaryMatrix::from_codes(&codes, rows, cols).unwrap()
}

fn activations(cols: usize, tokens: usize) -> Vec<i8> {
    let k = TernaryMatrix::padded_cols(cols);
    let mut s = 7;
    let mut x = vec![0i8; tokens * k];
    for row in x.chunks_exact_mut(k) {
        for v in &mut row[..cols] {
            *v = lcg(&mut s) as u8 as i8;
        }
    }
    x
}

fn gemv(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemv");
    for (rows, cols) in SHAPES {
        let m = matrix(rows, cols);
        let x = activations(cols, 1);
        let mut out = vec![0i32; rows];
        g.throughput(Throughput::Elements((rows * cols) as u64));
        for k in Kernels::available() {
            g.bench_with_input(
                BenchmarkId::new(k.name, format!("{rows}x{cols}")),
                &(),
                |b, _| {
                    b.iter(|| {
                        (k.gemv)(black_box(m.bytes()), m.row_bytes(), black_box(&x), &mut out);
                        black_box(&out);
                    })
                },
            );
        }
    }
    g.finish();
}

fn gemm(c: &mut Criterion) {
    for tokens in [1usize, 64] {
        let mut g = c.benchmark_group(format!("gemm_t{tokens}"));
        if tokens > 1 {
            // The scalar set takes a good fraction of a second per call here: ten single calls.
            g.sample_size(10).sampling_mode(SamplingMode::Flat);
        }
        for (rows, cols) in SHAPES {
            let m = matrix(rows, cols);
            let x = activations(cols, tokens);
            let mut out = vec![0i32; rows * tokens];
            g.throughput(Throughput::Elements((rows * cols * tokens) as u64));
            for k in Kernels::available() {
                g.bench_with_input(
                    BenchmarkId::new(k.name, format!("{rows}x{cols}")),
                    &(),
                    |b, _| {
                        b.iter(|| {
                            (k.gemm)(
                                black_box(m.bytes()),
                                m.row_bytes(),
                                black_box(&x),
                                tokens,
                                &mut out,
                            );
                            black_box(&out);
                        })
                    },
                );
            }
        }
        g.finish();
    }
}

criterion_group!(benches, gemv, gemm);
criterion_main!(benches);
