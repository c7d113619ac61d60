//! Ternary x int8 kernels on the BitNet b1.58 2B-4T shapes, one thread, for every kernel set
//! this CPU can run. Throughput is in multiply-adds (`rows * cols * tokens`).
//!
//! `cargo bench -p bitnet-quant --bench ternary_kernels -- --warm-up-time 1 --measurement-time 3`
//!
//! `gemv_stream` is decode as the model sees it: every projection of all 30 layers (521 MB,
//! far past any cache) once per iteration with the best kernel set, beside a plain read of the
//! same bytes, so the two throughputs compare the kernel with the memory bandwidth.
//! `cargo bench -p bitnet-quant --bench ternary_kernels -- gemv_stream`
//!
//! Every set's products are measured in both runtime layouts (`<set>` is the 2-bit one,
//! `<set>-base3` the dense one), and `gemv_stream` streams both, so the time per iteration
//! compares the layouts where decoding waits on memory.
//!
//! `attention` is one query's scores and one weighted sum over 32 and 1024 cached rows of the
//! 2B-4T shape (f32 and f16 caches), per kernel set.
//!
//! `quantize_activations` is the per-token int8 quantization of 64 rows of 2560;
//! `rms_norm_quantize` the same fused with the RMSNorm before it, per kernel set, at 2560 and
//! 6912.
//!
//! `head` is the output head's dot products (f16, Q8_0, Q6_K) over 32768 rows of 2560 (a
//! quarter of the 2B-4T vocabulary, past the cache), per kernel set; throughput in bytes read.

use std::hint::black_box;

use bitnet_core::{AlignedBuffer, Storage};
use bitnet_quant::kernels::Kernels;
use bitnet_quant::{holds_code_3, Base3Matrix, TernaryMatrix, BLOCK_BYTES};
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

/// Random activation rows padded for the 2-bit layout, as many as the dense layout needs too.
fn activations(cols: usize, tokens: usize) -> Vec<i8> {
    let k = TernaryMatrix::padded_cols(cols).max(Base3Matrix::padded_cols(cols));
    let mut s = 7;
    let mut x = vec![0i8; tokens * k];
    for row in x.chunks_exact_mut(k) {
        for v in &mut row[..cols] {
            *v = lcg(&mut s) as u8 as i8;
        }
    }
    x
}

/// `tokens` random activation rows of `k` (a layout's padded length) laid end to end from a
/// 64-byte boundary, as the engine's scratch arena lays them out.
fn activations_for(cols: usize, tokens: usize, k: usize) -> AlignedBuffer {
    let one = activations(cols, 1);
    let mut x = AlignedBuffer::zeroed(tokens * k);
    for row in x.as_mut_i8().chunks_exact_mut(k) {
        row.copy_from_slice(&one[..k]);
    }
    x
}

fn gemv(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemv");
    for (rows, cols) in SHAPES {
        let m = matrix(rows, cols);
        let m3 = Base3Matrix::from_ternary(&m);
        let mut out = vec![0i32; rows];
        g.throughput(Throughput::Elements((rows * cols) as u64));
        for k in Kernels::available() {
            let layouts = [
                (k.name.to_string(), m.bytes(), m.row_bytes(), 4, k.gemv),
                (
                    format!("{}-base3", k.name),
                    m3.bytes(),
                    m3.row_bytes(),
                    5,
                    k.gemv_base3,
                ),
            ];
            for (name, w, rb, per_byte, gemv) in layouts {
                let x = &activations(cols, 1)[..rb * per_byte];
                g.bench_with_input(
                    BenchmarkId::new(name, format!("{rows}x{cols}")),
                    &(),
                    |b, _| {
                        b.iter(|| {
                            gemv(black_box(w), rb, black_box(x), &mut out);
                            black_box(&out);
                        })
                    },
                );
            }
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
            let m3 = Base3Matrix::from_ternary(&m);
            let mut out = vec![0i32; rows * tokens];
            g.throughput(Throughput::Elements((rows * cols * tokens) as u64));
            for k in Kernels::available() {
                let layouts = [
                    (k.name.to_string(), m.bytes(), m.row_bytes(), 4, k.gemm),
                    (
                        format!("{}-base3", k.name),
                        m3.bytes(),
                        m3.row_bytes(),
                        5,
                        k.gemm_base3,
                    ),
                ];
                for (name, w, rb, per_byte, gemm) in layouts {
                    let x = activations_for(cols, tokens, rb * per_byte);
                    g.bench_with_input(
                        BenchmarkId::new(name, format!("{rows}x{cols}")),
                        &(),
                        |b, _| {
                            b.iter(|| {
                                gemm(black_box(w), rb, black_box(x.as_i8()), tokens, &mut out);
                                black_box(&out);
                            })
                        },
                    );
                }
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
    let dense: Vec<Base3Matrix> = mats.iter().map(Base3Matrix::from_ternary).collect();
    let total3: usize = dense.iter().map(|m| m.bytes().len()).sum();
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
                (k.gemv)(
                    black_box(m.bytes()),
                    m.row_bytes(),
                    &x[..m.row_bytes() * 4],
                    &mut out,
                );
            }
            black_box(&out);
        })
    });
    g.throughput(Throughput::Bytes(total3 as u64));
    g.bench_function(
        BenchmarkId::new(format!("{}-base3", k.name), "2b4t_30_layers"),
        |b| {
            b.iter(|| {
                for m in &dense {
                    let x = if m.cols() == 2560 { &x2560 } else { &x6912 };
                    let rb = m.row_bytes();
                    (k.gemv_base3)(black_box(m.bytes()), rb, &x[..rb * 5], &mut out);
                }
                black_box(&out);
            })
        },
    );
    g.throughput(Throughput::Bytes(total as u64));
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

/// Rows of the head bench: a quarter of 2B-4T's 128256, so even Q6_K (69 MB) is past the cache.
const HEAD_ROWS: usize = 32768;

fn head(c: &mut Criterion) {
    use bitnet_quant::q6_k::quantize_q6_k;
    use bitnet_quant::q8_0::{quantize_q8_0, quantize_q8_0_activations};
    const COLS: usize = 2560;
    let mut seed = 9;
    let mut uniform = || (lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0;
    let w: Vec<f32> = (0..HEAD_ROWS * COLS).map(|_| uniform() * 0.05).collect();
    let x: Vec<f32> = (0..COLS).map(|_| uniform()).collect();
    let (mut xq, mut xd) = (vec![0i8; COLS], vec![0f32; COLS / 32]);
    quantize_q8_0_activations(&x, &mut xq, &mut xd);
    let f16s: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
    let q8 = quantize_q8_0(&w).unwrap();
    let q6 = quantize_q6_k(&w).unwrap();
    let mut g = c.benchmark_group("head");
    g.sample_size(10);
    for k in Kernels::available() {
        g.throughput(Throughput::Bytes((f16s.len() * 2) as u64));
        g.bench_function(BenchmarkId::new(k.name, "f16"), |b| {
            b.iter(|| {
                let s: f32 = f16s.chunks_exact(COLS).map(|r| (k.dot_f16)(r, &x)).sum();
                black_box(s)
            })
        });
        for (name, bytes, dot) in [("q8_0", &q8, k.dot_q8_0), ("q6_k", &q6, k.dot_q6_k)] {
            g.throughput(Throughput::Bytes(bytes.len() as u64));
            g.bench_function(BenchmarkId::new(k.name, name), |b| {
                b.iter(|| {
                    let s: f32 = bytes
                        .chunks_exact(bytes.len() / HEAD_ROWS)
                        .map(|r| dot(r, &xq, &xd))
                        .sum();
                    black_box(s)
                })
            });
        }
    }
    g.finish();
}

/// Attention over a 2B-4T KV cache's rows (head size 128, five KV heads per row, so rows
/// are 640 values apart): one query's scores and one weighted sum over 32 rows (L1, as the
/// engine walks them) and 1024 rows (from L2/L3), f32 and f16 caches; throughput in
/// multiply-adds.
fn attention(c: &mut Criterion) {
    const HEAD: usize = 128;
    const STRIDE: usize = 5 * HEAD;
    let mut seed = 11;
    let mut uniform = || (lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0;
    let q: Vec<f32> = (0..HEAD).map(|_| uniform()).collect();
    let rows_f32: Vec<f32> = (0..1024 * STRIDE).map(|_| uniform()).collect();
    let rows_f16: Vec<half::f16> = rows_f32.iter().map(|&v| half::f16::from_f32(v)).collect();
    let mut g = c.benchmark_group("attention");
    for rows in [32usize, 1024] {
        let w: Vec<f32> = (0..rows).map(|_| uniform().abs() / rows as f32).collect();
        let mut scores = vec![0f32; rows];
        let mut out = vec![0f32; HEAD];
        g.throughput(Throughput::Elements((rows * HEAD) as u64));
        for k in Kernels::available() {
            let id = |what: &str| BenchmarkId::new(k.name, format!("{what}/{rows}"));
            g.bench_function(id("scores_f32"), |b| {
                b.iter(|| (k.score_rows_f32)(black_box(&q), &rows_f32, STRIDE, &mut scores))
            });
            g.bench_function(id("scores_f16"), |b| {
                b.iter(|| (k.score_rows_f16)(black_box(&q), &rows_f16, STRIDE, &mut scores))
            });
            g.bench_function(id("mix_f32"), |b| {
                b.iter(|| (k.mix_rows_f32)(&mut out, black_box(&w), &rows_f32, STRIDE))
            });
            g.bench_function(id("mix_f16"), |b| {
                b.iter(|| (k.mix_rows_f16)(&mut out, black_box(&w), &rows_f16, STRIDE))
            });
        }
    }
    g.finish();
}

/// Per-token int8 quantization of 64 activation rows of 2560 (a prefill chunk's projection
/// input), the scalar code every kernel set shares.
fn quantize(c: &mut Criterion) {
    const COLS: usize = 2560;
    const ROWS: usize = 64;
    let mut seed = 13;
    let x: Vec<f32> = (0..ROWS * COLS)
        .map(|_| (lcg(&mut seed) % 2001) as f32 / 100.0 - 10.0)
        .collect();
    let mut q = vec![0i8; ROWS * COLS];
    let mut g = c.benchmark_group("quantize_activations");
    g.throughput(Throughput::Elements((ROWS * COLS) as u64));
    g.bench_function("64x2560", |b| {
        b.iter(|| {
            for (x, q) in black_box(&x)
                .chunks_exact(COLS)
                .zip(q.chunks_exact_mut(COLS))
            {
                black_box(bitnet_quant::quantize_activations(x, q));
            }
        })
    });
    g.finish();
}

/// RMSNorm fused with the activation quantizer (each BitLinear's input) over 64 rows of the
/// 2B-4T widths 2560 and 6912, per kernel set.
fn rms_norm_quantize(c: &mut Criterion) {
    const ROWS: usize = 64;
    let mut g = c.benchmark_group("rms_norm_quantize");
    for cols in [2560usize, 6912] {
        let mut seed = 17;
        let x: Vec<f32> = (0..ROWS * cols)
            .map(|_| (lcg(&mut seed) % 2001) as f32 / 100.0 - 10.0)
            .collect();
        let w: Vec<f32> = (0..cols).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let mut q = vec![0i8; ROWS * cols];
        g.throughput(Throughput::Elements((ROWS * cols) as u64));
        for k in Kernels::available() {
            g.bench_function(BenchmarkId::new(k.name, format!("64x{cols}")), |b| {
                b.iter(|| {
                    for (x, q) in black_box(&x)
                        .chunks_exact(cols)
                        .zip(q.chunks_exact_mut(cols))
                    {
                        black_box((k.rms_norm_quantize)(x, &w, 1e-5, q));
                    }
                })
            });
        }
    }
    g.finish();
}

/// The trainer's f32 products (`bitnet_quant::sgemm`, on the thread pool): a BitLinear input
/// gradient of the training benchmark's model (`dy [4096, 256] @ W [256, 768]`) and its tied
/// head's logits (`x [4096, 256] @ E^T`, `E [2048, 256]` read transposed). Throughput in
/// multiply-adds.
fn sgemm(c: &mut Criterion) {
    use bitnet_quant::sgemm::{sgemm, MatRef};
    let mut seed = 17;
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    };
    let mut g = c.benchmark_group("sgemm");
    g.sample_size(10);
    for (name, m, k, n, transposed) in [
        ("input_grad_4096x256x768", 4096, 256, 768, false),
        ("head_4096x256x2048", 4096, 256, 2048, true),
    ] {
        let (a, b) = (values(m * k), values(k * n));
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements((m * k * n) as u64));
        for set in Kernels::available() {
            g.bench_function(BenchmarkId::new(set.name, name), |bench| {
                let a = MatRef::row_major(&a, m, k).unwrap();
                let b = if transposed {
                    MatRef::row_major(&b, n, k).unwrap().t()
                } else {
                    MatRef::row_major(&b, k, n).unwrap()
                };
                bench.iter(|| sgemm(set, black_box(a), black_box(b), &mut out).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(
    benches,
    gemv,
    gemm,
    gemv_stream,
    head,
    attention,
    quantize,
    rms_norm_quantize,
    sgemm
);
criterion_main!(benches);
