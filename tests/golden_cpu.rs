//! Every golden case in tests/golden (DeepSpeed 0.19.8 and transformers 5.23 references)
//! must pass on the cpu backend.

mod common;

use moe_engine::{golden, DType};

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

/// With the expert weights stored in bf16 and in f16 (widened in the cpu's kernels), every
/// case's forward stays within that type's product tolerance and its routing exact.
#[test]
fn all_cases_pass_on_cpu_with_half_weights() {
    let b = common::cpu(2);
    for dtype in [DType::BF16, DType::F16] {
        let (mut failures, passed) = common::run_golden_in(&b, dtype);
        let (f2, p2) = common::run_golden_models_in(&b, dtype);
        failures.extend(f2);
        assert!(failures.is_empty(), "{dtype} failures:\n{}", failures.join("\n"));
        // 30 cases (the 7 traces skipped) and 33 model folders, every one compared.
        assert_eq!(passed.len() + p2.len(), 63, "{dtype}");
        let worst = passed.iter().chain(&p2).map(|r| r.worst_rel_l2).fold(0.0, f64::max);
        eprintln!("{dtype} weights: worst relative L2 {worst:.2e}");
    }
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
