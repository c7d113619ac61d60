//! Ternary x int8 kernels behind one dispatch table.
//!
//! [`Kernels::get`] picks the table once, from the CPU features detected at start-up. Every
//! kernel computes exact i32 sums, so every implementation must agree bit for bit with
//! [`scalar`], the reference.

pub mod scalar;

use std::sync::OnceLock;

/// `out[r] = sum_k t[r, k] * x[k]` over the rows in `w` (runtime layout, `row_bytes` per row);
/// `x` is one padded activation row of `row_bytes * 4` int8 values.
pub type GemvFn = fn(w: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]);

/// The same for `tokens` activation rows laid end to end in `x`:
/// `out[t * rows + r] = sum_k t[r, k] * x[t, k]` with `rows = w.len() / row_bytes`.
pub type GemmFn = fn(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]);

/// A set of kernels for one instruction set.
#[derive(Clone, Copy)]
pub struct Kernels {
    /// Name shown by `bitnet inspect --cpu` and the bench output.
    pub name: &'static str,
    /// Matrix-vector product (decode).
    pub gemv: GemvFn,
    /// Matrix-matrix product (prefill, batches).
    pub gemm: GemmFn,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernels({})", self.name)
    }
}

impl Kernels {
    /// The scalar reference set.
    pub const SCALAR: Kernels = Kernels {
        name: "scalar",
        gemv: scalar::gemv,
        gemm: scalar::gemm,
    };

    /// The best set for this CPU, chosen on first call.
    pub fn get() -> &'static Kernels {
        static CHOSEN: OnceLock<Kernels> = OnceLock::new();
        CHOSEN.get_or_init(Self::select)
    }

    fn select() -> Kernels {
        // The SIMD sets arrive with the kernel issue; the scalar set is correct everywhere.
        Kernels::SCALAR
    }
}
