//! Which backend a command runs on: one enum of the compiled-in backends, and one generic
//! dispatch that opens it and hands it to the command.

use crate::error::CliResult;
use moe_engine::{Backend, Result};

/// The compiled-in backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// The reference backend: plain Rust on the cpu's threads.
    Cpu,
    /// WGSL compute shaders through wgpu (Vulkan, Metal, DX12, GL; lavapipe without a GPU).
    Wgpu,
    /// CUDA: NVRTC kernels, cuBLAS, NCCL (needs an NVIDIA driver).
    Cuda,
}

impl BackendKind {
    /// The name `--backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// The backend flags every command shares.
#[derive(Clone, Debug, clap::Args)]
pub struct BackendArgs {
    /// Backend to run on (default: cpu; for `moe parity`, the backend compared with the
    /// cpu, default wgpu).
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// Device of the backend: a wgpu adapter index or name fragment, a CUDA device index
    /// (see `moe info`).
    #[arg(long)]
    pub device: Option<String>,
    /// cpu worker threads (default: every core).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub threads: Option<u64>,
}

/// A command body that runs on whichever backend was chosen. `open(rank)` opens a backend
/// of the chosen kind (for rank `rank` of an in-process expert-parallel group; 0 alone).
pub trait OnBackend {
    /// What the command returns.
    type Out;
    /// Runs on backend type `B`.
    fn run<B: Backend>(self, kind: BackendKind, open: &(dyn Fn(usize) -> Result<B> + Sync)) -> CliResult<Self::Out>;
}

/// The CUDA device index from `--device` (default 0).
pub fn cuda_device(device: Option<&str>) -> CliResult<usize> {
    device.map_or(Ok(0), |d| {
        d.parse().map_err(|_| crate::error::CliError::flag("--device", format!("cuda takes a device index, got `{d}`")))
    })
}

/// Opens the chosen backend (`default` when `--backend` is not given) and runs `cmd` on
/// it. `threads_per_rank` overrides the cpu's thread count (expert-parallel ranks share
/// the cores).
pub fn dispatch<C: OnBackend>(
    args: &BackendArgs,
    default: BackendKind,
    threads_per_rank: Option<usize>,
    cmd: C,
) -> CliResult<C::Out> {
    let threads = threads_per_rank.or(args.threads.map(|t| t as usize));
    let kind = args.backend.unwrap_or(default);
    match kind {
        BackendKind::Cpu => cmd.run(kind, &|_| moe_cpu::CpuBackend::new(threads)),
        BackendKind::Wgpu => {
            let device = args.device.clone();
            cmd.run(kind, &move |_| moe_wgpu::WgpuBackend::new(device.as_deref()))
        }
        BackendKind::Cuda => {
            let ordinal = cuda_device(args.device.as_deref())?;
            cmd.run(kind, &move |_| moe_cuda::CudaBackend::new(ordinal))
        }
    }
}
