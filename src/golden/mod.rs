//! Golden cases: reference results from DeepSpeed and HF transformers (see
//! `tests/golden/FORMAT.md`). [`run_case`] reads a case folder into typed metadata
//! ([`case::CaseMeta`]), builds its gate or layer through the importers, runs it forward
//! (and backward) on a backend and compares every expected output; a training trace
//! ([`trace`], kinds `*.train`) is replayed step by step with the optimizer.

pub mod case;
pub mod ds_checkpoint;
mod run;
pub mod trace;

pub use case::{Backward, Case, CaseKind, CaseMeta, Loss, Output};
pub use run::{run_case, run_case_ep, run_case_in};
pub use trace::{is_trace, run_trace, StepRecord, Trace, TraceKind, TraceMeta};

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// One compared output.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OutputCheck {
    /// Output name (`y`, `indices`, ...).
    pub name: String,
    /// Relative L2 error for float outputs; mismatching elements for exact outputs.
    pub error: f64,
    /// Whether the comparison was exact.
    pub exact: bool,
    /// Whether it passed.
    pub pass: bool,
    /// Whether it is a gradient (`d<name>`) of the case's backward.
    pub backward: bool,
}

/// The result of one case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaseResult {
    /// Case name.
    pub name: String,
    /// Case kind.
    pub kind: String,
    /// Every compared output (never empty: a case that names none is an error).
    pub outputs: Vec<OutputCheck>,
    /// The largest relative L2 error over float outputs of the forward.
    pub worst_rel_l2: f64,
    /// The largest relative L2 error over the gradients, when the backward was compared.
    pub worst_grad_rel_l2: Option<f64>,
    /// Whether every output passed.
    pub pass: bool,
    /// What the case holds that this run did not compare, and why (shown with the result).
    pub not_compared: Vec<String>,
}

/// Folders under `path` holding a `case.json` (or `path` itself), sorted.
pub fn discover(path: &Path) -> Result<Vec<PathBuf>> {
    if path.join("case.json").is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let rd = std::fs::read_dir(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    let mut out: Vec<PathBuf> =
        rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("case.json").is_file()).collect();
    out.sort();
    if out.is_empty() {
        return Err(Error::case(path.display().to_string(), "no golden cases (folders with case.json) found"));
    }
    Ok(out)
}

/// Relative L2 error ‖a − b‖ / ‖b‖ (absolute when ‖b‖ = 0); NaN or infinity anywhere
/// gives +inf, so a non-finite output never passes.
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}
