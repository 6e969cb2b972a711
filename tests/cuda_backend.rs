//! The CUDA backend on a GPU: every golden case and the parity harness against the cpu.
//! Without a CUDA driver and device these tests print why they skip and pass (CI has no
//! GPU; it compile-checks the kernels with NVRTC and runs them under emulation instead,
//! see backends/cuda/tests).

mod common;

use moe_engine::parity::{self, Outcome};
use moe_engine::Device;

#[test]
fn all_golden_cases_pass_on_cuda() {
    let Some(b) = common::cuda("all_golden_cases_pass_on_cuda") else { return };
    let (failures, _) = common::run_golden(&b);
    assert!(failures.is_empty(), "golden failures on {}:\n{}", b.capabilities().device, failures.join("\n"));
}

#[test]
fn all_model_family_cases_pass_on_cuda() {
    let Some(b) = common::cuda("all_model_family_cases_pass_on_cuda") else { return };
    let (failures, _) = common::run_golden_models(&b);
    assert!(failures.is_empty(), "model-family failures on {}:\n{}", b.capabilities().device, failures.join("\n"));
}

#[test]
fn cuda_matches_cpu_on_every_op() {
    let Some(b) = common::cuda("cuda_matches_cpu_on_every_op") else { return };
    let results = parity::run(&common::cpu_reference(2), &b);
    let table = parity::markdown(&[("cuda".to_string(), results.clone())]);
    assert!(results.iter().all(|r| matches!(r.outcome, Outcome::Pass(_))), "parity failures:\n{table}");
}

#[test]
fn no_driver_is_an_error_naming_the_library() {
    if moe_cuda::driver_status().is_ok() {
        common::skip("no_driver_is_an_error_naming_the_library", "this machine has a CUDA driver");
        return;
    }
    let err = moe_cuda::CudaBackend::new(0).err().expect("no driver");
    assert!(err.to_string().contains("libcuda"), "{err}");
}
