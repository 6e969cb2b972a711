//! Helpers the integration tests share: backends (with visible skips), deterministic data,
//! host-side references, uploads and downloads, safetensors writing, temp folders and the
//! golden-case loop. Each test binary uses a part of them.
#![allow(dead_code)]

use moe_cpu::CpuBackend;
use moe_engine::{golden, Backend, DType, HostTensor, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Whether this run must not skip (CI sets `CI=true`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Prints a skip past the test harness's output capture, so it is visible.
pub fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

/// The cpu backend with `threads` workers.
pub fn cpu(threads: usize) -> CpuBackend {
    CpuBackend::new(Some(threads)).expect("cpu backend")
}

/// The cpu backend storing f32 weights only: the parity harness's reference.
pub fn cpu_reference(threads: usize) -> CpuBackend {
    CpuBackend::f32_reference(Some(threads)).expect("cpu backend")
}

/// The wgpu backend, or `None` after printing why the test is skipped; with `CI=true` a
/// missing adapter is a failure.
pub fn wgpu(test: &str) -> Option<moe_wgpu::WgpuBackend> {
    match moe_wgpu::WgpuBackend::new(None) {
        Ok(b) => Some(b),
        Err(e) => {
            if in_ci() {
                panic!("CI=true and no wgpu adapter: {e}");
            }
            skip(test, &format!("no wgpu adapter on this machine ({e})"));
            None
        }
    }
}

/// The cuda backend on device 0, or `None` after printing why the test is skipped (CI has
/// no GPU, so this never fails there).
pub fn cuda(test: &str) -> Option<moe_cuda::CudaBackend> {
    match moe_cuda::CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            skip(test, &format!("no CUDA device ({e})"));
            None
        }
    }
}

/// The golden cases of the project.
pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Runs every golden case on `b`; the descriptions of the ones that failed, and the
/// results of the ones that passed.
pub fn run_golden<B: Backend>(b: &B) -> (Vec<String>, Vec<golden::CaseResult>) {
    run_golden_in(b, DType::F32)
}

/// As [`run_golden`] with the expert weights stored in `weights` (training traces, which
/// replay in f32, are skipped with a line saying so).
pub fn run_golden_in<B: Backend>(b: &B, weights: DType) -> (Vec<String>, Vec<golden::CaseResult>) {
    let what = "the 28 reference cases, 2 DeepSpeed checkpoints and 7 training traces";
    run_cases(b, &golden_dir(), 37, what, weights)
}

/// Runs every case folder under `dir` (there must be `count`, as `what` describes) with
/// the expert weights in `weights`.
fn run_cases<B: Backend>(
    b: &B,
    dir: &Path,
    count: usize,
    what: &str,
    weights: DType,
) -> (Vec<String>, Vec<golden::CaseResult>) {
    let cases = golden::discover(dir).expect("the case folder holds the cases");
    assert_eq!(cases.len(), count, "expected {what} in {}", dir.display());
    let (mut failures, mut passed) = (Vec::new(), Vec::new());
    for dir in &cases {
        if weights != DType::F32 && golden::is_trace(dir) {
            eprintln!("skip {}: a training trace replays in f32, not with {weights} weights", dir.display());
            continue;
        }
        match golden::run_case_in(b, dir, weights) {
            Ok(r) if r.pass => passed.push(r),
            Ok(r) => {
                failures.push(format!("{}: {:?}", r.name, r.outputs.iter().filter(|o| !o.pass).collect::<Vec<_>>()))
            }
            Err(e) => failures.push(format!("{}: error {e}", dir.display())),
        }
    }
    (failures, passed)
}

/// A fresh folder for one test under cargo's per-target temp dir.
pub fn tmp_dir(suite: &str, name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(suite).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Deterministic values in [-scale, scale).
pub fn lcg(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(777);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// An f32 host tensor.
pub fn ht(shape: &[usize], v: Vec<f32>) -> HostTensor {
    HostTensor::f32(shape, v).expect("host tensor")
}

/// Uploads f32 values.
pub fn up_f32<B: Backend>(b: &B, shape: &[usize], v: Vec<f32>) -> Tensor<B> {
    b.upload(&ht(shape, v)).expect("upload")
}

/// Downloads f32 values.
pub fn f32s<B: Backend>(b: &B, t: &Tensor<B>) -> Vec<f32> {
    b.download(t).expect("download").into_f32("t").expect("f32")
}

/// Downloads i32 values.
pub fn i32s<B: Backend>(b: &B, t: &Tensor<B>) -> Vec<i32> {
    b.download(t).expect("download").into_i32("t").expect("i32")
}

/// softmax of a row, in f64.
pub fn softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let ex: Vec<f64> = row.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = ex.iter().sum();
    ex.iter().map(|x| x / s).collect()
}

/// `w [out, in] · x (+ b)` in f64.
pub fn matvec(w: &[f32], b: Option<&[f32]>, x: &[f64], out: usize) -> Vec<f64> {
    let n = x.len();
    (0..out).map(|o| (0..n).map(|i| w[o * n + i] as f64 * x[i]).sum::<f64>() + b.map_or(0.0, |b| b[o] as f64)).collect()
}

/// ‖a − r‖ / ‖r‖.
pub fn rel_l2(a: &[f32], r: &[f64]) -> f64 {
    let a: Vec<f64> = a.iter().map(|&v| v as f64).collect();
    golden::rel_l2(&a, r)
}

/// One tensor to write: name, dtype, shape, little-endian bytes.
pub struct Entry {
    /// Tensor name.
    pub name: String,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes.
    pub bytes: Vec<u8>,
}

/// An f32 entry.
pub fn f32_entry(name: &str, shape: &[usize], v: &[f32]) -> Entry {
    assert_eq!(v.len(), shape.iter().product::<usize>(), "{name}");
    Entry {
        name: name.into(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Writes entries to a safetensors file.
pub fn write_st(path: &Path, entries: &[Entry]) {
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|e| (e.name.clone(), TensorView::new(e.dtype, e.shape.clone(), &e.bytes).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

/// The HF model-family cases of the project (`hf.model`, one per family).
pub fn golden_models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden-models")
}

/// Runs every model-family case on `b`: the failures' descriptions and the passes.
pub fn run_golden_models<B: Backend>(b: &B) -> (Vec<String>, Vec<golden::CaseResult>) {
    run_golden_models_in(b, DType::F32)
}

/// As [`run_golden_models`] with the expert weights stored in `weights`.
pub fn run_golden_models_in<B: Backend>(b: &B, weights: DType) -> (Vec<String>, Vec<golden::CaseResult>) {
    run_cases(b, &golden_models_dir(), 33, "30 families and 3 checkpoint formats", weights)
}
