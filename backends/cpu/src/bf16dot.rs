//! Products of bf16 activations by bf16 K-major weights with AVX-512 BF16's `vdpbf16ps`:
//! each instruction multiplies sixteen pairs of bf16 values and adds both products of a
//! pair to an f32 lane, twice the multiply-adds of an f32 FMA per instruction.
//!
//! `dst [R, C] (+)= x [R, K] · w [K, C]`, with `x` already rounded to bf16 (once per
//! product, by [`round_rows`]) and `w` the stored K-major weights. The instruction takes
//! pairs along K, which the stored layout keeps in two rows: each 128-column strip of the
//! weights is first interleaved by pairs of rows (`vpunpcklwd`/`vpunpckhwd`) into the
//! thread's scratch, where every block of rows then streams it contiguously from L2. The
//! interleave scatters each 32-column chunk's columns over two accumulators in a fixed
//! order, which one permute per accumulator puts back at the end.
//!
//! A call holds `R x 2C` accumulators in registers over all of K: twelve rows by one
//! chunk of 32 columns (24 accumulators, two weight loads and twelve broadcasts per 24
//! dot products), and for the last block of a group's rows, fewer rows by up to four
//! chunks. The bf16 products are exact in f32, so results differ from the f32-FMA kernels
//! on the same rounded inputs only in the order of the f32 sums.

use half::bf16;

/// Whether this cpu runs the kernels here: AVX-512 F, BW and BF16, and no
/// `MOE_CPU_SIMD` cap below AVX-512 ([`crate::matvec::Level`]).
pub(crate) fn available() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            crate::matvec::Level::detected() == crate::matvec::Level::Avx512
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Rows from which a product runs here. Up to [`crate::matvec::MATVEC_ROWS`] the
/// matrix-vector kernels take the same rounded activations in f32: they read each weight
/// row as one long run and need no copy of it, where these kernels pack each strip first,
/// which only pays over more rows (measured: Mixtral shape at T = 32, about 8 rows per
/// expert, 5.5-6 ms against 8 ms with these kernels from 8 rows and 9 ms from 4).
pub(crate) const MIN_ROWS: usize = crate::matvec::MATVEC_ROWS + 1;

/// Rows from which a product runs here, on whichever kernel this cpu has. The tile
/// kernels pack each strip as these do, and below 17 rows the matrix-vector kernels were
/// as fast or faster (measured: Mixtral shape, T = 1 and 32, AMX from 1, 4 and 17 rows).
pub(crate) fn min_rows() -> usize {
    MIN_ROWS
}

/// Elements per row of the rounded activations: K rounded up to a multiple of 32 (the pad
/// is zero), whole pairs for the kernels here and whole tile rows for [`crate::amx`].
pub(crate) fn pair_stride(kk: usize) -> usize {
    kk.next_multiple_of(32)
}

/// `rows` rows of `x` (`kk` each, contiguous) rounded to bf16 (to nearest, ties to even),
/// each padded with a zero to [`pair_stride`].
pub(crate) fn round_rows(x: &[f32], rows: usize, kk: usize) -> Vec<u16> {
    let rs = pair_stride(kk);
    let mut out = vec![0u16; rows * rs];
    for (src, dst) in x.chunks_exact(kk.max(1)).take(rows).zip(out.chunks_exact_mut(rs.max(1))) {
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: the cpu has AVX-512 BF16 (checked above); src and dst hold kk values.
            unsafe { x86::round_avx512(src, &mut dst[..kk]) };
            continue;
        }
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(s).to_bits();
        }
    }
    out
}

/// The operands of one call: `rows` rows of rounded activations at `x` (row stride
/// `x_rs`, an even number of elements, K padded with zero) times the `[kk, cols]` block
/// of bf16 weights at `w` (row stride `w_rs`), into `dst` (row stride `dst_rs`).
#[derive(Clone, Copy)]
pub(crate) struct Operands {
    pub(crate) dst: *mut f32,
    pub(crate) dst_rs: usize,
    pub(crate) x: *const u16,
    pub(crate) x_rs: usize,
    pub(crate) w: *const u16,
    pub(crate) w_rs: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) kk: usize,
    /// Add to `dst` (a bias already there) rather than overwrite it.
    pub(crate) accumulate: bool,
}

/// Runs the product; `scratch` is the calling thread's buffer (a strip of packed weights
/// for groups of more than a few rows).
///
/// # Safety
/// [`available`] must be true; every element the operands address must be inside its
/// allocation (`x` rows hold `x_rs >= pair_stride(kk)` elements); `dst` must not overlap
/// the inputs or another thread's rows and columns.
pub(crate) unsafe fn product(op: Operands, scratch: &mut Vec<f32>) {
    debug_assert!(available());
    #[cfg(target_arch = "x86_64")]
    x86::product(op, scratch);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (op, scratch);
}

/// Runs `iters` rounds of [`crate::matvec::PROBE_CHAINS`] independent `vdpbf16ps` from registers and
/// returns the FLOPs done (4 per lane per instruction: two multiplies, two adds) and a
/// value that depends on every one of them: the denominator of a bf16 product's compute
/// floor. `None` where the cpu lacks the instruction.
pub(crate) fn dot_probe(iters: usize) -> Option<(f64, f32)> {
    if !available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the cpu has AVX-512 BF16 (checked above).
    return Some(unsafe { x86::probe(iters) });
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = iters;
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Operands;
    use crate::matvec::PROBE_CHAINS;
    use std::arch::x86_64::*;

    /// Rows per call at most: 12 rows x 2 accumulators leave registers for the weights.
    const MAX_ROWS: usize = 12;

    #[inline(always)]
    unsafe fn bh(v: __m512i) -> __m512bh {
        std::mem::transmute(v)
    }

    /// Lanes of the column permutes: the interleave leaves column `8L + i` of a chunk in
    /// lane `4L + i` of the low accumulator (i < 4) or of the high one (i >= 4); output
    /// lane `c` takes it back (index 16 and up: the second operand, the high one).
    const fn unscramble(half: usize) -> [i32; 16] {
        let mut idx = [0i32; 16];
        let mut p = 0;
        while p < 16 {
            let c = half * 16 + p;
            let (l, i) = (c / 8, c % 8);
            idx[p] = if i < 4 { (4 * l + i) as i32 } else { (16 + 4 * l + i - 4) as i32 };
            p += 1;
        }
        idx
    }
    const UNSCRAMBLE: [[i32; 16]; 2] = [unscramble(0), unscramble(1)];

    /// Load mask of the chunk of 32 columns starting `left` columns before the tile's end.
    #[inline(always)]
    fn mask32(left: isize) -> u32 {
        if left >= 32 {
            u32::MAX
        } else if left <= 0 {
            0
        } else {
            (1u32 << left) - 1
        }
    }

    /// The stored rows `2p` and `2p + 1` of the 32 columns at `w` (row stride `w_rs`,
    /// `mask` bounding the columns read) interleaved by pairs: the two registers of a
    /// chunk, its columns in the interleave's order. An odd K's last input row pairs with
    /// a zero row (and with the zero pad of x).
    #[inline(always)]
    unsafe fn interleave(w: *const u16, w_rs: usize, (p, kk): (usize, usize), mask: u32) -> [__m512i; 2] {
        let w0 = w.add(2 * p * w_rs);
        let a = _mm512_maskz_loadu_epi16(mask, w0 as *const i16);
        let b = if 2 * p + 1 < kk {
            _mm512_maskz_loadu_epi16(mask, w0.add(w_rs) as *const i16)
        } else {
            _mm512_setzero_si512()
        };
        [_mm512_unpacklo_epi16(a, b), _mm512_unpackhi_epi16(a, b)]
    }

    /// `R` rows from row `r0` by `C` chunks of 32 columns, output columns from `c`, over
    /// all of K, the weights read from the packed strip at `pk` (chunk `j`, pair `p` at
    /// `(j·pairs + p)·64`, as [`pack`] lays it out); `masks` bound the columns stored.
    #[inline(always)]
    // The indices name the register tile's row and chunk, which every array shares.
    #[allow(clippy::needless_range_loop)]
    unsafe fn strip<const R: usize, const C: usize>(
        op: &Operands,
        (pk, pairs): (*const u16, usize),
        r0: usize,
        c: usize,
        masks: [u32; C],
    ) {
        let Operands { dst, dst_rs, x, x_rs, kk, accumulate, .. } = *op;
        let xr: [*const i32; R] = std::array::from_fn(|r| x.add((r0 + r) * x_rs) as *const i32);
        let mut acc: [[[__m512; 2]; C]; R] = [[[_mm512_setzero_ps(); 2]; C]; R];
        for p in 0..kk.div_ceil(2) {
            for j in 0..C {
                let q = pk.add((j * pairs + p) * 64);
                let (lo, hi) = (bh(_mm512_loadu_si512(q as *const _)), bh(_mm512_loadu_si512(q.add(32) as *const _)));
                for r in 0..R {
                    let xv = bh(_mm512_set1_epi32(*xr[r].add(p)));
                    acc[r][j][0] = _mm512_dpbf16_ps(acc[r][j][0], lo, xv);
                    acc[r][j][1] = _mm512_dpbf16_ps(acc[r][j][1], hi, xv);
                }
            }
        }
        let idx = [
            _mm512_loadu_si512(UNSCRAMBLE[0].as_ptr() as *const _),
            _mm512_loadu_si512(UNSCRAMBLE[1].as_ptr() as *const _),
        ];
        for (r, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate() {
                for (h, idx) in idx.iter().enumerate() {
                    let m = (masks[j] >> (16 * h)) as u16;
                    if m == 0 {
                        continue;
                    }
                    let d = dst.add((r0 + r) * dst_rs + c + 32 * j + 16 * h);
                    let mut v = _mm512_permutex2var_ps(a[0], *idx, a[1]);
                    if accumulate {
                        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, d));
                    }
                    _mm512_mask_storeu_ps(d, m, v);
                }
            }
        }
    }

    /// Columns of a strip: every block of rows passes over a strip's weights (128 columns
    /// of K = 2816 is 704 KiB) while they stay in L2.
    const STRIP: usize = 128;

    /// Stored columns `c..c + STRIP` (past `cols`: zero) of every input row of the op's
    /// weights, interleaved by pairs into `pk`: chunk `j`, pair `p` at `(j·pairs + p)·64`,
    /// its 64 words the two registers of [`interleave`].
    #[inline(always)]
    unsafe fn pack(op: &Operands, c: usize, pk: *mut u16) {
        let Operands { w, w_rs, cols, kk, .. } = *op;
        let pairs = kk.div_ceil(2);
        const CHUNKS: usize = STRIP / 32;
        let masks: [u32; CHUNKS] = std::array::from_fn(|j| mask32(cols as isize - (c + 32 * j) as isize));
        for p in 0..pairs {
            for (j, &mask) in masks.iter().enumerate() {
                let [lo, hi] = interleave(w.add(c + 32 * j), w_rs, (p, kk), mask);
                let q = pk.add((j * pairs + p) * 64);
                _mm512_storeu_si512(q as *mut _, lo);
                _mm512_storeu_si512(q.add(32) as *mut _, hi);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn product(op: Operands, scratch: &mut Vec<f32>) {
        if op.rows == 0 || op.cols == 0 {
            return;
        }
        // Each strip is packed first: the copy reads the weights once, as the products
        // would, and lets every block of rows stream them contiguously, rather than
        // 64-byte pieces of every stored row, each in another page and out of the
        // prefetchers' reach (measured: the Mixtral shape at T = 512 took 85 ms reading
        // the stored rows, 50 ms packed). The f32 scratch holds the packed words.
        let pairs = op.kk.div_ceil(2);
        scratch.resize(STRIP * pairs, 0.0);
        let mut c = 0;
        while c < op.cols {
            let end = (c + STRIP).min(op.cols);
            pack(&op, c, scratch.as_mut_ptr() as *mut u16);
            let pk = scratch.as_ptr() as *const u16;
            let mut r0 = 0;
            while r0 < op.rows {
                let rb = (op.rows - r0).min(MAX_ROWS);
                macro_rules! call {
                    ($r:literal, $c:literal) => {{
                        let mut cc = c;
                        while cc < end {
                            let masks: [u32; $c] =
                                std::array::from_fn(|j| mask32(end as isize - (cc + 32 * j) as isize));
                            let chunk = pk.add((cc - c) / 32 * pairs * 64);
                            strip::<$r, $c>(&op, (chunk, pairs), r0, cc, masks);
                            cc += 32 * $c;
                        }
                    }};
                }
                // 32 columns per chunk; every width divides the strip.
                match rb {
                    1 => call!(1, 4),
                    2 => call!(2, 4),
                    3 => call!(3, 4),
                    4 => call!(4, 2),
                    5 => call!(5, 2),
                    6 => call!(6, 2),
                    7 => call!(7, 1),
                    8 => call!(8, 1),
                    9 => call!(9, 1),
                    10 => call!(10, 1),
                    11 => call!(11, 1),
                    _ => call!(12, 1),
                }
                r0 += rb;
            }
            c += STRIP;
        }
    }

    /// Rounds `src` to bf16 bits in `dst` (same length), sixteen at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn round_avx512(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 16 <= n {
            let h: __m256bh = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i)));
            _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(h));
            i += 16;
        }
        if i < n {
            let m = ((1u32 << (n - i)) - 1) as u16;
            let h: __m256bh = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src.as_ptr().add(i)));
            _mm256_mask_storeu_epi16(
                dst.as_mut_ptr().add(i) as *mut i16,
                m,
                std::mem::transmute::<__m256bh, __m256i>(h),
            );
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn probe(iters: usize) -> (f64, f32) {
        let mut acc: [__m512; PROBE_CHAINS] = std::array::from_fn(|i| _mm512_set1_ps(i as f32 * 1e-3));
        // bf16 pairs (1.0, 2^-10) and (2^-10, 2^-10): small increments that stay finite.
        let a = bh(_mm512_set1_epi32(0x3f80_3a80u32 as i32));
        let b = bh(_mm512_set1_epi32(0x3a80_3a80u32 as i32));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        let sum = acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum::<f32>();
        ((iters * PROBE_CHAINS * 16 * 4) as f64, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels this cpu runs: `vdpbf16ps`, and AMX tiles where it has them.
    #[allow(clippy::type_complexity)]
    fn kernels() -> Vec<(&'static str, unsafe fn(Operands, &mut Vec<f32>))> {
        #[cfg(target_arch = "x86_64")]
        return vec![("vdpbf16ps", x86::product)];
        #[cfg(not(target_arch = "x86_64"))]
        Vec::new()
    }

    /// Each kernel against an f64 sum of the same bf16 products, for every row count it
    /// dispatches on and past one block (the tile kernel's 16-row tiles and 32-row blocks
    /// among them), column tails inside a chunk and past a strip, K odd and past a tile,
    /// with and without a bias already in the tile; nothing outside the tile moves.
    #[test]
    fn matches_f64_sums_of_the_rounded_values() {
        if !available() {
            eprintln!("SKIP bf16dot kernel test: this cpu lacks AVX-512 BF16 (or MOE_CPU_SIMD caps it)");
            return;
        }
        let (n, c0) = (300, 5);
        for (name, kernel) in kernels() {
            for kk in [1, 2, 7, 64, 129] {
                let w: Vec<u16> =
                    (0..kk * n).map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 500.0 - 1.0).to_bits()).collect();
                for rows in (1..=17).chain([25, 32, 33, 40, 49]) {
                    let x: Vec<f32> = (0..rows * kk).map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5).collect();
                    let xr = round_rows(&x, rows, kk);
                    for cols in [1, 16, 31, 33, 64, 100, 257, 295] {
                        for accumulate in [false, true] {
                            let mut dst = vec![0.25f32; rows * n];
                            let op = Operands {
                                dst: dst[c0..].as_mut_ptr(),
                                dst_rs: n,
                                x: xr.as_ptr(),
                                x_rs: pair_stride(kk),
                                w: w[c0..].as_ptr(),
                                w_rs: n,
                                rows,
                                cols,
                                kk,
                                accumulate,
                            };
                            // SAFETY: the kernel's cpu features were checked; rows x
                            // (c0..c0 + cols) of dst, the rounded rows and kk x
                            // (c0..c0 + cols) of w are in bounds.
                            unsafe { kernel(op, &mut Vec::new()) };
                            for r in 0..rows {
                                for c in 0..n {
                                    let got = dst[r * n + c];
                                    if !(c0..c0 + cols).contains(&c) {
                                        assert_eq!(got, 0.25, "{name}: outside the tile: row {r} col {c}");
                                        continue;
                                    }
                                    let mut want = if accumulate { 0.25f64 } else { 0.0 };
                                    let mut mag = 0f64;
                                    for k in 0..kk {
                                        let p = f64::from(bf16::from_bits(xr[r * pair_stride(kk) + k]).to_f32())
                                            * f64::from(bf16::from_bits(w[k * n + c]).to_f32());
                                        want += p;
                                        mag += p.abs();
                                    }
                                    assert!(
                                        (f64::from(got) - want).abs() <= 1e-5 * (1.0 + mag),
                                        "{name} kk {kk} rows {rows} cols {cols} acc {accumulate} [{r}, {c}]: {got} vs {want}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The rounding is half's (to nearest, ties to even) on every element, the tail of a
    /// row past sixteen included, and the pad is zero.
    #[test]
    fn rounding_is_to_nearest_even() {
        let kk = 37;
        let x: Vec<f32> = (0..2 * kk).map(|i| (i as f32 * 0.377).sin() * 3.0 + 1.0 / 3.0).collect();
        let r = round_rows(&x, 2, kk);
        assert_eq!(r.len(), 2 * pair_stride(kk));
        for row in 0..2 {
            for k in 0..kk {
                assert_eq!(r[row * pair_stride(kk) + k], bf16::from_f32(x[row * kk + k]).to_bits(), "[{row}, {k}]");
            }
            assert_eq!(r[row * pair_stride(kk) + kk], 0);
        }
    }
}
