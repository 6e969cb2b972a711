//! The op-level parity harness (DESIGN.md, Testing), in the spirit of ggml's
//! test-backend-ops: every op of the [`Backend`] trait runs on a reference backend (the
//! cpu) and on a candidate over small cases built to hit the edges (odd sizes, experts
//! with no token, all tokens on one expert, k = E, fewer tokens than k), and the outputs
//! are compared: floats by relative L2 against the case's own tolerance, integers
//! exactly. NaN never passes. Each case is a struct of one op ([`cases`]), declaring its
//! inputs, what it runs and its tolerance; [`markdown`] turns the results into the support
//! matrix that `docs/ops.md` carries.

pub mod cases;
pub mod grad_cases;

use crate::backend::Backend;
use crate::device::Capabilities;
use crate::device::Tensor;
use crate::error::{Error, Result};
use crate::golden::rel_l2;
use crate::tensor::{DType, HostData, HostTensor};

/// One case of one op: its inputs, the op it runs, and how close the candidate must be.
pub trait OpCase {
    /// The trait op under test.
    const OP: &'static str;
    /// What this case exercises.
    fn name(&self) -> String;
    /// Storage dtype of the case's weights.
    fn dtype(&self) -> DType {
        DType::F32
    }
    /// Bound on the relative L2 error of every float output on a candidate with `caps`.
    fn tolerance(&self, caps: &Capabilities) -> f64;
    /// Builds the inputs on `b`, runs the op and returns its named outputs.
    fn run<B: Backend>(&self, b: &B) -> Result<Vec<(&'static str, Tensor<B>)>>;
}

/// The outcome of one case on the candidate.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Within tolerance: the worst relative L2 over the case's float outputs (0 for
    /// integer-only outputs).
    Pass(f64),
    /// Outside tolerance, mismatched integers, or an error on a backend.
    Fail(String),
    /// The candidate says it cannot do this (its `Unsupported` error).
    Unsupported(String),
}

/// One case's result.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// Trait op under test.
    pub op: &'static str,
    /// What the case exercises.
    pub case: String,
    /// Storage dtype of the case.
    pub dtype: DType,
    /// Result on the candidate.
    pub outcome: Outcome,
}

/// Compares a candidate's output `c` with the reference `r`: exact for integers, relative
/// L2 within `tol` for floats (NaN or infinity anywhere never passes). `Ok(error)` or
/// `Err(what differs)`.
pub fn compare(name: &str, r: &HostTensor, c: &HostTensor, tol: f64) -> std::result::Result<f64, String> {
    if r.shape() != c.shape() {
        return Err(format!("{name}: shape {:?} against reference {:?}", c.shape(), r.shape()));
    }
    match (r.data(), c.data()) {
        (HostData::I32(a), HostData::I32(b)) => {
            let bad = a.iter().zip(b).filter(|(x, y)| x != y).count();
            if bad == 0 {
                Ok(0.0)
            } else {
                Err(format!("{name}: {bad} of {} integers differ", a.len()))
            }
        }
        (HostData::F32(_), HostData::F32(_)) => {
            let e = rel_l2(&c.to_f64(), &r.to_f64());
            if e <= tol {
                Ok(e)
            } else {
                Err(format!("{name}: relative L2 {e:.2e} above {tol:.0e}"))
            }
        }
        _ => Err(format!("{name}: dtype {} against reference {}", c.dtype(), r.dtype())),
    }
}

/// Runs cases on a reference and a candidate backend, collecting results.
pub struct Runner<'a, R: Backend, C: Backend> {
    reference: &'a R,
    candidate: &'a C,
    /// The results so far.
    pub results: Vec<CaseResult>,
}

/// The relative L2 bound of products with `dtype` weights where the inputs are rounded to
/// that type too: unit roundoff 2⁻¹¹ (f16) or 2⁻⁸ (bf16) on every input gives a relative
/// L2 near u/√3 per product, two products for an MLP, with room to spare. `None` for f32
/// (and i32), whose bounds are the f32 ones of each comparison.
pub fn half_tolerance(dtype: DType) -> Option<f64> {
    match dtype {
        DType::BF16 => Some(1e-2),
        DType::F16 => Some(2e-3),
        DType::F32 | DType::I32 => None,
    }
}

impl<'a, R: Backend, C: Backend> Runner<'a, R, C> {
    /// A runner comparing `candidate` with `reference`.
    pub fn new(reference: &'a R, candidate: &'a C) -> Self {
        Runner { reference, candidate, results: Vec::new() }
    }

    /// Runs every case of one op.
    pub fn all<T: OpCase>(&mut self, cases: &[T]) {
        for c in cases {
            self.check(c);
        }
    }

    /// Runs one case on both backends and records the outcome.
    pub fn check<T: OpCase>(&mut self, case: &T) {
        let dtype = case.dtype();
        let caps = self.candidate.capabilities();
        let outcome = if !caps.storage_dtypes.contains(&dtype) {
            Outcome::Unsupported(format!("{dtype} storage"))
        } else {
            match (outputs(self.reference, case), outputs(self.candidate, case)) {
                (Err(e), _) => Outcome::Fail(format!("reference failed: {e}")),
                (_, Err(Error::Unsupported { what, .. })) => Outcome::Unsupported(what),
                (_, Err(e)) => Outcome::Fail(e.to_string()),
                (Ok(r), Ok(c)) if r.len() != c.len() => {
                    Outcome::Fail(format!("{} outputs against the reference's {}", c.len(), r.len()))
                }
                (Ok(r), Ok(c)) => {
                    let tol = case.tolerance(caps);
                    let checks: std::result::Result<Vec<f64>, String> =
                        r.iter().zip(&c).map(|((name, rt), (_, ct))| compare(name, rt, ct, tol)).collect();
                    match checks {
                        Ok(errors) => Outcome::Pass(errors.into_iter().fold(0.0, f64::max)),
                        Err(msg) => Outcome::Fail(msg),
                    }
                }
            }
        };
        self.results.push(CaseResult { op: T::OP, case: case.name(), dtype, outcome });
    }
}

fn outputs<B: Backend, T: OpCase>(b: &B, case: &T) -> Result<Vec<(&'static str, HostTensor)>> {
    case.run(b)?.into_iter().map(|(n, t)| Ok((n, b.download(&t)?))).collect()
}

/// Runs every case of [`cases`] on both backends.
pub fn run<R: Backend, C: Backend>(reference: &R, candidate: &C) -> Vec<CaseResult> {
    let mut t = Runner::new(reference, candidate);
    cases::run_all(&mut t);
    t.results
}

/// The support matrix: one row per op, one column per (backend, dtype), each cell
/// "pass (cases; worst error)", "FAIL (n of m)", "unsupported" or "—" (no case), followed
/// by a list of the failing and unsupported cases.
pub fn markdown(backends: &[(String, Vec<CaseResult>)]) -> String {
    let mut ops: Vec<&'static str> = Vec::new();
    let mut columns: Vec<(&str, DType, Vec<&CaseResult>)> = Vec::new();
    for (b, rs) in backends {
        for d in [DType::F32, DType::F16, DType::BF16] {
            let cases: Vec<&CaseResult> = rs.iter().filter(|r| r.dtype == d).collect();
            if !cases.is_empty() {
                columns.push((b, d, cases));
            }
        }
        for r in rs {
            if !ops.contains(&r.op) {
                ops.push(r.op);
            }
        }
    }
    let mut s = String::from("| op |");
    for (b, d, _) in &columns {
        s.push_str(&format!(" {b} {d} |"));
    }
    s.push_str("\n| --- |");
    s.push_str(&" --- |".repeat(columns.len()));
    s.push('\n');
    let mut failures = Vec::new();
    for op in &ops {
        s.push_str(&format!("| `{op}` |"));
        for (b, d, rs) in &columns {
            let cases: Vec<&&CaseResult> = rs.iter().filter(|r| r.op == *op).collect();
            let pass = cases.iter().filter(|r| matches!(r.outcome, Outcome::Pass(_))).count();
            let unsupported = cases.iter().filter(|r| matches!(r.outcome, Outcome::Unsupported(_))).count();
            let worst = cases
                .iter()
                .filter_map(|r| if let Outcome::Pass(e) = r.outcome { Some(e) } else { None })
                .fold(0f64, f64::max);
            let cell = if cases.is_empty() {
                "—".to_string()
            } else if unsupported == cases.len() {
                "unsupported".to_string()
            } else if pass == cases.len() {
                format!("pass ({pass}; worst rel L2 {worst:.1e})")
            } else {
                format!("FAIL ({} of {})", cases.len() - pass, cases.len())
            };
            s.push_str(&format!(" {cell} |"));
            for r in cases {
                match &r.outcome {
                    Outcome::Fail(m) => failures.push(format!("- {b} {d} `{op}` {}: {m}", r.case)),
                    Outcome::Unsupported(m) => failures.push(format!("- {b} {d} `{op}` {}: unsupported ({m})", r.case)),
                    Outcome::Pass(_) => {}
                }
            }
        }
        s.push('\n');
    }
    if !failures.is_empty() {
        s.push('\n');
        s.push_str(&failures.join("\n"));
        s.push('\n');
    }
    s
}
