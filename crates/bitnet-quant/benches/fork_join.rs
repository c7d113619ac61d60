//! What one parallel loop of decode costs in synchronisation: the engine's rayon pool (the
//! calling thread is a worker, rows cut into tasks of `ROWS_PER_TASK` and stolen) against a
//! small persistent pool whose workers spin on an epoch counter and take fixed equal shares.
//!
//! `cargo bench -p bitnet-quant --bench fork_join`
//!
//! `empty` is the spinning pool's fork-join round trip with no work (its cost per loop; rayon's
//! `join` of two empty closures runs both on the caller, so it has no such figure); `gemv` is
//! a 2560x2560 ternary matrix-vector product (the q and o projections of the 2B-4T model) split
//! over the threads: rayon, the spinning pool with equal fixed halves, and the spinning pool
//! handing out tasks from a shared counter, beside the same product on one thread. Decode runs about eight such loops per layer
//! (norm+quantize, qkv, attention, o, norm+quantize, gate/up, down, residuals), some 250 per
//! token on the 2B-4T shape, so the `empty` times x 250 against the time of a token says what a
//! persistent pool could save.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bitnet_quant::bitlinear::ROWS_PER_TASK;
use bitnet_quant::kernels::Kernels;
use bitnet_quant::TernaryMatrix;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rayon::prelude::*;

const THREADS: usize = 2;

/// Workers that spin until the epoch moves, run the one job they were built with on their share
/// and count themselves done; the caller runs share 0 and spins until all are done.
struct SpinPool {
    epoch: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    job: Arc<dyn Fn(usize) + Send + Sync>,
    workers: Vec<JoinHandle<()>>,
}

impl SpinPool {
    fn new(threads: usize, job: Arc<dyn Fn(usize) + Send + Sync>) -> SpinPool {
        let epoch = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (1..threads)
            .map(|share| {
                let (epoch, done, stop, job) =
                    (epoch.clone(), done.clone(), stop.clone(), job.clone());
                std::thread::spawn(move || {
                    let mut seen = 0;
                    loop {
                        let e = loop {
                            let e = epoch.load(Ordering::Acquire);
                            if e != seen || stop.load(Ordering::Relaxed) {
                                break e;
                            }
                            std::hint::spin_loop();
                        };
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        seen = e;
                        job(share);
                        done.fetch_add(1, Ordering::AcqRel);
                    }
                })
            })
            .collect();
        SpinPool {
            epoch,
            done,
            stop,
            job,
            workers,
        }
    }

    fn run(&self) {
        let target = self.done.load(Ordering::Acquire) + self.workers.len();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        (self.job)(0);
        while self.done.load(Ordering::Acquire) < target {
            std::hint::spin_loop();
        }
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            w.join().expect("spin worker");
        }
    }
}

fn lcg(s: &mut u64) -> u64 {
    *s = s
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *s >> 33
}

/// Matrices cycled through so that each product reads its weights from memory, as decode does
/// (40 x 1.6 MB, past the caches), instead of from a cache that would favour whichever thread
/// happens to keep the same rows.
const MATRICES: usize = 40;

/// Rows `r0..r0 + out.len()` of `m` times `x` (whole row groups, as the engine's tasks).
fn gemv_rows(k: &Kernels, m: &TernaryMatrix, x: &[i8], r0: usize, out: &mut [i32]) {
    let rb = m.row_bytes();
    let end = TernaryMatrix::padded_rows(r0 + out.len());
    (k.gemv)(&m.bytes()[r0 * rb..end * rb], rb, x, out)
}

/// How the spinning pool's threads pick their rows.
enum Shares {
    /// Thread `i` takes task `i`: one equal, fixed part per thread.
    Fixed,
    /// Threads take the next task from this counter until none is left.
    Counter(Arc<AtomicUsize>),
}

/// The spinning pool's job: the product with matrix `current` in `tasks` parts of `task_rows`
/// rows (each part behind its own, uncontended lock), shared out as `shares` says.
fn spin_gemv_job(
    ms: &Arc<Vec<TernaryMatrix>>,
    x: &Arc<Vec<i8>>,
    current: &Arc<AtomicUsize>,
    task_rows: usize,
    tasks: usize,
    shares: Shares,
) -> Arc<dyn Fn(usize) + Send + Sync> {
    let (ms, x, current) = (ms.clone(), x.clone(), current.clone());
    let outs: Vec<Mutex<Vec<i32>>> = (0..tasks).map(|_| Mutex::new(vec![0; task_rows])).collect();
    let k = Kernels::get();
    Arc::new(move |i: usize| {
        let m = &ms[current.load(Ordering::Acquire)];
        let run = |t: usize| gemv_rows(k, m, &x, t * task_rows, &mut outs[t].lock().unwrap());
        match &shares {
            Shares::Fixed => run(i),
            Shares::Counter(taken) => loop {
                let t = taken.fetch_add(1, Ordering::Relaxed);
                if t >= tasks {
                    break;
                }
                run(t);
            },
        }
    })
}

fn fork_join(c: &mut Criterion) {
    let (rows, cols) = (2560, 2560);
    let mut s = 1;
    let ms: Arc<Vec<TernaryMatrix>> = Arc::new(
        (0..MATRICES)
            .map(|_| {
                let codes: Vec<i8> = (0..rows * cols)
                    .map(|_| (lcg(&mut s) % 3) as i8 - 1)
                    .collect();
                TernaryMatrix::from_codes(&codes, rows, cols).unwrap()
            })
            .collect(),
    );
    let x: Arc<Vec<i8>> = Arc::new(
        (0..TernaryMatrix::padded_cols(cols))
            .map(|_| lcg(&mut s) as u8 as i8)
            .collect(),
    );
    let k = Kernels::get();
    let rayon_pool = rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .use_current_thread()
        .build()
        .unwrap();
    let next = AtomicUsize::new(0);
    let advance = || next.fetch_add(1, Ordering::Relaxed) % MATRICES;

    let mut g = c.benchmark_group("fork_join");
    let mut out = vec![0i32; rows];
    g.bench_function(BenchmarkId::new("gemv", "1 thread"), |b| {
        b.iter(|| gemv_rows(k, &ms[advance()], black_box(&x), 0, &mut out))
    });
    g.bench_function(BenchmarkId::new("gemv", "rayon"), |b| {
        b.iter(|| {
            let m = &ms[advance()];
            rayon_pool.install(|| {
                out.par_chunks_mut(ROWS_PER_TASK)
                    .enumerate()
                    .for_each(|(i, o)| gemv_rows(k, m, &x, i * ROWS_PER_TASK, o))
            })
        })
    });

    let current = Arc::new(AtomicUsize::new(0));
    let fixed = spin_gemv_job(&ms, &x, &current, rows / THREADS, THREADS, Shares::Fixed);
    let spin = SpinPool::new(THREADS, fixed);
    g.bench_function(BenchmarkId::new("gemv", "spin"), |b| {
        b.iter(|| {
            current.store(advance(), Ordering::Release);
            spin.run()
        })
    });
    drop(spin);

    // The same pool taking tasks of ROWS_PER_TASK rows from a shared counter, as rayon's
    // stealing balances them.
    let taken = Arc::new(AtomicUsize::new(0));
    let tasks = rows / ROWS_PER_TASK;
    let counted = Shares::Counter(taken.clone());
    let spin = SpinPool::new(
        THREADS,
        spin_gemv_job(&ms, &x, &current, ROWS_PER_TASK, tasks, counted),
    );
    g.bench_function(BenchmarkId::new("gemv", "spin, shared task counter"), |b| {
        b.iter(|| {
            current.store(advance(), Ordering::Release);
            taken.store(0, Ordering::Release);
            spin.run()
        })
    });
    drop(spin);
    let spin = SpinPool::new(
        THREADS,
        Arc::new(|i| {
            black_box(i);
        }),
    );
    g.bench_function(BenchmarkId::new("empty", "spin"), |b| b.iter(|| spin.run()));
    drop(spin);
    g.finish();
}

criterion_group!(benches, fork_join);
criterion_main!(benches);
