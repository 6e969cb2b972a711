//! Every golden case in tests/golden (DeepSpeed 0.19.8 and transformers 5.23 references)
//! must pass on the cpu backend.

use moe_engine::golden;
use std::path::Path;

#[test]
fn all_golden_cases_pass_on_cpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let cases = golden::discover(&root).expect("tests/golden holds the cases");
    assert_eq!(cases.len(), 28, "expected the 28 reference cases in {}", root.display());
    let backend = moe_cpu::CpuBackend::new(Some(2)).expect("cpu backend");
    let mut failures = Vec::new();
    for dir in &cases {
        match golden::run_case(&backend, dir) {
            Ok(r) if r.pass => {}
            Ok(r) => {
                failures.push(format!("{}: {:?}", r.name, r.outputs.iter().filter(|o| !o.pass).collect::<Vec<_>>()))
            }
            Err(e) => failures.push(format!("{}: error {e}", dir.display())),
        }
    }
    assert!(failures.is_empty(), "golden failures:\n{}", failures.join("\n"));
}

#[test]
fn golden_comparison_rejects_nan_and_wrong_values() {
    assert_eq!(golden::rel_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!(golden::rel_l2(&[f64::NAN, 2.0], &[1.0, 2.0]).is_infinite());
    assert!(golden::rel_l2(&[1.0, 2.0], &[f64::NAN, 2.0]).is_infinite());
    let e = golden::rel_l2(&[1.0, 2.1], &[1.0, 2.0]);
    assert!((e - 0.1 / 5f64.sqrt()).abs() < 1e-12);
}
