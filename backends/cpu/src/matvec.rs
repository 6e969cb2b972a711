//! Products of a few rows by K-major weights: the decode-sized expert groups, where the
//! product is matrix-vector work bound by how fast the weights stream from memory.
//!
//! `dst [R, C] (+)= x [R, K] · w [K, C]` with `w` K-major (row `k` holds the C outputs'
//! weights for input `k`, unit stride), stored as f32, bf16 or f16 and widened to f32 as
//! it is read; every sum is an f32 fused multiply-add. The weights are read in blocks of
//! [`K_BLOCK`] rows, each row a long contiguous run across the tile, so that the hardware
//! prefetchers see a few sequential streams (a gemm micro-kernel on one row instead walks
//! K rows with a stride of N, 256 bytes from each). The R accumulators of a column chunk
//! stay in registers for the block; the output row segment they come from and go back to
//! stays in L1/L2.
//!
//! One kernel body, instantiated per instruction set found at run time ([`Level`]):
//! AVX-512F (16 lanes; bf16 widened with a zero-extend and shift, f16 with `vcvtph2ps`),
//! AVX2 + FMA + F16C (8 lanes), and a portable body the compiler vectorises for the
//! target's baseline (NEON on aarch64, SSE2 on x86-64), with `half` doing f16 conversion.
//!
//! With bf16 weights the activations arrive rounded to bf16 (`weights::Inputs`), as the
//! pair-dot kernels above [`MATVEC_ROWS`] rows take them ([`crate::bf16dot`]); here they
//! are f32 values like any other, so every group size multiplies the same numbers.

use half::{bf16, f16};

/// Rows up to which a group's product runs here rather than through gemm. Each weight
/// vector loaded feeds R fused multiply-adds from registers; at 16 rows that is about the
/// FMA rate the cores have for the weights memory can deliver, so up to here the kernel
/// is bound by the weight stream or close to the FMA peak, and gemm's packing and
/// micro-kernel tiling only pay above it.
pub(crate) const MATVEC_ROWS: usize = 16;

/// Weight rows read per pass over the tile's columns: the number of sequential streams.
const K_BLOCK: usize = 8;

/// The instruction set the kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    /// Plain Rust, vectorised by the compiler for the build target's baseline.
    Portable,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// x86-64 AVX-512F.
    Avx512,
}

impl Level {
    /// The best level this cpu runs, found once. `MOE_CPU_SIMD=portable|avx2` caps it
    /// (to compare the paths on one machine).
    pub(crate) fn detected() -> Level {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            let best = Self::available().into_iter().max().unwrap_or(Level::Portable);
            match std::env::var("MOE_CPU_SIMD").as_deref() {
                Ok("portable") => Level::Portable,
                Ok("avx2") => best.min(Level::Avx2),
                _ => best,
            }
        })
    }

    /// Every level this cpu can run.
    pub(crate) fn available() -> Vec<Level> {
        let mut v = vec![Level::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                v.push(Level::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                v.push(Level::Avx512);
            }
        }
        v
    }

    /// Its name, for benchmark reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2+fma+f16c",
            Level::Avx512 => "avx512f",
        }
    }
}

/// A weight element the kernels widen to f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// The value as f32 (exact).
    fn widen(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// The operands of one call: `rows` rows of `x` (row stride `x_rs`) times the `[kk, cols]`
/// block of weights at `w` (row stride `w_rs`), into `dst` (row stride `dst_rs`).
#[derive(Clone, Copy)]
pub(crate) struct Operands<E> {
    pub(crate) dst: *mut f32,
    pub(crate) dst_rs: usize,
    pub(crate) x: *const f32,
    pub(crate) x_rs: usize,
    pub(crate) w: *const E,
    pub(crate) w_rs: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) kk: usize,
    /// Add to `dst` (a bias already there) rather than overwrite it.
    pub(crate) accumulate: bool,
}

/// Runs the product at the detected level.
///
/// # Safety
/// Every element the operands address must be inside its allocation; `dst` must not
/// overlap the inputs or another thread's rows and columns; `1 <= rows <= MATVEC_ROWS`.
pub(crate) unsafe fn matvec<E: Elem + Widen>(op: Operands<E>) {
    matvec_at(Level::detected(), op)
}

/// Runs the product at `level`, which this cpu must have ([`Level::available`]).
///
/// # Safety
/// As [`matvec`], and `level` must be available.
pub(crate) unsafe fn matvec_at<E: Elem + Widen>(level: Level, op: Operands<E>) {
    if op.cols == 0 || op.rows == 0 {
        return;
    }
    if !op.accumulate {
        for r in 0..op.rows {
            std::ptr::write_bytes(op.dst.add(r * op.dst_rs), 0, op.cols);
        }
    }
    if op.kk == 0 {
        return;
    }
    macro_rules! by_rows {
        ($f:ident) => {
            match op.rows {
                1 => $f::<E, 1>(op),
                2 => $f::<E, 2>(op),
                3 => $f::<E, 3>(op),
                4 => $f::<E, 4>(op),
                5 => $f::<E, 5>(op),
                6 => $f::<E, 6>(op),
                7 => $f::<E, 7>(op),
                8 => $f::<E, 8>(op),
                9 => $f::<E, 9>(op),
                10 => $f::<E, 10>(op),
                11 => $f::<E, 11>(op),
                12 => $f::<E, 12>(op),
                13 => $f::<E, 13>(op),
                14 => $f::<E, 14>(op),
                15 => $f::<E, 15>(op),
                _ => $f::<E, 16>(op),
            }
        };
    }
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => by_rows!(run_avx512),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => by_rows!(run_avx2),
        _ => by_rows!(run_portable),
    }
}

/// f32 lanes of one vector register, and the ops the kernel body uses on them.
trait Lanes {
    type V: Copy;
    const W: usize;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn splat(x: f32) -> Self::V;
    /// `a · b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// The scalar `a · b + c` of the tail columns.
    unsafe fn fma1(a: f32, b: f32, c: f32) -> f32;
}

/// Loading `L::W` weights widened to f32 lanes.
pub(crate) trait Widen: Sized {
    #[doc(hidden)]
    unsafe fn lanes_portable(p: *const Self) -> [f32; PORTABLE_W];
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn lanes_avx2(p: *const Self) -> std::arch::x86_64::__m256;
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn lanes_avx512(p: *const Self) -> std::arch::x86_64::__m512;
}

/// The kernel body, generic over the register type `L` and the weight element `E`, for
/// `R` rows. Inlined into each level's entry point, which compiles it with that level's
/// instructions.
#[inline(always)]
unsafe fn body<L: Lanes, E: Elem, const R: usize>(op: Operands<E>, widen: impl Fn(*const E) -> L::V) {
    let Operands { dst, dst_rs, x, x_rs, w, w_rs, cols, kk, .. } = op;
    let vec_cols = cols / L::W * L::W;
    let mut k0 = 0;
    while k0 < kk {
        let kb = (kk - k0).min(K_BLOCK);
        let mut c = 0;
        // With one or two rows each weight vector feeds one or two FMA chains, so a step
        // takes four column vectors: four loads in flight per weight row instead of one
        // (measured, f32 decode of the Mixtral shape: 2.42 -> 2.19 ms, the median of
        // eight interleaved runs; bf16 unchanged).
        if R <= 2 {
            while c + 4 * L::W <= vec_cols {
                step::<L, E, R, 4>(&op, &widen, k0, kb, c);
                c += 4 * L::W;
            }
        }
        while c < vec_cols {
            step::<L, E, R, 1>(&op, &widen, k0, kb, c);
            c += L::W;
        }
        for c in vec_cols..cols {
            for r in 0..R {
                let d = dst.add(r * dst_rs + c);
                let mut s = *d;
                for j in 0..kb {
                    s = L::fma1(*x.add(r * x_rs + k0 + j), (*w.add((k0 + j) * w_rs + c)).widen(), s);
                }
                *d = s;
            }
        }
        k0 += kb;
    }
}

/// `U` column vectors from column `c` of the `R` rows over weight rows `k0..k0 + kb`:
/// the accumulators come from `dst` and go back to it.
#[inline(always)]
unsafe fn step<L: Lanes, E: Elem, const R: usize, const U: usize>(
    op: &Operands<E>,
    widen: &impl Fn(*const E) -> L::V,
    k0: usize,
    kb: usize,
    c: usize,
) {
    let Operands { dst, dst_rs, x, x_rs, w, w_rs, .. } = *op;
    let mut acc: [[L::V; U]; R] =
        std::array::from_fn(|r| std::array::from_fn(|u| L::load(dst.add(r * dst_rs + c + u * L::W))));
    let row = |j: usize, acc: &mut [[L::V; U]; R]| {
        let wv: [L::V; U] = std::array::from_fn(|u| widen(w.add((k0 + j) * w_rs + c + u * L::W)));
        for (r, a) in acc.iter_mut().enumerate() {
            let xs = L::splat(*x.add(r * x_rs + k0 + j));
            for (a, wv) in a.iter_mut().zip(&wv) {
                *a = L::fma(xs, *wv, *a);
            }
        }
    };
    if kb == K_BLOCK {
        for j in 0..K_BLOCK {
            row(j, &mut acc);
        }
    } else {
        for j in 0..kb {
            row(j, &mut acc);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (u, a) in a.iter().enumerate() {
            L::store(dst.add(r * dst_rs + c + u * L::W), *a);
        }
    }
}

/// Independent accumulators of the FMA probe: enough to cover the FMA latency times the
/// units on current cores (4 cycles x 2 units = 8 in flight).
pub(crate) const PROBE_CHAINS: usize = 12;

/// Runs `iters` rounds of [`PROBE_CHAINS`] independent vector FMAs at `level` and returns
/// the FLOPs done (2 per lane per FMA) and a value that depends on every one of them.
/// The denominator of a compute floor: the FMA rate the kernels' instructions reach.
pub(crate) fn fma_probe(level: Level, iters: usize) -> (f64, f32) {
    #[inline(always)]
    unsafe fn probe<L: Lanes>(iters: usize) -> (f64, f32) {
        let mut acc: [L::V; PROBE_CHAINS] = std::array::from_fn(|i| L::splat(i as f32 * 1e-3));
        let (a, b) = (L::splat(0.999_999), L::splat(1e-7));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = L::fma(*v, a, b);
            }
        }
        let mut out = [0f32; 16];
        let mut sum = 0f32;
        for v in acc {
            L::store(out.as_mut_ptr(), v);
            sum += out[..L::W].iter().sum::<f32>();
        }
        ((iters * PROBE_CHAINS * L::W * 2) as f64, sum)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn avx512(iters: usize) -> (f64, f32) {
        probe::<x86::Avx512>(iters)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2(iters: usize) -> (f64, f32) {
        probe::<x86::Avx2>(iters)
    }
    // SAFETY: each entry runs only at a level this cpu has (Level::available).
    unsafe {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => avx512(iters),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => avx2(iters),
            _ => probe::<Portable>(iters),
        }
    }
}

/// Lanes of the portable body: eight f32s the compiler vectorises.
pub(crate) const PORTABLE_W: usize = 8;

struct Portable;

impl Lanes for Portable {
    type V = [f32; PORTABLE_W];
    const W: usize = PORTABLE_W;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::ptr::read_unaligned(p as *const Self::V)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::ptr::write_unaligned(p as *mut Self::V, v)
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; PORTABLE_W]
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        // Multiply then add: `mul_add` without a hardware FMA in the baseline is a call.
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn fma1(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

unsafe fn run_portable<E: Elem + Widen, const R: usize>(op: Operands<E>) {
    body::<Portable, E, R>(op, |p| E::lanes_portable(p))
}

impl Widen for f32 {
    #[inline(always)]
    unsafe fn lanes_portable(p: *const Self) -> [f32; PORTABLE_W] {
        std::ptr::read_unaligned(p as *const [f32; PORTABLE_W])
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes_avx2(p: *const Self) -> std::arch::x86_64::__m256 {
        <x86::Avx2 as Lanes>::load(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes_avx512(p: *const Self) -> std::arch::x86_64::__m512 {
        <x86::Avx512 as Lanes>::load(p)
    }
}

impl Widen for bf16 {
    #[inline(always)]
    unsafe fn lanes_portable(p: *const Self) -> [f32; PORTABLE_W] {
        let h = std::ptr::read_unaligned(p as *const [bf16; PORTABLE_W]);
        std::array::from_fn(|i| h[i].widen())
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes_avx2(p: *const Self) -> std::arch::x86_64::__m256 {
        x86::load_bf16_avx2(p as *const u16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes_avx512(p: *const Self) -> std::arch::x86_64::__m512 {
        x86::load_bf16_avx512(p as *const u16)
    }
}

impl Widen for f16 {
    #[inline(always)]
    unsafe fn lanes_portable(p: *const Self) -> [f32; PORTABLE_W] {
        let h = std::ptr::read_unaligned(p as *const [f16; PORTABLE_W]);
        std::array::from_fn(|i| h[i].to_f32())
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes_avx2(p: *const Self) -> std::arch::x86_64::__m256 {
        x86::load_f16_avx2(p as *const u16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes_avx512(p: *const Self) -> std::arch::x86_64::__m512 {
        x86::load_f16_avx512(p as *const u16)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<E: Elem + Widen, const R: usize>(op: Operands<E>) {
    body::<x86::Avx2, E, R>(op, |p| E::lanes_avx2(p))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn run_avx512<E: Elem + Widen, const R: usize>(op: Operands<E>) {
    body::<x86::Avx512, E, R>(op, |p| E::lanes_avx512(p))
}

/// The x86-64 register types and loads.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Lanes;
    use std::arch::x86_64::*;

    pub(crate) struct Avx2;
    pub(crate) struct Avx512;

    impl Lanes for Avx2 {
        type V = __m256;
        const W: usize = 8;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fma1(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
    }

    impl Lanes for Avx512 {
        type V = __m512;
        const W: usize = 16;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fma1(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
    }

    /// bf16 is the top half of an f32: zero-extend to 32 bits and shift up.
    #[inline(always)]
    pub(super) unsafe fn load_bf16_avx2(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
    #[inline(always)]
    pub(super) unsafe fn load_bf16_avx512(p: *const u16) -> __m512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
    #[inline(always)]
    pub(super) unsafe fn load_f16_avx2(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    pub(super) unsafe fn load_f16_avx512(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn vals(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Runs every row count, accumulate flag and a ragged shape at `level` for weights
    /// `w` (K-major, row stride `cols + 3` so rows are not contiguous) against an f64 sum
    /// of the same widened values.
    fn check<E: Elem + Widen>(level: Level, w: &[E], (kk, cols): (usize, usize)) {
        let w_rs = cols + 3;
        for rows in 1..=MATVEC_ROWS {
            for accumulate in [false, true] {
                let x = vals(rows * (kk + 1), rows as u32);
                let dst_rs = cols + 5;
                let init = vals(rows * dst_rs, 99);
                let mut dst = init.clone();
                let op = Operands {
                    dst: dst.as_mut_ptr(),
                    dst_rs,
                    x: x.as_ptr(),
                    x_rs: kk + 1,
                    w: w.as_ptr(),
                    w_rs,
                    rows,
                    cols,
                    kk,
                    accumulate,
                };
                // SAFETY: every row, column and stride above is inside its vector.
                unsafe { matvec_at(level, op) };
                for r in 0..rows {
                    for c in 0..dst_rs {
                        let got = dst[r * dst_rs + c];
                        if c >= cols {
                            assert_eq!(got, init[r * dst_rs + c], "{level:?}: column {c} past the tile was written");
                            continue;
                        }
                        let mut want = if accumulate { init[r * dst_rs + c] as f64 } else { 0.0 };
                        let mut scale = want.abs();
                        for k in 0..kk {
                            let p = x[r * (kk + 1) + k] as f64 * w[k * w_rs + c].widen() as f64;
                            want += p;
                            scale += p.abs();
                        }
                        let err = (got as f64 - want).abs();
                        assert!(
                            err <= 1e-6 * scale.max(1.0),
                            "{level:?} rows {rows} acc {accumulate} [{r}, {c}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_level_and_weight_type_matches_an_f64_sum() {
        let levels = Level::available();
        assert!(levels.contains(&Level::Portable));
        // Shapes with and without a tail of columns and of weight rows past a full block.
        for (kk, cols) in [(19, 37), (16, 64), (1, 5), (8, 16)] {
            let w = vals(kk * (cols + 3), 7);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            for &level in &levels {
                check(level, &w, (kk, cols));
                check(level, &wb, (kk, cols));
                check(level, &wh, (kk, cols));
            }
        }
    }

    #[test]
    fn without_weight_rows_the_bias_stays_or_the_row_is_zeroed() {
        // K = 0 leaves a bias; zero columns write nothing.
        let mut dst = vec![1.5f32; 4];
        let w = [0f32; 0];
        for level in Level::available() {
            let op = Operands {
                dst: dst.as_mut_ptr(),
                dst_rs: 4,
                x: [0f32; 1].as_ptr(),
                x_rs: 0,
                w: w.as_ptr(),
                w_rs: 4,
                rows: 1,
                cols: 4,
                kk: 0,
                accumulate: true,
            };
            // SAFETY: no weight is read (K = 0); the one destination row is inside `dst`.
            unsafe { matvec_at(level, op) };
            assert_eq!(dst, vec![1.5; 4]);
            // SAFETY: as above; without accumulate the row is zeroed and nothing is read.
            unsafe { matvec_at(level, Operands { accumulate: false, ..op }) };
            assert_eq!(dst, vec![0.0; 4]);
            dst = vec![1.5; 4];
        }
    }
}
