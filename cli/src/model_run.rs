//! `moe run --model DIR`: a model's MoE layers, one at a time, on seeded hidden states (or
//! given ones), with each layer's throughput, expert load and dropped tokens.

use crate::backends::{dispatch, BackendArgs, BackendKind, OnBackend};
use crate::chart::{self, LayerLoad};
use crate::demo::Args;
use crate::error::{CliError, CliResult};
use crate::model;
use crate::out;
use moe_engine::error::human_bytes;
use moe_engine::import::hf::HfModel;
use moe_engine::import::Checkpoint;
use moe_engine::{Backend, HostTensor, LayerOptions, MoeLayer, Result};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

/// `--layer`: one decoder layer, or every MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerSel {
    /// Every MoE layer of the model.
    All,
    /// This decoder layer (it must be an MoE one).
    One(usize),
}

/// Parses `--layer` (`all` or a layer index).
pub fn parse_layer(s: &str) -> std::result::Result<LayerSel, String> {
    if s == "all" {
        return Ok(LayerSel::All);
    }
    s.parse().map(LayerSel::One).map_err(|_| format!("`{s}` is neither `all` nor a layer index"))
}

/// The tensor names `--input` is read from, in the order tried: the hidden states by their
/// usual name, then a golden case's input (so a case's tensors.safetensors runs as it is).
const INPUT_KEYS: [&str; 2] = ["hidden_states", "input/x"];

/// Runs the model's MoE layers named by `--layer`.
pub fn run(a: &Args, spec: &str) -> CliResult<ExitCode> {
    let model = model::open(spec)?;
    let layers = match a.layer {
        LayerSel::One(l) => {
            model.check_moe_layer(l).map_err(|e| match e {
                moe_engine::Error::Config { msg, .. } => CliError::flag("--layer", msg),
                other => other.into(),
            })?;
            vec![l]
        }
        LayerSel::All => {
            let moe = model.moe_layers();
            if moe.is_empty() {
                return Err(CliError::flag(
                    "--model",
                    format!("{} has no MoE layer the engine runs ({})", spec, model::layer_summary(&model)),
                ));
            }
            moe
        }
    };
    let ls = model.spec().map_err(|e| CliError::model(format!("the MoE block of {spec}"), e))?;
    let hidden = ls.hidden;
    let x = match &a.input {
        Some(path) => read_input(path, hidden)?,
        None => {
            let t = a.tokens as usize;
            let n = t.checked_mul(hidden).ok_or_else(|| {
                moe_engine::Error::too_large(format!("--tokens {t} × hidden {hidden}"), "more elements", "usize")
            })?;
            moe_engine::memory::check_host(&format!("`--tokens {t}` hidden states"), n as u64 * 4)?;
            let v: Vec<f32> = moe_engine::philox::noise(moe_engine::philox::NoiseKind::Uniform, a.seed, 0, n)
                .into_iter()
                .map(|u| 2.0 * u - 1.0)
                .collect();
            HostTensor::f32(&[t, hidden], v)?
        }
    };
    // One layer is on the host at a time: its f32 weights as read, and the copy a backend
    // makes of them (the cpu's own layout; a GPU's upload staging).
    let weights = ls.weight_count()?.saturating_mul(4);
    moe_engine::memory::check_host(
        &format!("one MoE layer of {} ({} of f32 weights, read and copied)", spec, human_bytes(weights)),
        weights.saturating_mul(2),
    )?;
    // `auto` probes the devices: only once the model, the layers and the input are known good.
    let kind = crate::demo::backend_kind(a.backend);
    let args = BackendArgs { backend: Some(kind), device: a.device.clone(), threads: a.threads };
    dispatch(&args, kind, None, ModelRun { a, model: &model, spec, layers, x })
}

/// Reads `--input`: a `[T, H]` (or `[B, T, H]`) float tensor named by [`INPUT_KEYS`].
fn read_input(path: &std::path::Path, hidden: usize) -> CliResult<HostTensor> {
    let ck = Checkpoint::load(path)?;
    let names: Vec<&str> = ck.names().collect();
    let Some(key) = INPUT_KEYS.iter().find(|k| ck.contains(k)) else {
        return Err(CliError::flag(
            "--input",
            format!(
                "{} has no tensor `{}` (or `{}`) [tokens, {hidden}]; it holds: {}",
                path.display(),
                INPUT_KEYS[0],
                INPUT_KEYS[1],
                if names.is_empty() { "nothing".into() } else { names.join(", ") }
            ),
        ));
    };
    let t = ck.get(key)?.clone();
    let shape = t.shape().to_vec();
    let ok = matches!(shape[..], [s, h] | [_, s, h] if h == hidden && s > 0);
    if !ok || t.numel() == 0 {
        return Err(CliError::flag(
            "--input",
            format!(
                "tensor `{key}` of {}: expected shape [tokens, {hidden}] or [batch, tokens, {hidden}] (the model's hidden size), got {shape:?}",
                path.display()
            ),
        ));
    }
    if t.as_f32(key).is_err() {
        return Err(CliError::flag("--input", format!("tensor `{key}` of {}: not a float tensor", path.display())));
    }
    Ok(t)
}

struct ModelRun<'a> {
    a: &'a Args,
    model: &'a HfModel,
    spec: &'a str,
    layers: Vec<usize>,
    x: HostTensor,
}

/// What one layer's run measured.
struct LayerRun {
    layer: usize,
    load_s: f64,
    forward_s: f64,
    report: moe_engine::Report,
}

impl OnBackend for ModelRun<'_> {
    type Out = ExitCode;
    fn run<B: Backend>(self, kind: BackendKind, open: &(dyn Fn(usize) -> Result<B> + Sync)) -> CliResult<ExitCode> {
        let (a, model) = (self.a, self.model);
        let b = open(0)?;
        let dtype = a.dtype.dtype();
        let caps = b.capabilities();
        if !caps.storage_dtypes.contains(&dtype) {
            let have: Vec<String> = caps.storage_dtypes.iter().map(|d| d.to_string()).collect();
            return Err(CliError::flag(
                "--dtype",
                format!("backend {} stores {} weights, not {dtype}", b.name(), have.join(", ")),
            ));
        }
        let spec = model.spec()?;
        let tokens = self.x.numel() / spec.hidden;
        let steps = a.steps as usize;
        out!(
            "{} ({}) on {} ({}), {dtype} weights: {} MoE layer(s), {tokens} tokens of {} each, {} timed forward(s) per layer after one warm-up; every layer gets the same input",
            model.family().title(),
            model.dir().display(),
            kind.name(),
            caps.device,
            self.layers.len(),
            if a.input.is_some() { "given hidden states" } else { "seeded hidden states" },
            steps
        )?;
        let x = b.upload(&self.x)?;
        let bar = if std::io::stderr().is_terminal() {
            indicatif::ProgressBar::new(self.layers.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} MoE layers ({msg})")
                .expect("static template"),
        );
        let mut runs = Vec::new();
        for &l in &self.layers {
            bar.set_message(format!("layer {l}"));
            let layer_err = |e| CliError::model(format!("layer {l} of {}", self.spec), e);
            let t0 = Instant::now();
            let (ls, w) = model.load_layer(l).map_err(layer_err)?;
            let layer = MoeLayer::new(&b, ls, &w, dtype).map_err(layer_err)?;
            drop(w);
            let load_s = t0.elapsed().as_secs_f64();
            let run = time_layer(&b, &layer, &x, steps).map_err(layer_err)?;
            let r = LayerRun { layer: l, load_s, forward_s: run.0, report: run.1 };
            bar.suspend(|| print_layer(&r, spec.num_experts, tokens, steps))?;
            runs.push(r);
            bar.inc(1);
        }
        bar.finish_and_clear();
        let secs: f64 = runs.iter().map(|r| r.forward_s).sum();
        let dropped: i64 = runs.iter().map(|r| r.report.dropped_tokens).sum();
        out!(
            "all {} layer(s): {:.0} tokens/s through one layer on average ({:.3} s of forwards, {:.2} s loading); dropped tokens {dropped}",
            runs.len(),
            (runs.len() * steps * tokens) as f64 / secs.max(1e-12),
            secs,
            runs.iter().map(|r| r.load_s).sum::<f64>()
        )?;
        if let Some(path) = &a.svg {
            let loads: Vec<LayerLoad> = runs
                .iter()
                .map(|r| LayerLoad {
                    name: format!("layer {}", r.layer),
                    counts: r.report.exp_counts.clone(),
                    real: spec.num_experts,
                })
                .collect();
            let title = format!("{}: routes per expert, {tokens} tokens ({})", model.family().title(), self.spec);
            chart::write(path, &title, &loads)?;
            out!("wrote the expert-load chart to {}", path.display())?;
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// One warm-up forward (its report: the same input routes the same every time), then
/// `steps` timed ones, each waited for; returns their seconds and the report.
fn time_layer<B: Backend>(
    b: &B,
    layer: &MoeLayer<B>,
    x: &moe_engine::Tensor<B>,
    steps: usize,
) -> Result<(f64, moe_engine::Report)> {
    let opts = LayerOptions::default();
    let out = layer.forward(b, x, &opts)?;
    let report = out.report(b)?;
    b.download(&out.y)?;
    drop(out);
    let t0 = Instant::now();
    for _ in 0..steps {
        let out = layer.forward(b, x, &opts)?;
        b.download(&out.y)?;
    }
    Ok((t0.elapsed().as_secs_f64(), report))
}

/// The lines of one layer: throughput, load statistics over the real experts, drops.
fn print_layer(r: &LayerRun, real: usize, tokens: usize, steps: usize) -> CliResult<()> {
    let counts = &r.report.exp_counts;
    let experts = &counts[..real.min(counts.len())];
    let (lo, hi) = (experts.iter().min().copied().unwrap_or(0), experts.iter().max().copied().unwrap_or(0));
    let mean = experts.iter().sum::<i64>() as f64 / experts.len().max(1) as f64;
    let imbalance = if mean > 0.0 { hi as f64 / mean } else { 0.0 };
    let identity: i64 = counts.get(real..).map_or(0, |z| z.iter().sum());
    let zero = if counts.len() > real { format!(", {identity} to zero-compute experts") } else { String::new() };
    out!(
        "layer {}: {:.0} tokens/s ({steps} × {tokens} tokens in {:.2} ms; loaded in {:.2} s); routes per expert min {lo} / mean {mean:.2} / max {hi} (imbalance max/mean {imbalance:.2}{zero}); dropped tokens {}",
        r.layer,
        (steps * tokens) as f64 / r.forward_s.max(1e-12),
        r.forward_s * 1e3,
        r.load_s,
        r.report.dropped_tokens
    )?;
    // The whole vector where it fits a line; the chart (--svg) shows any size.
    if counts.len() <= 32 {
        out!("  routes per expert: {counts:?}")?;
    }
    Ok(())
}
