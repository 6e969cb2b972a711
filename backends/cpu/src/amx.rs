//! Products of bf16 activations by bf16 K-major weights on AMX tiles (`tdpbf16ps`), where
//! the cpu has AMX-BF16 and the OS lets this process use the tile state (Linux grants it
//! on request, once per process).
//!
//! `dst [R, C] (+)= x [R, K] · w [K, C]`, the operands as [`crate::bf16dot`] takes them:
//! `x` rounded to bf16 once per product, rows padded with zeros to
//! [`crate::bf16dot::pair_stride`] (a multiple of 32, one tile row), and `w` the stored
//! K-major weights. One `tdpbf16ps` multiplies a 16 x 32 tile of activations by a 32 x 16
//! tile of weights into a 16 x 16 tile of f32 sums: 16384 FLOPs, about 16 times the
//! multiply-adds of a `vdpbf16ps`.
//!
//! The weight tile must hold K in pairs (row `p` of the tile: the pairs `w[2p][c]`,
//! `w[2p + 1][c]` of its 16 columns), so bf16 weights are stored that way at upload
//! ([`Layout`]), each 16-column tile contiguous over K, and the activations in K steps
//! ([`step_rows`]). Each block of up to 32 rows runs over 128 columns at a time, 32 at a
//! time: four accumulator tiles (2 x 2), two activation tiles and two weight tiles, the
//! eight tile registers, over all of K. Accumulators whose 16 columns lie inside the
//! output load the bias from `dst` and store back to it directly; those at a column edge
//! go through a staging tile.
//!
//! The products of bf16 values are exact in f32 and the tile sums in f32, so results differ
//! from the other kernels on the same rounded inputs only in the order of the f32 sums.

use crate::bf16dot::Operands;

/// Whether this cpu and OS run the kernels here: AMX-TILE and AMX-BF16, the pair-dot
/// kernels' AVX-512 BF16 (which rounds the activations), the tile
/// state granted to this process, and no `MOE_CPU_SIMD` cap (`avx512` stops here and keeps
/// the `vdpbf16ps` kernels, to compare the paths on one machine).
pub(crate) fn available() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            crate::bf16dot::available()
                && std::env::var("MOE_CPU_SIMD").as_deref() != Ok("avx512")
                && x86::supported()
                && x86::request_permission()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

/// Where each bf16 weight of a stack of `[n, k]` matrices lies when stored as the tile
/// kernels read it ([`crate::buffer::CpuBuffer::WeightTiles`]): each matrix as 16-column
/// weight tiles, each tile's K pairs in order (`(tile·pairs + k/2)·32 + (c % 16)·2 + k % 2`),
/// K padded with zeros to a multiple of 32 and the columns to an even number of tiles. A
/// tile is then one contiguous run of memory over all of K, which the products load with
/// no copy, where the K-major layout must be packed strip by strip (measured: about half
/// the kernel's time at T = 512 went to packing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Columns (outputs) of each logical matrix.
    pub(crate) n: usize,
    /// Rows (inputs) of each logical matrix.
    pub(crate) k: usize,
}

impl Layout {
    /// Weight tiles per matrix (an even number).
    pub(crate) fn tiles(self) -> usize {
        self.n.div_ceil(32) * 2
    }

    /// K pairs per tile, padding included.
    pub(crate) fn pairs(self) -> usize {
        self.k.next_multiple_of(32) / 2
    }

    /// Words per matrix.
    pub(crate) fn matrix(self) -> usize {
        self.tiles() * self.pairs() * 32
    }

    /// The word of weight `(k, c)` (input `k`, output `c`) within its matrix.
    pub(crate) fn index(self, k: usize, c: usize) -> usize {
        ((c / 16) * self.pairs() + k / 2) * 32 + (c % 16) * 2 + k % 2
    }

    /// The stack `kmajor` (`[G, k, n]` bf16 bits) in this layout.
    pub(crate) fn tiled(self, kmajor: &[u16]) -> Vec<u16> {
        let mat = self.n * self.k;
        let g = kmajor.len().checked_div(mat).unwrap_or(0);
        let mut out = vec![0u16; g * self.matrix()];
        for (src, dst) in kmajor.chunks_exact(mat.max(1)).take(g).zip(out.chunks_exact_mut(self.matrix().max(1))) {
            for k in 0..self.k {
                for c in 0..self.n {
                    dst[self.index(k, c)] = src[k * self.n + c];
                }
            }
        }
        out
    }

    /// The stack `tiles` in this layout back as `[G, k, n]` bf16 bits.
    pub(crate) fn untiled(self, tiles: &[u16]) -> Vec<u16> {
        let g = tiles.len().checked_div(self.matrix()).unwrap_or(0);
        let mut out = vec![0u16; g * self.n * self.k];
        for (src, dst) in
            tiles.chunks_exact(self.matrix().max(1)).take(g).zip(out.chunks_exact_mut((self.n * self.k).max(1)))
        {
            for k in 0..self.k {
                for c in 0..self.n {
                    dst[k * self.n + c] = src[self.index(k, c)];
                }
            }
        }
        out
    }

    /// Rows `k0..k0 + kb` of matrix `e` of the stack `tiles`, widened into `scratch` as a
    /// dense `[kb, n]` f32 block (the K-major rows the f32 kernels take).
    pub(crate) fn widen_rows(self, tiles: &[u16], e: usize, (k0, kb): (usize, usize), scratch: &mut Vec<f32>) {
        scratch.resize(kb * self.n, 0.0);
        let m = &tiles[e * self.matrix()..(e + 1) * self.matrix()];
        for (r, out) in scratch.chunks_exact_mut(self.n.max(1)).take(kb).enumerate() {
            for (c, o) in out.iter_mut().enumerate() {
                *o = half::bf16::from_bits(m[self.index(k0 + r, c)]).to_f32();
            }
        }
    }
}

/// `rows` rows of `x` (`kk` each, contiguous) rounded to bf16 (to nearest, ties to even)
/// in K steps of 32, K padded with zeros to whole steps: input `k` of row `r` at
/// `(k / 32 · rows + r) · 32 + k % 32`. Sixteen rows from any row are then one contiguous
/// activation tile, for a group starting at any row, with no copy per product.
pub(crate) fn step_rows(x: &[f32], rows: usize, kk: usize) -> Vec<u16> {
    let steps = kk.div_ceil(32);
    let rounded = crate::bf16dot::round_rows(x, rows, kk);
    let rs = crate::bf16dot::pair_stride(kk);
    let mut out = vec![0u16; steps * rows * 32];
    for (r, row) in rounded.chunks_exact(rs.max(1)).take(rows).enumerate() {
        for (s, piece) in row.chunks_exact(32).enumerate() {
            out[(s * rows + r) * 32..][..32].copy_from_slice(piece);
        }
    }
    out
}

/// Runs the product on weights stored in the tile layout: `op.w` is the start of the
/// matrix (laid out as `layout`), and the output columns are `c0..c0 + op.cols`.
///
/// # Safety
/// As [`product`], with `op.w` the start of a whole matrix in `layout` and
/// `c0 + op.cols <= layout.n`.
pub(crate) unsafe fn product_tiles(op: Operands, c0: usize, layout: Layout) {
    debug_assert!(available() && c0 + op.cols <= layout.n);
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    x86::product_tiles(op, c0, layout.pairs());
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    let _ = (op, c0, layout);
}

/// Rows up to which [`vector_tiles`] takes a product on stored tiles rather than the tile
/// kernels: a tile product of a few rows is one `tdpbf16ps` per two 1 KiB weight tiles,
/// where the weight stream from memory is the whole cost.
pub(crate) const VECTOR_ROWS: usize = 4;

/// Runs the product of at most [`VECTOR_ROWS`] rows on weights stored in the tile layout
/// with AVX-512 BF16's `vdpbf16ps`, the matrix-vector kernel of decode: each 64-byte row
/// of a weight tile is sixteen columns' K pairs, the instruction's operand as stored, so
/// four tiles stream as four contiguous runs with no copy. `op` as [`product_tiles`]
/// takes it (activations in K steps).
///
/// # Safety
/// As [`product_tiles`], with `op.rows <= VECTOR_ROWS`.
pub(crate) unsafe fn vector_tiles(op: Operands, c0: usize, layout: Layout) {
    debug_assert!(available() && c0 + op.cols <= layout.n && op.rows <= VECTOR_ROWS);
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    x86::vector_tiles(op, c0, layout.pairs());
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    let _ = (op, c0, layout);
}

/// Runs `iters` rounds of four independent `tdpbf16ps` on tiles held in registers and
/// returns the FLOPs done (16384 per instruction) and a value that depends on them: the
/// denominator of a bf16 product's compute floor where the products run here. `None`
/// where [`available`] is false.
pub(crate) fn tile_probe(iters: usize) -> Option<(f64, f32)> {
    if !available() {
        return None;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    // SAFETY: the cpu has AMX-BF16 and the process holds the tile state (checked above).
    return Some(unsafe { x86::probe(iters) });
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        let _ = iters;
        None
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod x86 {
    use super::Operands;
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (EDX bit 24).
    pub(super) fn supported() -> bool {
        // SAFETY: CPUID leaf 7 exists on every x86-64 cpu with AVX-512, checked before.
        #[allow(unused_unsafe)]
        let l7 = unsafe { __cpuid_count(7, 0) };
        l7.edx & (1 << 22) != 0 && l7.edx & (1 << 24) != 0
    }

    /// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`):
    /// without it the first tile instruction faults. False where the kernel refuses (too
    /// old, or the hypervisor does not expose the state).
    pub(super) fn request_permission() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: this arch_prctl only extends the process's permitted xsave features.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    /// The tile configuration `ldtilecfg` reads (palette 1).
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Tiles 0-3: the accumulators of row tile `i`, column tile `j` at `2i + j`
    /// (`rows[i]` rows of 16 f32); 4 and 5: the activations of row tiles 0 and 1
    /// (`rows[i]` rows of 32 bf16); 6 and 7: the weights of column tiles 0 and 1 (16 pairs
    /// of rows, 16 columns). A row tile of no rows is left unconfigured.
    fn config(rows: [usize; 2]) -> Config {
        let mut c = Config { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        for (i, &r) in rows.iter().enumerate() {
            if r > 0 {
                for t in [2 * i, 2 * i + 1, 4 + i] {
                    c.colsb[t] = 64;
                    c.rows[t] = r as u8;
                }
            }
        }
        for t in [6, 7] {
            c.colsb[t] = 64;
            c.rows[t] = 16;
        }
        c
    }

    unsafe fn load_config(c: &Config) {
        asm!("ldtilecfg [{}]", in(reg) c as *const Config, options(nostack, readonly));
    }

    unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// Tile instructions on fixed tile registers (the register is part of the encoding).
    macro_rules! tile {
        (load $t:literal, $p:expr, $stride:expr) => {
            asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $stride,
                options(nostack, readonly))
        };
        (store $t:literal, $p:expr, $stride:expr) => {
            asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $p, s = in(reg) $stride,
                options(nostack))
        };
        (zero $t:literal) => {
            asm!(concat!("tilezero tmm", $t), options(nostack, nomem))
        };
        (dot $c:literal, $a:literal, $b:literal) => {
            asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b), options(nostack, nomem))
        };
    }

    /// Columns of a strip: every block of rows passes over a strip's packed weights (128
    /// columns of K = 2816 is 704 KiB) while they stay in L2.
    const STRIP: usize = 128;

    /// Rows per block: two row tiles of 16.
    const BLOCK_ROWS: usize = 32;

    /// Rows `r0..r0 + rows[0] + rows[1]` by the two 16-column weight tiles at `wt` (the
    /// second `pairs · 32` words on), over all of K. The first tile's column 0 is output
    /// column `rel` of `dst` (negative where the output starts inside it); only output
    /// columns `0..end` are written. `TWO`: the second row tile has rows.
    #[inline(always)]
    unsafe fn block<const TWO: bool>(
        op: &Operands,
        acts: Acts,
        (wt, pairs): (*const u16, usize),
        (r0, rows): (usize, [usize; 2]),
        (rel, end): (isize, isize),
        ahead: *const u16,
    ) {
        let Operands { dst, dst_rs, accumulate, .. } = *op;
        let d_stride = dst_rs * 4;
        let d = |i: usize, j: usize| dst.add((r0 + 16 * i) * dst_rs).offset(rel + 16 * j as isize);
        // Column tiles wholly inside the output go to and from dst directly; the others
        // write output columns lo..hi of the tile through the staging tile.
        let span = |j: usize| {
            let t0 = rel + 16 * j as isize;
            ((-t0).clamp(0, 16) as usize, (end - t0).clamp(0, 16) as usize)
        };
        let full = [span(0) == (0, 16), span(1) == (0, 16)];
        macro_rules! init {
            ($t:literal, $i:literal, $j:literal) => {
                if accumulate && full[$j] {
                    tile!(load $t, d($i, $j), d_stride)
                } else {
                    tile!(zero $t)
                }
            };
        }
        init!(0, 0, 0);
        init!(1, 0, 1);
        if TWO {
            init!(2, 1, 0);
            init!(3, 1, 1);
        }
        let rt = r0 / 16;
        let (b0, b1) = (wt, wt.add(pairs * 32));
        for s in 0..pairs / 16 {
            if !ahead.is_null() {
                // The next pair of weight tiles, a whole K loop ahead, into L2: the first
                // block of rows reads each tile from memory, and two streams of 1 KiB
                // loads alone leave most of the bandwidth unused.
                let (p0, p1) = (ahead.add(512 * s), ahead.add(pairs * 32 + 512 * s));
                for l in 0..16 {
                    _mm_prefetch::<_MM_HINT_T1>(p0.add(32 * l) as *const i8);
                    _mm_prefetch::<_MM_HINT_T1>(p1.add(32 * l) as *const i8);
                }
            }
            tile!(load 4, acts.at(rt, s), acts.stride);
            tile!(load 6, b0.add(512 * s), 64usize);
            tile!(load 7, b1.add(512 * s), 64usize);
            tile!(dot 0, 4, 6);
            tile!(dot 1, 4, 7);
            if TWO {
                tile!(load 5, acts.at(rt + 1, s), acts.stride);
                tile!(dot 2, 5, 6);
                tile!(dot 3, 5, 7);
            }
        }
        let mut stage = Stage([0f32; 256]);
        macro_rules! finish {
            ($t:literal, $i:literal, $j:literal) => {
                let (lo, hi) = span($j);
                if full[$j] {
                    tile!(store $t, d($i, $j), d_stride);
                } else if lo < hi {
                    tile!(store $t, stage.0.as_mut_ptr(), 64usize);
                    let m = (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16;
                    for r in 0..rows[$i] {
                        // Only the lanes lo..hi are touched: the others may lie before
                        // the output row or past its columns.
                        let p = d($i, $j).add(r * dst_rs);
                        let mut v = _mm512_loadu_ps(stage.0.as_ptr().add(16 * r));
                        if accumulate {
                            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, p));
                        }
                        _mm512_mask_storeu_ps(p, m, v);
                    }
                }
            };
        }
        finish!(0, 0, 0);
        finish!(1, 0, 1);
        if TWO {
            finish!(2, 1, 0);
            finish!(3, 1, 1);
        }
    }

    /// Every block of rows over the weight tiles `t0..t1` (step 2) at `wt(t)`, the first
    /// tile's column 0 at output column `rel0`, output columns `0..end`. The first block
    /// prefetches each next pair of tiles below `ahead` (0: none).
    #[inline(always)]
    unsafe fn blocks(
        op: &Operands,
        acts: Acts,
        wt: impl Fn(usize) -> *const u16,
        pairs: usize,
        (t0, t1, ahead): (usize, usize, usize),
        (rel0, end): (isize, isize),
        loaded: &mut Option<[usize; 2]>,
    ) {
        let mut r0 = 0;
        while r0 < op.rows {
            let rb = (op.rows - r0).min(BLOCK_ROWS);
            let rows = [rb.min(16), rb.saturating_sub(16)];
            if *loaded != Some(rows) {
                load_config(&config(rows));
                *loaded = Some(rows);
            }
            let mut t = t0;
            while t < t1 {
                let rel = rel0 + 16 * (t - t0) as isize;
                let next = if r0 == 0 && t + 2 < ahead { wt(t + 2) } else { std::ptr::null() };
                if rows[1] > 0 {
                    block::<true>(op, acts, (wt(t), pairs), (r0, rows), (rel, end), next);
                } else {
                    block::<false>(op, acts, (wt(t), pairs), (r0, rows), (rel, end), next);
                }
                t += 2;
            }
            r0 += rb;
        }
    }

    /// Where the activation tiles lie: row tile `i` (rows `16i..16i + 16`), K step `s`
    /// at `base + i·tile_words + s·step_words`, its rows `stride` bytes apart.
    #[derive(Clone, Copy)]
    struct Acts {
        base: *const u16,
        tile_words: usize,
        step_words: usize,
        stride: usize,
    }

    impl Acts {
        /// The op's rows in K steps ([`super::step_rows`]): `x` at the first row's step 0,
        /// `x_rs` the words between steps.
        fn steps(op: &Operands) -> Acts {
            Acts { base: op.x, tile_words: 512, step_words: op.x_rs, stride: 64 }
        }

        #[inline(always)]
        fn at(&self, tile: usize, s: usize) -> *const u16 {
            self.base.wrapping_add(tile * self.tile_words + s * self.step_words)
        }
    }

    /// One accumulator tile's staging space.
    #[repr(align(64))]
    struct Stage([f32; 256]);

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn product_tiles(op: Operands, c0: usize, pairs: usize) {
        if op.rows == 0 || op.cols == 0 {
            return;
        }
        let acts = Acts::steps(&op);
        // From an even tile, so that every pair of tiles lies inside the matrix (it has an
        // even number); STRIP columns at a time, which stay in L2 over the row blocks.
        let (first, last) = (c0 / 32 * 2, (c0 + op.cols).div_ceil(16));
        let wt = |t: usize| op.w.add(t * pairs * 32);
        let mut loaded = None;
        let mut t = first;
        while t < last {
            let te = (t + STRIP / 16).min(last);
            let rel = (16 * t) as isize - c0 as isize;
            blocks(&op, acts, wt, pairs, (t, te, last.next_multiple_of(2)), (rel, op.cols as isize), &mut loaded);
            t = te;
        }
        release();
    }

    /// Words of the weights between software prefetches and the reads they serve: each
    /// of the up to four tile streams runs 2 KiB ahead of its loads. The hardware
    /// prefetcher alone left decode 7–10% slower (E 8 and DeepSeek-V2-Lite shapes, T = 1,
    /// interleaved); 512 to 2048 words measured alike.
    const VEC_AHEAD: usize = 1024;

    #[inline(always)]
    unsafe fn bh(v: __m512i) -> __m512bh {
        std::mem::transmute(v)
    }

    /// `R` rows by the `C` weight tiles from tile `t` (matrix at `op.w`), over all of K:
    /// pair `p` of tile `t` is the 64 bytes at `(t·pairs + p)·32` words, sixteen columns'
    /// `w[2p][c], w[2p + 1][c]`, and the rows' inputs `2p, 2p + 1` are one 32-bit
    /// broadcast from the K-step layout. Output column `16t + i - c0` of `dst`.
    // The indices name the accumulator's row and tile, which every array shares.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn vector_run<const R: usize, const C: usize>(op: &Operands, c0: usize, pairs: usize, t: usize) {
        let Operands { dst, dst_rs, x, x_rs, cols, accumulate, .. } = *op;
        let wt: [*const u16; C] = std::array::from_fn(|j| op.w.add((t + j) * pairs * 32));
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for s in 0..pairs / 16 {
            let xs: [*const i32; R] = std::array::from_fn(|r| x.add(s * x_rs + r * 32) as *const i32);
            for q in 0..16 {
                let p = 16 * s + q;
                let w: [__m512bh; C] = std::array::from_fn(|j| {
                    // A prefetch past the matrix's end is a hint and never faults.
                    _mm_prefetch::<_MM_HINT_T0>(wt[j].wrapping_add(p * 32 + VEC_AHEAD) as *const i8);
                    bh(_mm512_loadu_si512(wt[j].add(p * 32) as *const _))
                });
                for r in 0..R {
                    let xv = bh(_mm512_set1_epi32(*xs[r].add(q)));
                    for j in 0..C {
                        acc[r][j] = _mm512_dpbf16_ps(acc[r][j], w[j], xv);
                    }
                }
            }
        }
        for j in 0..C {
            // Lanes i of tile t + j whose output column 16(t + j) + i - c0 is in 0..cols.
            let first = (16 * (t + j)) as isize - c0 as isize;
            let lo = (-first).clamp(0, 16) as u32;
            let hi = (cols as isize - first).clamp(0, 16) as u32;
            if lo >= hi {
                continue;
            }
            let m = (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16;
            for r in 0..R {
                // Masked lanes are not touched: they may lie outside the output row.
                let d = dst.add(r * dst_rs).wrapping_offset(first);
                let mut v = acc[r][j];
                if accumulate {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, d));
                }
                _mm512_mask_storeu_ps(d, m, v);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn vector_tiles(op: Operands, c0: usize, pairs: usize) {
        if op.rows == 0 || op.cols == 0 {
            return;
        }
        let (mut t, last) = (c0 / 16, (c0 + op.cols).div_ceil(16));
        while t < last {
            let c = (last - t).min(4);
            macro_rules! run {
                ($($r:literal),*) => {
                    match (op.rows, c) {
                        $(($r, 4) => vector_run::<$r, 4>(&op, c0, pairs, t),
                          ($r, 3) => vector_run::<$r, 3>(&op, c0, pairs, t),
                          ($r, 2) => vector_run::<$r, 2>(&op, c0, pairs, t),
                          ($r, _) => vector_run::<$r, 1>(&op, c0, pairs, t),)*
                        _ => unreachable!("at most VECTOR_ROWS rows"),
                    }
                };
            }
            run!(1, 2, 3, 4);
            t += c;
        }
    }

    pub(super) unsafe fn probe(iters: usize) -> (f64, f32) {
        // Pairs of 2^-10 in every tile: small increments that stay finite.
        let src = [0x3a80u16; 512];
        load_config(&config([16, 16]));
        tile!(zero 0);
        tile!(zero 1);
        tile!(zero 2);
        tile!(zero 3);
        tile!(load 4, src.as_ptr(), 64usize);
        tile!(load 5, src.as_ptr(), 64usize);
        tile!(load 6, src.as_ptr(), 64usize);
        tile!(load 7, src.as_ptr(), 64usize);
        for _ in 0..iters {
            tile!(dot 0, 4, 6);
            tile!(dot 1, 4, 7);
            tile!(dot 2, 5, 6);
            tile!(dot 3, 5, 7);
        }
        let mut stage = Stage([0f32; 256]);
        let mut sum = 0f32;
        tile!(store 0, stage.0.as_mut_ptr(), 64usize);
        sum += stage.0.iter().sum::<f32>();
        tile!(store 3, stage.0.as_mut_ptr(), 64usize);
        sum += stage.0.iter().sum::<f32>();
        release();
        ((iters * 4 * 16 * 16 * 32 * 2) as f64, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16dot::{pair_stride, round_rows};
    use half::bf16;

    fn bits(len: usize) -> Vec<u16> {
        (0..len).map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 500.0 - 1.0).to_bits()).collect()
    }

    /// The tile layout gives every weight back (odd K, columns past a tile and short of
    /// one, two matrices), and its widened rows are the K-major rows.
    #[test]
    fn the_tile_layout_round_trips() {
        for (n, k) in [(1, 1), (17, 3), (40, 33), (300, 64)] {
            let l = Layout { n, k };
            let km = bits(2 * n * k);
            let tiles = l.tiled(&km);
            assert_eq!(tiles.len(), 2 * l.matrix());
            assert_eq!(l.untiled(&tiles), km, "n {n} k {k}");
            let mut w = Vec::new();
            let k0 = usize::from(k > 1);
            l.widen_rows(&tiles, 1, (k0, k - k0), &mut w);
            assert_eq!(w.len(), (k - k0) * n);
            for (i, v) in w.iter().enumerate() {
                let (r, c) = (k0 + i / n, i % n);
                assert_eq!(*v, bf16::from_bits(km[n * k + r * n + c]).to_f32());
            }
        }
    }

    /// Products on stored tiles against f64 sums of the same bf16 products: output
    /// columns starting inside a tile, on a tile and on an odd one, ending short of a
    /// tile and at the matrix's last column, row counts of one tile, two and past a
    /// block, K odd and past a tile, with and without a bias; nothing outside moves. Up to
    /// [`VECTOR_ROWS`] rows, the vector kernel too.
    #[test]
    fn stored_tile_products_match_f64_sums() {
        if !available() {
            eprintln!("SKIP stored-tile products: this cpu or OS has no AMX-BF16 tiles (or MOE_CPU_SIMD caps them)");
            return;
        }
        let n = 300;
        for kk in [1, 7, 64, 129] {
            let l = Layout { n, k: kk };
            let km = bits(2 * n * kk);
            let tiles = l.tiled(&km);
            for rows in [1, 2, 3, 4, 16, 17, 32, 45] {
                let x: Vec<f32> = (0..rows * kk).map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5).collect();
                let xr = round_rows(&x, rows, kk);
                let xs = step_rows(&x, rows, kk);
                let kernels: &[bool] = if rows <= VECTOR_ROWS { &[false, true] } else { &[false] };
                for (c0, cols) in [(0, 300), (5, 11), (5, 40), (16, 16), (37, 200), (290, 10), (48, 129)] {
                    for (accumulate, &vector) in
                        [false, true].into_iter().flat_map(|a| kernels.iter().map(move |v| (a, v)))
                    {
                        let mut dst = vec![0.25f32; rows * n];
                        let op = Operands {
                            dst: dst[c0..].as_mut_ptr(),
                            dst_rs: n,
                            x: xs.as_ptr(),
                            x_rs: rows * 32,
                            w: tiles[l.matrix()..].as_ptr(),
                            w_rs: n,
                            rows,
                            cols,
                            kk,
                            accumulate,
                        };
                        // SAFETY: available() was checked; rows x (c0..c0 + cols) of dst,
                        // the rounded rows and matrix 1 of the tiles are in bounds; the
                        // vector kernel takes at most VECTOR_ROWS rows.
                        unsafe {
                            if vector {
                                vector_tiles(op, c0, l)
                            } else {
                                product_tiles(op, c0, l)
                            }
                        };
                        for r in 0..rows {
                            for c in 0..n {
                                let got = dst[r * n + c];
                                if !(c0..c0 + cols).contains(&c) {
                                    assert_eq!(got, 0.25, "outside the tile: row {r} col {c}");
                                    continue;
                                }
                                let mut want = if accumulate { 0.25f64 } else { 0.0 };
                                let mut mag = 0f64;
                                for k in 0..kk {
                                    let p = f64::from(bf16::from_bits(xr[r * pair_stride(kk) + k]).to_f32())
                                        * f64::from(bf16::from_bits(km[n * kk + k * n + c]).to_f32());
                                    want += p;
                                    mag += p.abs();
                                }
                                assert!(
                                    (f64::from(got) - want).abs() <= 1e-5 * (1.0 + mag),
                                    "kk {kk} rows {rows} c0 {c0} cols {cols} acc {accumulate} vector {vector} [{r}, {c}]: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
