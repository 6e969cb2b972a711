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
