//! Why the cpu backend tiles expert products (see `COL_BLOCK` in `src/matmul.rs`):
//! single-threaded GFLOP/s of `x [m, k] · wᵀ` with `w` stored K-major `[k, n]`, as one
//! product over all `n` columns and as 256-column tiles, for expert-sized row counts.
//!
//! `cargo run --release -p moe-cpu --example gemm_shapes`
use std::time::Instant;

/// `dst [m, cols] = x [m, k] · w[:, c0..c0 + cols]` on one thread (`w` is `[k, n]`).
fn product(dst: &mut [f32], x: &[f32], w: &[f32], (m, n, k): (usize, usize, usize), c0: usize, cols: usize) {
    // SAFETY: dst is [m, n] row-major, x [m, k], w [k, n]; the block stays inside them.
    unsafe {
        gemm::gemm(
            m,
            cols,
            k,
            dst.as_mut_ptr().add(c0),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr().add(c0),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

fn best_of<F: FnMut()>(mut f: F) -> f64 {
    f();
    (0..7)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    println!("| m | n | k | one product GFLOP/s | 256-column tiles GFLOP/s |");
    println!("|---|---|---|---|---|");
    for &(m, n, k) in
        &[(16usize, 5632usize, 1024usize), (48, 1024, 1024), (48, 1024, 512), (128, 5632, 1024), (128, 1024, 2816)]
    {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut out = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let whole = best_of(|| product(&mut out, &x, &w, (m, n, k), 0, n));
        let tiled = best_of(|| {
            for c0 in (0..n).step_by(256) {
                product(&mut out, &x, &w, (m, n, k), c0, 256.min(n - c0));
            }
        });
        println!("| {m} | {n} | {k} | {:.1} | {:.1} |", flops / whole / 1e9, flops / tiled / 1e9);
    }
}
