//! `moe bench machine`: the denominators of the floors `bench/compare_cpu.py` puts beside
//! each row. The read bandwidth: a buffer far larger than the last-level cache is read
//! once per pass by every thread, each its own contiguous share, as the expert products
//! stream weights. The FMA peak: every cpu backend thread running independent f32 FMA
//! chains with the instructions the kernels use (`CpuBackend::fma_peak_gflops`), and where
//! the cpu has AVX-512 BF16 the pair-dot peak (`CpuBackend::bf16_dot_peak_gflops`), and
//! where it has AMX-BF16 the tile peak (`CpuBackend::bf16_tile_peak_gflops`): the bf16
//! products run on the tiles where there are some, else on the pair dots.

use crate::error::{CliError, CliResult};
use crate::out;
use std::process::ExitCode;
use std::time::Instant;

/// Arguments of `moe bench machine`.
#[derive(clap::Args)]
pub struct MachineArgs {
    /// Reading threads (default: every core).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    threads: Option<u64>,
    /// Buffer size in MiB: several times the last-level cache, so that every pass reads
    /// from memory.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    mib: u64,
    /// Timed passes over the buffer (after one warm-up pass).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    passes: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Sums `v` (wrapping) in eight independent lanes, so the compiler vectorises the loads.
fn read_all(v: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = v.chunks_exact(8);
    let tail: u64 = chunks.remainder().iter().fold(0, |a, &x| a.wrapping_add(x));
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(x);
        }
    }
    acc.iter().fold(tail, |a, &x| a.wrapping_add(x))
}

/// Measures and prints the read bandwidth and the FMA peak.
pub fn run(a: MachineArgs) -> CliResult<ExitCode> {
    let threads = a.threads.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |t| t as usize);
    let bytes = a.mib.saturating_mul(1 << 20);
    if let Some(free) = moe_engine::memory::host_available() {
        if bytes > free / 2 {
            return Err(CliError::flag(
                "--mib",
                format!("{} MiB is more than half the {} MiB free", a.mib, free >> 20),
            ));
        }
    }
    let words = (bytes / 8) as usize;
    let share = words.div_ceil(threads);
    let mut buf = vec![0u64; words];
    // First touch by the reading threads, so each thread's pages are where it runs.
    std::thread::scope(|s| {
        for (i, part) in buf.chunks_mut(share.max(1)).enumerate() {
            s.spawn(move || part.iter_mut().enumerate().for_each(|(j, w)| *w = (i * share + j) as u64));
        }
    });
    let mut gbps = Vec::with_capacity(a.passes as usize);
    let mut check = 0u64;
    for pass in 0..=a.passes {
        let t0 = Instant::now();
        let sums: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = buf.chunks(share.max(1)).map(|part| s.spawn(move || read_all(part))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).collect()
        });
        let dt = t0.elapsed().as_secs_f64();
        check = sums.iter().fold(check, |a, &x| a.wrapping_add(x));
        if pass > 0 {
            gbps.push(bytes as f64 / dt / 1e9);
        }
    }
    // Keeps the sums (and so the reads) from being optimised away.
    std::hint::black_box(check);
    gbps.sort_by(f64::total_cmp);
    drop(buf);
    let (best, median) = (gbps[gbps.len() - 1], gbps[gbps.len() / 2]);
    let cpu = moe_cpu::CpuBackend::new(Some(threads))?;
    // The best of three short runs: the peak is what the cores can do, noise only lowers it.
    let fma = (0..3).map(|_| cpu.fma_peak_gflops(0.2)).fold(0.0, f64::max);
    let dot = (0..3).filter_map(|_| cpu.bf16_dot_peak_gflops(0.2)).reduce(f64::max);
    let tile = (0..3).filter_map(|_| cpu.bf16_tile_peak_gflops(0.2)).reduce(f64::max);
    let simd = cpu.simd();
    if a.json {
        let v = serde_json::json!({"threads": threads, "mib": a.mib, "passes": a.passes, "best_gbps": best,
            "median_gbps": median, "fma_gflops": fma, "bf16_dot_gflops": dot, "bf16_tile_gflops": tile, "simd": simd});
        out!("{v}")?;
    } else {
        out!(
            "read bandwidth, {threads} threads over {} MiB: best {best:.1} GB/s, median {median:.1} GB/s ({} passes)",
            a.mib,
            a.passes
        )?;
        out!("f32 FMA peak, {threads} threads ({simd}): {fma:.0} GFLOP/s")?;
        match dot {
            Some(d) => out!("bf16 pair-dot peak, {threads} threads (avx512_bf16 vdpbf16ps): {d:.0} GFLOP/s")?,
            None => out!("bf16 pair-dot peak: none (this cpu lacks AVX-512 BF16; bf16 products use f32 FMAs)")?,
        }
        match tile {
            Some(t) => out!("bf16 tile peak, {threads} threads (amx_bf16 tdpbf16ps): {t:.0} GFLOP/s")?,
            None => out!("bf16 tile peak: none (no AMX-BF16 tiles on this cpu or OS)")?,
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_read_sums_every_word() {
        let v: Vec<u64> = (0..1003).collect();
        assert_eq!(super::read_all(&v), 1003 * 1002 / 2);
        assert_eq!(super::read_all(&[]), 0);
    }
}
