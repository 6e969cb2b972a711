//! The op-level parity harness on the cpu itself: its f16 and bf16 weight paths (half
//! storage widened in the kernels) against the f32 reference multiplying the same rounded
//! values. Every case must pass, halves included (none unsupported).

mod common;

use moe_engine::parity::{self, Outcome};
use moe_engine::DType;

#[test]
fn cpu_half_weights_match_the_f32_reference_on_every_op() {
    let reference = common::cpu_reference(2);
    let cpu = common::cpu(2);
    let results = parity::run(&reference, &cpu);
    let table = parity::markdown(&[("cpu".to_string(), results.clone())]);
    for dtype in [DType::F16, DType::BF16] {
        let n = results.iter().filter(|r| r.dtype == dtype).count();
        assert!(n >= 5, "only {n} {dtype} cases ran:\n{table}");
    }
    let bad: Vec<_> = results.iter().filter(|r| !matches!(r.outcome, Outcome::Pass(_))).collect();
    assert!(bad.is_empty(), "parity failures:\n{table}");
}

#[test]
fn one_thread_and_two_agree_bit_for_bit() {
    // The tiles a product is cut into depend on the thread count, never the sums inside
    // a tile: the results are the same.
    let results = parity::run(&common::cpu(1), &common::cpu(2));
    for r in &results {
        match &r.outcome {
            Outcome::Pass(e) => assert_eq!(*e, 0.0, "{} {} {}", r.op, r.case, r.dtype),
            other => panic!("{} {} {}: {other:?}", r.op, r.case, r.dtype),
        }
    }
}
