//! The CUDA backend on a GPU: every golden case and the parity harness against the cpu.
//! Without a CUDA driver and device these tests print why they skip and pass (CI has no
//! GPU; it compile-checks the kernels with NVRTC instead, see backends/cuda/tests).

use moe_engine::parity::{self, Outcome};
use moe_engine::{golden, Backend};
use std::io::Write;
use std::path::Path;

fn backend(test: &str) -> Option<moe_cuda::CudaBackend> {
    match moe_cuda::CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "SKIP {test}: no CUDA device ({e})");
            None
        }
    }
}

#[test]
fn all_golden_cases_pass_on_cuda() {
    let Some(b) = backend("all_golden_cases_pass_on_cuda") else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut failures = Vec::new();
    for dir in golden::discover(&root).expect("cases") {
        match golden::run_case(&b, &dir) {
            Ok(r) if r.pass => {}
            Ok(r) => {
                failures.push(format!("{}: {:?}", r.name, r.outputs.iter().filter(|o| !o.pass).collect::<Vec<_>>()))
            }
            Err(e) => failures.push(format!("{}: error {e}", dir.display())),
        }
    }
    assert!(failures.is_empty(), "golden failures on {}:\n{}", b.capabilities().device, failures.join("\n"));
}

#[test]
fn cuda_matches_cpu_on_every_op() {
    let Some(b) = backend("cuda_matches_cpu_on_every_op") else { return };
    let cpu = moe_cpu::CpuBackend::new(None).expect("cpu");
    let results = parity::run(&cpu, &b);
    let table = parity::markdown(&[("cuda".to_string(), results.clone())]);
    assert!(results.iter().all(|r| matches!(r.outcome, Outcome::Pass(_))), "parity failures:\n{table}");
}

#[test]
fn no_driver_is_an_error_naming_the_library() {
    if moe_cuda::driver_status().is_ok() {
        return;
    }
    let err = moe_cuda::CudaBackend::new(0).err().expect("no driver");
    assert!(err.to_string().contains("libcuda"), "{err}");
}
