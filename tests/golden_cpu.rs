//! Every golden case in tests/golden (DeepSpeed 0.19.8 and transformers 5.23 references)
//! must pass on the cpu backend.

mod common;

use moe_engine::golden;

#[test]
fn all_golden_cases_pass_on_cpu() {
    let (failures, _) = common::run_golden(&common::cpu(2));
    assert!(failures.is_empty(), "golden failures:\n{}", failures.join("\n"));
}

#[test]
fn all_model_family_cases_pass_on_cpu() {
    let (failures, _) = common::run_golden_models(&common::cpu(2));
    assert!(failures.is_empty(), "model-family failures:\n{}", failures.join("\n"));
}

#[test]
fn golden_comparison_rejects_nan_and_wrong_values() {
    assert_eq!(golden::rel_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!(golden::rel_l2(&[f64::NAN, 2.0], &[1.0, 2.0]).is_infinite());
    assert!(golden::rel_l2(&[1.0, 2.0], &[f64::NAN, 2.0]).is_infinite());
    assert!(golden::rel_l2(&[f64::INFINITY, 2.0], &[1.0, 2.0]).is_infinite());
    let e = golden::rel_l2(&[1.0, 2.1], &[1.0, 2.0]);
    assert!((e - 0.1 / 5f64.sqrt()).abs() < 1e-12);
}
