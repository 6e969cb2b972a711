//! The op-level parity harness, cpu (reference) against wgpu: every case must pass.
//! Skips visibly without an adapter; with `CI=true` a missing adapter fails.

mod common;

use moe_engine::parity::{self, Outcome};

#[test]
fn wgpu_matches_cpu_on_every_op() {
    let Some(wgpu) = common::wgpu("wgpu_matches_cpu_on_every_op") else { return };
    let cpu = common::cpu_reference(2);
    let results = parity::run(&cpu, &wgpu);
    assert!(results.len() >= 40, "the harness ran {} cases", results.len());
    let table = parity::markdown(&[("wgpu".to_string(), results.clone())]);
    let bad: Vec<_> = results.iter().filter(|r| !matches!(r.outcome, Outcome::Pass(_))).collect();
    assert!(bad.is_empty(), "parity failures:\n{table}");
}

#[test]
fn the_reference_against_itself_is_exact() {
    let cpu = common::cpu_reference(1);
    let results = parity::run(&cpu, &cpu);
    for r in &results {
        match (r.dtype, &r.outcome) {
            (moe_engine::DType::F32, Outcome::Pass(e)) => assert_eq!(*e, 0.0, "{} {}", r.op, r.case),
            // The reference stores f32 only: its half-precision cases are reported, not faked.
            (_, Outcome::Unsupported(_)) if r.dtype != moe_engine::DType::F32 => {}
            other => panic!("{} {}: {other:?}", r.op, r.case),
        }
    }
}

#[test]
fn comparison_rejects_nan_wrong_integers_and_shapes() {
    use moe_engine::HostTensor;
    let f = |v: Vec<f32>| HostTensor::f32(&[v.len()], v).unwrap();
    let i = |v: Vec<i32>| HostTensor::i32(&[v.len()], v).unwrap();
    assert_eq!(parity::compare("y", &f(vec![1.0, 2.0]), &f(vec![1.0, 2.0]), 1e-6), Ok(0.0));
    assert!(parity::compare("y", &f(vec![1.0, 2.0]), &f(vec![f32::NAN, 2.0]), 1e-6).is_err());
    assert!(parity::compare("y", &f(vec![1.0, 2.0]), &f(vec![1.0, f32::INFINITY]), 1e-6).is_err());
    assert!(parity::compare("y", &f(vec![1.0, 2.0]), &f(vec![1.0, 2.001]), 1e-6).is_err());
    assert!(parity::compare("slots", &i(vec![0, 1]), &i(vec![0, 2]), 1e-6).is_err());
    assert!(parity::compare("y", &f(vec![1.0, 2.0]), &f(vec![1.0]), 1e-6).is_err());
    assert!(parity::compare("y", &f(vec![1.0]), &i(vec![1]), 1e-6).is_err());
}
