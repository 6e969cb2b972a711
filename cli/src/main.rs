//! `moe`: run golden cases, benchmark a layer, list backends and devices (or describe a
//! model folder's MoE layers), and run a model's MoE layers or the built-in PR-MoE demo
//! stack.

mod backends;
mod bench;
mod chart;
mod check;
mod demo;
mod error;
mod info;
mod machine;
mod model;
mod model_run;
mod output;
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
    /// The backends compiled in and the devices each one sees; with --model, a model's
    /// MoE layers.
    Info {
        /// Compile every CUDA kernel with NVRTC for sm_80 and sm_90 (no GPU needed; needs
        /// libnvrtc) and report registers and spills; exit status 0 only when all compile.
        #[arg(long)]
        compile_kernels: bool,
        /// Describe this model instead: a model folder or a hub repo id
        /// `org/name[@revision]` in the local HF hub cache. Reads `config.json` and the
        /// safetensors headers only.
        #[arg(long, value_name = "DIR", conflicts_with = "compile_kernels")]
        model: Option<String>,
    },
    /// Op-level parity: every trait op on the cpu and on another backend, as a support matrix.
    Parity(parity::Args),
    /// Run a model's MoE layers (--model) or the built-in PR-MoE demo stack and print
    /// throughput, expert load and drops.
    Run(demo::Args),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MOE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    // The cpu backend's forwards reuse freed memory instead of faulting in fresh pages
    // (moe_cpu::retain_freed_memory); MOE_MALLOC=default keeps glibc's defaults, to compare.
    if std::env::var("MOE_MALLOC").as_deref() != Ok("default") && !moe_cpu::retain_freed_memory() {
        tracing::debug!("the allocator did not take the keep-freed-memory settings");
    }
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Check(a) => check::run(a),
        Cmd::Bench { what } => bench::run(what),
        Cmd::Info { compile_kernels, model } => match model {
            Some(m) => model::info(&m),
            None if compile_kernels => info::compile_kernels(),
            None => info::info(),
        },
        Cmd::Parity(a) => parity::run(a),
        Cmd::Run(a) => demo::run(a),
    };
    match res {
        Ok(code) => code,
        // The reader of our output went away (`| head`): it has what it wanted.
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", e.report());
            ExitCode::FAILURE
        }
    }
}
