//! `moe info`: the backends compiled in and the devices each one sees; with
//! `--compile-kernels`, the NVRTC compile check of every CUDA kernel.

use crate::error::CliResult;
use crate::out;
use moe_engine::Device;
use std::process::ExitCode;

/// Lists backends and devices.
pub fn info() -> CliResult<ExitCode> {
    out!("backends compiled in: cpu, wgpu, cuda")?;
    let cpu = moe_cpu::CpuBackend::new(None)?;
    let c = cpu.capabilities();
    let dtypes: Vec<String> = c.storage_dtypes.iter().map(|d| d.to_string()).collect();
    out!("cpu  [0] {} ({} threads; dtypes {})", c.device, c.threads, dtypes.join(", "))?;
    let adapters = moe_wgpu::list_adapters();
    if adapters.is_empty() {
        out!("wgpu: no adapter (no Vulkan/Metal/DX12/GL driver; on Linux: apt install mesa-vulkan-drivers)")?;
    }
    for a in adapters {
        out!(
            "wgpu [{}] {} ({}, {}; driver {}; f16 {}; largest storage binding {} MiB)",
            a.index,
            a.name,
            a.api,
            a.kind,
            if a.driver.is_empty() { "?" } else { &a.driver },
            if a.f16 { "yes" } else { "no" },
            a.max_storage_binding >> 20
        )?;
    }
    match moe_cuda::driver_status() {
        Ok(()) => match moe_cuda::CudaBackend::new(0) {
            Ok(b) => out!("cuda [0] {}", b.capabilities().device)?,
            Err(e) => out!("cuda: driver present, but: {e}")?,
        },
        Err(e) => out!("cuda: {e}")?,
    }
    match moe_cuda::nvrtc_status() {
        Ok(()) => out!("cuda: NVRTC present (`moe info --compile-kernels` compiles every kernel)")?,
        Err(e) => out!("cuda: {e}")?,
    }
    match moe_cuda::cublas_status() {
        Ok(()) => out!("cuda: cuBLAS present (dense products)")?,
        Err(e) => out!("cuda: {e}; dense products would use the grouped kernels")?,
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per kernel and architecture (a family that does not compile is one failing
/// line per architecture, with the compiler's log), then `N passed, M failed`.
pub fn compile_kernels() -> CliResult<ExitCode> {
    let reports = moe_cuda::compile_all()?;
    let (mut passed, mut failed) = (0, 0);
    for r in &reports {
        match &r.result {
            Ok(kernels) => {
                for k in kernels {
                    passed += 1;
                    out!("PASS {} {} {k}", r.arch, r.family)?;
                }
            }
            Err(log) => {
                failed += 1;
                out!("FAIL {} {}\n{log}", r.arch, r.family)?;
            }
        }
    }
    out!("{passed} passed, {failed} failed")?;
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
