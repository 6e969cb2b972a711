//! `moe check`: golden cases on a backend.

use moe_engine::{golden, Backend};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `moe check`.
#[derive(clap::Args)]
pub struct Args {
    /// Backend to run on (cpu, wgpu).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Device of the backend: an adapter index or name fragment (see `moe info`).
    #[arg(long)]
    device: Option<String>,
    /// Run every case on N in-process ranks holding the whole batch, experts spread over
    /// them (N must divide each case's expert count); every rank must match.
    #[arg(long, default_value_t = 1)]
    ep: usize,
    /// With --ep: ranks per simulated node; the exchange then runs hierarchically (within
    /// nodes, then across). 0: one flat exchange.
    #[arg(long, default_value_t = 0)]
    ep_per_node: usize,
    /// Seconds a rank waits for its peers before the collective fails (with --ep).
    #[arg(long, default_value_t = 60)]
    ep_timeout: u64,
    /// Print every compared output, not just the worst error.
    #[arg(long, short)]
    verbose: bool,
    /// Case folders or folders of cases.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

/// Runs the cases; exit status 0 only when none failed.
pub fn run(a: Args) -> Result<ExitCode, String> {
    crate::check_backend(&a.backend)?;
    if a.ep > 1 {
        return run_ep(&a);
    }
    match a.backend.as_str() {
        "wgpu" => {
            let b = moe_wgpu::WgpuBackend::new(a.device.as_deref()).map_err(|e| e.to_string())?;
            eprintln!("wgpu on {}", b.capabilities().device);
            check_on(&b, &a)
        }
        "cuda" => {
            let b = moe_cuda::CudaBackend::new(crate::cuda_device(a.device.as_deref())?).map_err(|e| e.to_string())?;
            eprintln!("cuda on {}", b.capabilities().device);
            check_on(&b, &a)
        }
        _ => check_on(&moe_cpu::CpuBackend::new(None).map_err(|e| e.to_string())?, &a),
    }
}

/// `--ep N`: each case on N in-process ranks; the case passes when every rank does.
fn run_ep(a: &Args) -> Result<ExitCode, String> {
    let mut cases = Vec::new();
    for p in &a.paths {
        cases.extend(golden::discover(p).map_err(|e| e.to_string())?);
    }
    let timeout = std::time::Duration::from_secs(a.ep_timeout);
    let (mut passed, mut failed) = (0usize, 0usize);
    for dir in &cases {
        let results = match a.backend.as_str() {
            "wgpu" => golden::run_case_ep(
                |_| moe_wgpu::WgpuBackend::new(a.device.as_deref()),
                dir,
                a.ep,
                a.ep_per_node,
                timeout,
            ),
            "cuda" => golden::run_case_ep(|_| moe_cuda::CudaBackend::new(0), dir, a.ep, a.ep_per_node, timeout),
            _ => golden::run_case_ep(|_| moe_cpu::CpuBackend::new(Some(1)), dir, a.ep, a.ep_per_node, timeout),
        };
        match results {
            Ok(rs) => {
                let ok = rs.iter().all(|r| r.pass);
                let worst = rs.iter().map(|r| r.worst_rel_l2).fold(0.0, f64::max);
                let name = rs.first().map_or(String::new(), |r| r.name.clone());
                let kind = rs.first().map_or(String::new(), |r| r.kind.clone());
                println!(
                    "{} {name:<40} {kind:<22} worst rel_l2 {worst:.2e} over {} ranks",
                    if ok { "PASS" } else { "FAIL" },
                    a.ep
                );
                if !ok || a.verbose {
                    for (rank, r) in rs.iter().enumerate() {
                        for o in r.outputs.iter().filter(|o| a.verbose || !o.pass) {
                            println!(
                                "    rank {rank} {:<14} error {:.3e} {}",
                                o.name,
                                o.error,
                                if o.pass { "ok" } else { "FAIL" }
                            );
                        }
                    }
                }
                if ok {
                    passed += 1
                } else {
                    failed += 1
                }
            }
            Err(e) => {
                println!("FAIL {:<40} error: {e}", dir.display());
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn check_on<B: Backend>(backend: &B, a: &Args) -> Result<ExitCode, String> {
    let mut cases = Vec::new();
    for p in &a.paths {
        cases.extend(golden::discover(p).map_err(|e| e.to_string())?);
    }
    let (mut passed, mut failed) = (0usize, 0usize);
    for dir in &cases {
        match golden::run_case(backend, dir) {
            Ok(r) => {
                let exact_bad: Vec<String> = r
                    .outputs
                    .iter()
                    .filter(|o| o.exact && !o.pass)
                    .map(|o| format!("{} ({} differ)", o.name, o.error))
                    .collect();
                let status = if r.pass { "PASS" } else { "FAIL" };
                let mut line = format!("{status} {:<40} {:<22} worst rel_l2 {:.2e}", r.name, r.kind, r.worst_rel_l2);
                if !exact_bad.is_empty() {
                    line.push_str(&format!("; exact mismatch: {}", exact_bad.join(", ")));
                }
                println!("{line}");
                if a.verbose || !r.pass {
                    for o in &r.outputs {
                        let what =
                            if o.exact { format!("{} mismatches", o.error) } else { format!("rel_l2 {:.3e}", o.error) };
                        println!("    {:<14} {:<22} {}", o.name, what, if o.pass { "ok" } else { "FAIL" });
                    }
                }
                if r.pass {
                    passed += 1
                } else {
                    failed += 1
                }
            }
            Err(e) => {
                println!("FAIL {:<40} error: {e}", dir.display());
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
