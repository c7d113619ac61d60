//! Ternary x int8 kernels on the BitNet b1.58 2B-4T shapes, one thread, for every kernel set
//! this CPU can run. Throughput is in multiply-adds (`rows * cols * tokens`).
//!
//! `cargo bench -p bitnet-quant --bench ternary_kernels -- --warm-up-time 1 --measurement-time 3`
//!
//! `gemv_stream` is decode as the model sees it: every projection of all 30 layers (521 MB,
//! far past any cache) once per iteration with the best kernel set, beside a plain read of the
//! same bytes, so the two throughputs compare the kernel with the memory bandwidth.
//! `cargo bench -p bitnet-quant --bench ternary_kernels -- gemv_stream`

use std::hint::black_box;

use bitnet_core::{AlignedBuffer, Storage};
use bitnet_quant::kernels::Kernels;
use bitnet_quant::{holds_code_3, TernaryMatrix, BLOCK_BYTES};
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

/// Layers of the 2B-4T model.
const LAYERS: usize = 30;

/// The seven projections of one 2B-4T layer: q, k, v, o, gate, up, down.
const LAYER_SHAPES: [(usize, usize); 7] = [
    (2560, 2560),
    (640, 2560),
    (640, 2560),
    (2560, 2560),
    (6912, 2560),
    (6912, 2560),
    (2560, 6912),
];

/// A matrix of random valid code bytes written straight into the runtime layout (building
/// half a gigabyte of matrices from one code per byte would take most of the bench's time).
fn random_matrix(rows: usize, cols: usize, seed: &mut u64) -> TernaryMatrix {
    let valid: Vec<u8> = (0..=255u8).filter(|&b| !holds_code_3(b)).collect();
    let bytes =
        TernaryMatrix::padded_rows(rows) * TernaryMatrix::blocks_per_row(cols) * BLOCK_BYTES;
    let mut buf = AlignedBuffer::zeroed(bytes);
    for b in buf.as_mut_bytes() {
        *b = valid[(lcg(seed) % valid.len() as u64) as usize];
    }
    TernaryMatrix::from_storage(Storage::heap(buf), rows, cols).unwrap()
}

fn gemv_stream(c: &mut Criterion) {
    let mut seed = 42;
    let mats: Vec<TernaryMatrix> = (0..LAYERS)
        .flat_map(|_| LAYER_SHAPES)
        .map(|(r, k)| random_matrix(r, k, &mut seed))
        .collect();
    let total: usize = mats.iter().map(|m| m.bytes().len()).sum();
    let x2560 = activations(2560, 1);
    let x6912 = activations(6912, 1);
    let mut out = vec![0i32; 6912];
    let mut g = c.benchmark_group("gemv_stream");
    g.sample_size(10)
        .throughput(Throughput::Bytes(total as u64));
    let k = Kernels::get();
    g.bench_function(BenchmarkId::new(k.name, "2b4t_30_layers"), |b| {
        b.iter(|| {
            for m in &mats {
                let x = if m.cols() == 2560 { &x2560 } else { &x6912 };
                (k.gemv)(black_box(m.bytes()), m.row_bytes(), x, &mut out);
            }
            black_box(&out);
        })
    });
    // The bandwidth reference: XOR of every 8 bytes (the compiler vectorizes it).
    g.bench_function(BenchmarkId::new("read", "2b4t_30_layers"), |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for m in &mats {
                acc ^= m
                    .bytes()
                    .chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                    .fold(0, |a, v| a ^ v);
            }
            black_box(acc)
        })
    });
    g.finish();
}

criterion_group!(benches, gemv, gemm, gemv_stream);
criterion_main!(benches);
