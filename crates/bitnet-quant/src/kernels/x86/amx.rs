//! AMX-INT8 matrix-matrix product (Intel Xeon from Sapphire Rapids on), for prefill.
//!
//! A tile instruction `tdpbssd C, A, B` adds `sum_i A[m][4j + i] * B[j][4n + i]` over
//! `j < 16`, `i < 4` to the i32 `C[m][n]`: a 16 x 16 block of dot products over 64 inputs of
//! signed bytes, in one instruction (1024 multiply-adds a cycle against 64 for 512-bit
//! `vpdpbusd`). Here `A` is 16 tokens' activations, read in place (row stride = the padded row
//! length), and `B` is 16 weight rows' ternary weights as signed bytes, so `C` is 16 tokens x
//! 16 rows of the products themselves: unlike the other sets, no activation sums to subtract.
//!
//! `B` wants, in its row `j`, four consecutive inputs of each of the 16 weight rows side by
//! side, so the 2-bit layout is transposed once per pass of `PASS_ROWS` (32) rows into a buffer
//! of tiles: a masked gather takes dword `p` of a block from each of 16 rows, and four
//! shift-and-masks (less 1) give its four 2-bit fields as the weights of inputs
//! `32 f + 4 p .. + 4`. Each pass then runs all token tiles against the buffer, two token
//! tiles by two row tiles at a time (four accumulators, two `A` and two `B` tiles: the eight
//! tile registers), every step of the row before the accumulators are stored. Cutting the
//! steps into chunks of 4-16, each run for every token group before the next (so a chunk's
//! `B` tiles stay in L1, the accumulators stored and reloaded between chunks), measured slower
//! on an Emerald Rapids Xeon: pp128 of the 2B-4T shape 67 against 109 tokens/s on one thread,
//! 128-136 against 123-159 on two.
//!
//! Token counts that are not a multiple of 16 leave up to 15 tokens to the AVX-512 VNNI
//! kernel. Linux grants a process the tile registers only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`): [`detected`] asks once, and
//! without the grant (another OS, an old kernel, a sandbox that refuses it) the set is not
//! offered and the AVX-512 kernel runs instead.
//!
//! Exactness: each `C` lane gains at most `64 * 128` per step, so the totals are exact in
//! i32 for the same rows as the scalar reference.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

use super::avx512;
use crate::kernels::checked_gemm_rows;
use crate::ternary::{BLOCK_BYTES, BLOCK_ELEMS, ROW_GROUP};

/// Rows (tokens in `A`, weight rows in `B`, both in `C`) of a tile.
const TILE_ROWS: usize = 16;

/// Bytes in a tile row: the inputs one `tdpbssd` step covers.
const TILE_BYTES: usize = 64;

/// Weight rows per pass over the tokens: two `B` tiles.
const PASS_ROWS: usize = 2 * TILE_ROWS;

/// Whether this process may use the set: the CPU reports AMX-TILE and AMX-INT8, the AVX-512
/// VNNI set is there for the leftover tokens, and the kernel granted the tile registers.
pub fn detected() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| avx512::detected() && cpu_reports_amx_int8() && request_tile_data())
}

/// CPUID leaf 7, sub-leaf 0: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
fn cpu_reports_amx_int8() -> bool {
    // Leaf 0 gives the highest leaf, checked before leaf 7 is asked for.
    if __cpuid(0).eax < 7 {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    leaf7.edx & (1 << 24) != 0 && leaf7.edx & (1 << 25) != 0
}

/// Asks Linux for the tile data state; true when granted.
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) takes two integers and
    // touches no memory of ours; `syscall` clobbers rcx and r11, declared here.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

/// Other systems: not attempted.
#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// AMX matrix-matrix product; see [`crate::kernels::GemmFn`]. Exactly equal to
/// [`crate::kernels::scalar::gemm`]. Whole groups of 16 tokens go through the tiles, the rest
/// through [`avx512::gemm`], which is also the whole product where [`detected`] is false.
pub fn gemm(w: &[u8], row_bytes: usize, x: &[i8], tokens: usize, out: &mut [i32]) {
    let tiled = tokens / TILE_ROWS * TILE_ROWS;
    if !detected() || tiled == 0 {
        return avx512::gemm(w, row_bytes, x, tokens, out);
    }
    let rows = checked_gemm_rows(w, row_bytes, x.len(), tokens, out.len(), 4);
    let held = w.len() / row_bytes;
    let k = row_bytes * 4;
    B_TILES.with_borrow_mut(|tiles| {
        // SAFETY: the set was detected (which includes the tile grant); `checked_rows` and
        // the assert guarantee that `w` is `held >= rows` rows of whole row groups of
        // `row_bytes` (a positive multiple of 32), `x` holds `tiled <= tokens` rows of `k`
        // activations and `out` `tiled * rows` values.
        unsafe { tiled_products(w, row_bytes, held, rows, x, tiled, out, tiles) }
    });
    if tiled < tokens {
        avx512::gemm(
            w,
            row_bytes,
            &x[tiled * k..tokens * k],
            tokens - tiled,
            &mut out[tiled * rows..tokens * rows],
        );
    }
}

/// One tile row (64 bytes) aligned as the tile loads prefer.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct TileRow([u32; TILE_ROWS]);

/// A whole tile, for the results.
#[repr(C, align(64))]
struct Tile([[i32; TILE_ROWS]; TILE_ROWS]);

thread_local! {
    /// Each thread's buffer of transposed weight tiles, kept between calls (a pass over a
    /// 6912-input row needs 216 KB).
    static B_TILES: RefCell<Vec<TileRow>> = const { RefCell::new(Vec::new()) };
}

/// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_full() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&(TILE_BYTES as u16).to_le_bytes());
            c[48 + t] = TILE_ROWS as u8;
        }
        TileConfig(c)
    }
}

/// `out[t * rows + r] = sum_k t[r, k] * x[t, k]` for `r < rows`, `t < tokens`.
///
/// # Safety
///
/// The set must be [`detected`]. `row_bytes` must be a positive multiple of [`BLOCK_BYTES`],
/// `w` exactly `held` rows of whole row groups of `row_bytes` bytes with `rows <= held`, `x`
/// at least `tokens * row_bytes * 4` activations, `tokens` a multiple of 16, and `out` at
/// least `tokens * rows` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn tiled_products(
    w: &[u8],
    row_bytes: usize,
    held: usize,
    rows: usize,
    x: &[i8],
    tokens: usize,
    out: &mut [i32],
    tiles: &mut Vec<TileRow>,
) {
    let blocks = row_bytes / BLOCK_BYTES;
    let k = blocks * BLOCK_ELEMS;
    let steps = k / TILE_BYTES;
    // Per step, two B tiles of 16 rows.
    tiles.resize(steps * 2 * TILE_ROWS, TileRow([0; TILE_ROWS]));
    let config = TileConfig::all_full();
    let mut c = [
        Tile([[0; TILE_ROWS]; TILE_ROWS]),
        Tile([[0; TILE_ROWS]; TILE_ROWS]),
    ];
    let mut c2 = [
        Tile([[0; TILE_ROWS]; TILE_ROWS]),
        Tile([[0; TILE_ROWS]; TILE_ROWS]),
    ];
    // SAFETY: `config` is a valid 64-byte palette-1 configuration (eight 16 x 64 tiles).
    unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
    for r0 in (0..rows).step_by(PASS_ROWS) {
        // SAFETY: `w` holds `held` rows of whole row groups; `r0` is a multiple of 32.
        unsafe { transpose_pass(w, row_bytes, held, r0, blocks, tiles) };
        let b = tiles.as_ptr() as *const u8;
        let mut t0 = 0;
        while t0 < tokens {
            let a = x[t0 * k..].as_ptr();
            let pair = t0 + 2 * TILE_ROWS <= tokens;
            // SAFETY: tiles 0-7 are configured as 16 x 64 bytes. For every step `s`, the A
            // tiles read 16 rows of 64 bytes at `a + s * 64` (and `16 * k` further for the
            // second token tile, present when `pair`), stride `k`: tokens `t0..t0 + 32`
            // (or `+ 16`) of `x`, inside it. The B tiles read the 2 KB at `b + s * 2048`,
            // inside `tiles` (`steps * 2` tiles of 1 KB). The stores write 1 KB into each of
            // the four result tiles.
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for s in 0..steps {
                    let (a0, b0) = (a.add(s * TILE_BYTES), b.add(s * 2 * 1024));
                    if pair {
                        asm!(
                            "tileloadd tmm4, [{a0} + {k}*1]",
                            "tileloadd tmm5, [{a1} + {k}*1]",
                            "tileloadd tmm6, [{b0} + {line}*1]",
                            "tileloadd tmm7, [{b1} + {line}*1]",
                            "tdpbssd tmm0, tmm4, tmm6",
                            "tdpbssd tmm1, tmm4, tmm7",
                            "tdpbssd tmm2, tmm5, tmm6",
                            "tdpbssd tmm3, tmm5, tmm7",
                            a0 = in(reg) a0,
                            a1 = in(reg) a0.add(TILE_ROWS * k),
                            k = in(reg) k,
                            b0 = in(reg) b0,
                            b1 = in(reg) b0.add(1024),
                            line = in(reg) TILE_BYTES,
                            options(nostack, readonly),
                        );
                    } else {
                        asm!(
                            "tileloadd tmm4, [{a0} + {k}*1]",
                            "tileloadd tmm6, [{b0} + {line}*1]",
                            "tileloadd tmm7, [{b1} + {line}*1]",
                            "tdpbssd tmm0, tmm4, tmm6",
                            "tdpbssd tmm1, tmm4, tmm7",
                            a0 = in(reg) a0,
                            k = in(reg) k,
                            b0 = in(reg) b0,
                            b1 = in(reg) b0.add(1024),
                            line = in(reg) TILE_BYTES,
                            options(nostack, readonly),
                        );
                    }
                }
                asm!(
                    "tilestored [{c0} + {line}*1], tmm0",
                    "tilestored [{c1} + {line}*1], tmm1",
                    "tilestored [{c2} + {line}*1], tmm2",
                    "tilestored [{c3} + {line}*1], tmm3",
                    c0 = in(reg) c[0].0.as_mut_ptr(),
                    c1 = in(reg) c[1].0.as_mut_ptr(),
                    c2 = in(reg) c2[0].0.as_mut_ptr(),
                    c3 = in(reg) c2[1].0.as_mut_ptr(),
                    line = in(reg) TILE_BYTES,
                    options(nostack),
                );
            }
            let token_tiles = if pair { 2 } else { 1 };
            for (tt, results) in [&c, &c2].into_iter().enumerate().take(token_tiles) {
                for (rt, tile) in results.iter().enumerate() {
                    let row0 = r0 + rt * TILE_ROWS;
                    if row0 >= rows {
                        break;
                    }
                    let n = (rows - row0).min(TILE_ROWS);
                    for (m, line) in tile.0.iter().enumerate() {
                        let at = (t0 + tt * TILE_ROWS + m) * rows + row0;
                        out[at..at + n].copy_from_slice(&line[..n]);
                    }
                }
            }
            t0 += token_tiles * TILE_ROWS;
        }
    }
    // SAFETY: releases the tile state configured above; nothing reads it afterwards.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// Writes the B tiles of weight rows `r0..r0 + 32` for every step into `tiles`: tile
/// `2 s + i` row `j`, dword `n` holds the weights (signed bytes) of inputs `64 s + 4 j .. + 4`
/// of weight row `r0 + 16 i + n` (-1 for rows at or past `held`, whose results are dropped).
///
/// # Safety
///
/// AVX-512 F and BW must be available; `w` must be exactly `held` rows of whole row groups of
/// `row_bytes` (a positive multiple of 32) bytes, `r0` a multiple of 32 and `tiles` at least
/// `blocks * 4` tiles long, with `blocks = row_bytes / 32`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn transpose_pass(
    w: &[u8],
    row_bytes: usize,
    held: usize,
    r0: usize,
    blocks: usize,
    tiles: &mut [TileRow],
) {
    let fields = _mm512_set1_epi32(0x0303_0303);
    let ones = _mm512_set1_epi8(1);
    // Byte offset of row `n`'s block from its tile's first row's block: rows come in groups
    // of four, each group's blocks interleaved (see `crate::ternary`).
    let offsets: [i32; TILE_ROWS] = std::array::from_fn(|n| {
        ((n / ROW_GROUP) * ROW_GROUP * row_bytes + (n % ROW_GROUP) * BLOCK_BYTES) as i32
    });
    // SAFETY: `offsets` is 16 i32.
    let offsets = unsafe { _mm512_loadu_si512(offsets.as_ptr() as *const __m512i) };
    for i in 0..2 {
        let first = r0 + i * TILE_ROWS;
        let present = held.saturating_sub(first).min(TILE_ROWS);
        let mask: __mmask16 = ((1u32 << present) - 1) as __mmask16;
        // Only dereferenced through the mask, so only for rows present.
        let base = w.as_ptr().wrapping_add(first * row_bytes);
        for b in 0..blocks {
            let block = base.wrapping_add(b * ROW_GROUP * BLOCK_BYTES);
            for p in 0..BLOCK_BYTES / 4 {
                let idx = _mm512_add_epi32(offsets, _mm512_set1_epi32(4 * p as i32));
                // SAFETY: lane `n` reads the 4 bytes at `block + offsets[n] + 4p`, dword `p`
                // of block `b` of row `first + n`, only where the mask says that row is
                // present, hence inside `w`.
                let v = unsafe {
                    _mm512_mask_i32gather_epi32::<1>(
                        _mm512_setzero_si512(),
                        mask,
                        idx,
                        block as *const i32,
                    )
                };
                // Field f of these bytes holds inputs 32 f + 4 p.. of the block: step
                // 2 b + f / 2, tile row p + 8 (f mod 2).
                let codes = [
                    _mm512_and_si512(_mm512_srli_epi32::<6>(v), fields),
                    _mm512_and_si512(_mm512_srli_epi32::<4>(v), fields),
                    _mm512_and_si512(_mm512_srli_epi32::<2>(v), fields),
                    _mm512_and_si512(v, fields),
                ];
                for (f, &code) in codes.iter().enumerate() {
                    let weights = _mm512_sub_epi8(code, ones);
                    let step = 2 * b + f / 2;
                    let at = (2 * step + i) * TILE_ROWS + p + 8 * (f % 2);
                    // SAFETY: `at < blocks * 4 * 16`, inside `tiles` by the contract; a
                    // TileRow is 64 bytes.
                    unsafe {
                        _mm512_storeu_si512(tiles.as_mut_ptr().add(at) as *mut __m512i, weights)
                    };
                }
            }
        }
    }
}
