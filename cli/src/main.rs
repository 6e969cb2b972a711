//! `moe`: run golden cases, benchmark a layer, list backends and devices, and run the
//! built-in PR-MoE demo stack.

mod bench;
mod check;
mod demo;
mod parity;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Mixture-of-Experts engine.
#[derive(Parser)]
#[command(name = "moe", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run golden cases (case folders, or folders of them) and compare with the references.
    Check(check::Args),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: bench::What,
    },
    /// The backends compiled in and the devices each one sees.
    Info {
        /// Compile every CUDA kernel with NVRTC for sm_80 and sm_90 (no GPU needed; needs
        /// libnvrtc) and report registers and spills; exit status 0 only when all compile.
        #[arg(long)]
        compile_kernels: bool,
    },
    /// Op-level parity: every trait op on the cpu and on another backend, as a support matrix.
    Parity(parity::Args),
    /// Run the built-in PR-MoE demo stack and print throughput, expert load and drops.
    Run(demo::Args),
}

/// Backends compiled into this binary.
pub const BACKENDS: &[&str] = &["cpu", "wgpu", "cuda"];

/// Errors unless `name` is a compiled-in backend.
pub fn check_backend(name: &str) -> Result<(), String> {
    if BACKENDS.contains(&name) {
        Ok(())
    } else {
        Err(format!("backend `{name}` is not available in this build (available: {})", BACKENDS.join(", ")))
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MOE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Check(a) => check::run(a),
        Cmd::Bench { what } => bench::run(what),
        Cmd::Info { compile_kernels } => {
            if compile_kernels {
                compile_kernels_check()
            } else {
                info()
            }
        }
        Cmd::Parity(a) => parity::run(a),
        Cmd::Run(a) => demo::run(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn info() -> Result<ExitCode, String> {
    use moe_engine::Backend;
    println!("backends compiled in: {}", BACKENDS.join(", "));
    let cpu = moe_cpu::CpuBackend::new(None).map_err(|e| e.to_string())?;
    let c = cpu.capabilities();
    let dtypes: Vec<String> = c.storage_dtypes.iter().map(|d| d.to_string()).collect();
    println!("cpu  [0] {} ({} threads; dtypes {})", c.device, c.threads, dtypes.join(", "));
    let adapters = moe_wgpu::list_adapters();
    if adapters.is_empty() {
        println!("wgpu: no adapter (no Vulkan/Metal/DX12/GL driver; on Linux: apt install mesa-vulkan-drivers)");
    }
    for a in adapters {
        println!(
            "wgpu [{}] {} ({}, {}; driver {}; f16 {}; largest storage binding {} MiB)",
            a.index,
            a.name,
            a.api,
            a.kind,
            if a.driver.is_empty() { "?" } else { &a.driver },
            if a.f16 { "yes" } else { "no" },
            a.max_storage_binding >> 20
        );
    }
    match moe_cuda::driver_status() {
        Ok(()) => match moe_cuda::CudaBackend::new(0) {
            Ok(b) => println!("cuda [0] {}", moe_engine::Backend::capabilities(&b).device),
            Err(e) => println!("cuda: driver present, but: {e}"),
        },
        Err(e) => println!("cuda: {e}"),
    }
    match moe_cuda::nvrtc_status() {
        Ok(()) => println!("cuda: NVRTC present (`moe info --compile-kernels` compiles every kernel)"),
        Err(e) => println!("cuda: {e}"),
    }
    match moe_cuda::cublas_status() {
        Ok(()) => println!("cuda: cuBLAS present (dense products)"),
        Err(e) => println!("cuda: {e}; dense products would use the grouped kernels"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The CUDA device index from `--device` (default 0).
pub fn cuda_device(device: Option<&str>) -> Result<usize, String> {
    device.map_or(Ok(0), |d| d.parse().map_err(|_| format!("--device for cuda takes an index, got `{d}`")))
}

/// `moe info --compile-kernels`: one line per kernel and architecture (a family that does
/// not compile is one failing line per architecture, with the compiler's log), then
/// `N passed, M failed`.
fn compile_kernels_check() -> Result<ExitCode, String> {
    let reports = moe_cuda::compile_all().map_err(|e| e.to_string())?;
    let (mut passed, mut failed) = (0, 0);
    for r in &reports {
        match &r.result {
            Ok(kernels) => {
                for k in kernels {
                    passed += 1;
                    println!("PASS {} {} {k}", r.arch, r.family);
                }
            }
            Err(log) => {
                failed += 1;
                println!("FAIL {} {}\n{log}", r.arch, r.family);
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
