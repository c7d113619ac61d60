//! Activation-sized f32 buffers kept from one use to the next, for the outputs of the CPU
//! operations that write every value before anything reads it.
//!
//! A training step allocates the same few dozen buffers of the same sizes every time (a
//! block's saved activations, its gradients, the products' outputs). Fresh from the allocator,
//! each has to be filled before safe code may hand it out: at the training benchmark's size
//! about 600 MB of zeros a step, a few percent of it. A buffer given back here after its last
//! use is handed out again as it is, its old values still in it; [`take`]'s callers overwrite
//! every value, so none of them is ever read.

use std::sync::Mutex;

/// Buffers kept at most (a step of the benchmark's 4-layer model gives back about 50).
const KEEP: usize = 256;

/// Buffers shorter than this are not worth keeping (and are left to the allocator). The
/// unit tests keep every buffer, so that their small models run on stale values too.
const MIN_LEN: usize = if cfg!(test) { 1 } else { 1 << 14 };

/// Kept buffers, for [`take`] and [`give_back`].
#[derive(Debug, Default)]
struct Pool(Mutex<Vec<Vec<f32>>>);

static POOL: Pool = Pool(Mutex::new(Vec::new()));

/// A buffer of `len` values for an output its caller writes in full before reading any.
/// The values are stale (a kept buffer whose capacity is `len` or a little more, cut to `len`
/// or grown back to it) or, for a new buffer and for values added in growing one, NaN in
/// debug builds (so that a value left unwritten shows in the tests) and zero otherwise.
pub(crate) fn take(len: usize) -> Vec<f32> {
    POOL.take(len)
}

/// Keeps `v` for a later [`take`] (its values are left as they are).
pub(crate) fn give_back(v: Vec<f32>) {
    POOL.give_back(v)
}

impl Pool {
    fn take(&self, len: usize) -> Vec<f32> {
        let fill = if cfg!(debug_assertions) {
            f32::NAN
        } else {
            0.0
        };
        if len >= MIN_LEN {
            if let Some(mut v) = self.reuse(len) {
                // A buffer cut short by an earlier, shorter use grows back within its
                // capacity: memory already touched, so only the fill of the added values.
                v.resize(len, fill);
                return v;
            }
        }
        // Filled by the thread pool: callers run on the one thread that walks candle's graph.
        crate::fused::filled(len, fill)
    }

    /// The kept buffer that fits `len` best, by capacity (a buffer keeps its capacity when a
    /// use cuts it shorter): one of that capacity if there is one, else the smallest larger
    /// one up to twice `len`.
    fn reuse(&self, len: usize) -> Option<Vec<f32>> {
        let mut free = self.0.lock().ok()?;
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len && v.capacity() <= 2 * len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i)?;
        Some(free.swap_remove(best))
    }

    fn give_back(&self, v: Vec<f32>) {
        if v.capacity() < MIN_LEN {
            return;
        }
        if let Ok(mut free) = self.0.lock() {
            if free.len() < KEEP {
                free.push(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_at_the_length_asked_for() {
        let pool = Pool::default();
        let n = 3 * (MIN_LEN + 100);
        let mut v = pool.take(n);
        assert_eq!(v.len(), n);
        if cfg!(debug_assertions) {
            assert!(v.iter().all(|x| x.is_nan()));
        }
        v.fill(7.0);
        let at = v.as_ptr();
        pool.give_back(v);
        // More than twice as long as this request: a new buffer.
        let small = pool.take(MIN_LEN + 100);
        assert_ne!(small.as_ptr(), at);
        // A little shorter: the same buffer, cut, its old values as they were.
        let w = pool.take(n - 50);
        assert_eq!((w.len(), w.as_ptr()), (n - 50, at));
        assert!(w.iter().all(|&x| x == 7.0));
        // Back at its full length: the same buffer again (its capacity was kept), the
        // values cut off refilled, the rest as they were.
        pool.give_back(w);
        let full = pool.take(n);
        assert_eq!((full.len(), full.as_ptr()), (n, at));
        assert!(full[..n - 50].iter().all(|&x| x == 7.0));
        if cfg!(debug_assertions) {
            assert!(full[n - 50..].iter().all(|x| x.is_nan()));
        }
        // Longer than any kept buffer: a new one.
        pool.give_back(full);
        let longer = pool.take(n + 1);
        assert_ne!(longer.as_ptr(), at);
        // Short buffers are not kept.
        pool.give_back(Vec::new());
        assert!(pool
            .0
            .lock()
            .unwrap()
            .iter()
            .all(|v| v.capacity() >= MIN_LEN));
        drop(small);
    }
}
