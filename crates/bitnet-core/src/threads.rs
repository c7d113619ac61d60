use crate::{Error, Result};

/// The number of physical cores, the default thread count: hyper-threads share the load and
/// vector units that ternary matmuls saturate, so they add barrier cost and little speed.
pub fn default_thread_count() -> usize {
    physical_cores().unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// Counts distinct (package, core) pairs in /proc/cpuinfo, bounded by the CPUs we may use.
fn physical_cores() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut cores = std::collections::HashSet::new();
    let mut package = None;
    for line in text.lines() {
        let mut kv = line.splitn(2, ':');
        let key = kv.next()?.trim();
        let val = kv.next().map(str::trim);
        match (key, val) {
            ("physical id", Some(v)) => package = Some(v.to_string()),
            ("core id", Some(v)) => {
                cores.insert((package.clone(), v.to_string()));
            }
            _ => {}
        }
    }
    let allowed = std::thread::available_parallelism().ok()?.get();
    (!cores.is_empty()).then(|| cores.len().min(allowed))
}

/// Sizes the process-wide pool that parallel work uses outside any [`ThreadPool::install`]
/// to `n` threads (`0`: [`default_thread_count`]) and returns the count. For binaries, which
/// own the process; it can be set once, before any parallel work.
///
/// The calling thread becomes one of the `n` workers, so the parallel loops of a forward pass
/// started from it run there and share their pieces out by work stealing, instead of being
/// handed to the pool and waited for, a sleep and a wake-up per loop (a few hundred per
/// generated token). Measured on the 2B-4T shape, one thread: 8.7 -> 10.2 tokens/s. The
/// calling thread should therefore be the one that runs the model, and it should not exit
/// while the pool is in use (the main thread of a binary qualifies).
pub fn init_global_pool(n: usize) -> Result<usize> {
    let n = if n == 0 { default_thread_count() } else { n };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .use_current_thread()
        .thread_name(|i| format!("bitnet-worker-{i}"))
        .build_global()
        .map_err(|e| Error::Threads(e.to_string()))?;
    Ok(n)
}

/// A pool of worker threads that runs the parallel parts of a forward pass.
pub struct ThreadPool {
    pool: rayon::ThreadPool,
}

impl ThreadPool {
    /// A pool of `n` threads (`0` means [`default_thread_count`]).
    pub fn new(n: usize) -> Result<Self> {
        let n = if n == 0 { default_thread_count() } else { n };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("bitnet-worker-{i}"))
            .build()
            .map_err(|e| Error::Threads(e.to_string()))?;
        Ok(ThreadPool { pool })
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `f` with this pool as the one parallel iterators inside it use.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_has_requested_threads() {
        assert!(default_thread_count() >= 1);
        let p = ThreadPool::new(3).unwrap();
        assert_eq!(p.threads(), 3);
        assert_eq!(p.install(rayon::current_num_threads), 3);
    }
}
