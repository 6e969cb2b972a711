//! `moe run`: the built-in PR-MoE demo stack, or with `--model` a model folder's MoE
//! layers (`crate::model_run`).

use crate::backends::{dispatch, BackendArgs, BackendKind, OnBackend};
use crate::bench::WeightDtype;
use crate::error::CliResult;
use crate::model_run::LayerSel;
use crate::out;
use moe_engine::error::human_bytes;
use moe_engine::stack::{self, PrMoeShape};
use moe_engine::{Backend, DType, HostTensor, LayerOptions, MoeLayer, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// `--backend` of `moe run`: a backend, or the best one this machine has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RunBackend {
    /// CUDA when a device answers, else a real GPU through wgpu, else the cpu (a software
    /// adapter such as lavapipe is slower than the cpu backend, so never the automatic
    /// choice).
    Auto,
    /// The reference backend.
    Cpu,
    /// WGSL compute shaders through wgpu.
    Wgpu,
    /// CUDA.
    Cuda,
}

/// Arguments of `moe run`.
#[derive(clap::Args)]
pub struct Args {
    /// A model folder (`config.json` and safetensors, as transformers saves it) or a hub
    /// repo id `org/name[@revision]` already in the local HF hub cache: run its MoE layers
    /// instead of the demo stack.
    #[arg(long, value_name = "DIR")]
    pub model: Option<String>,
    /// With --model: the decoder layer to run (an MoE one), or `all` MoE layers.
    #[arg(long, default_value = "all", value_parser = crate::model_run::parse_layer, requires = "model")]
    pub layer: LayerSel,
    /// Backend.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: RunBackend,
    /// Device of the backend (see `moe info`).
    #[arg(long)]
    pub device: Option<String>,
    /// cpu worker threads (default: every core).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub threads: Option<u64>,
    /// Tokens per forward.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    pub tokens: u64,
    /// Forward passes through the whole stack; with --model, timed forwards per layer
    /// (after one warm-up).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub steps: u64,
    /// With --model: storage dtype of the expert weights (the router is always f32).
    #[arg(long, value_enum, default_value = "f32", requires = "model")]
    pub dtype: WeightDtype,
    /// With --model: the hidden states to run instead of seeded ones, a safetensors file
    /// holding `hidden_states` (or a golden case's `input/x`) shaped [tokens, hidden].
    #[arg(long, value_name = "FILE.safetensors", requires = "model", conflicts_with = "tokens")]
    pub input: Option<PathBuf>,
    /// With --model: seed of the hidden states (uniform in [-1, 1), Philox).
    #[arg(long, default_value_t = 0, requires = "model")]
    pub seed: u64,
    /// Write the expert load of every layer (routes per expert) as an SVG chart.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

/// The backend `--backend` names, `auto` resolved on this machine.
pub fn backend_kind(b: RunBackend) -> BackendKind {
    match b {
        RunBackend::Cpu => BackendKind::Cpu,
        RunBackend::Wgpu => BackendKind::Wgpu,
        RunBackend::Cuda => BackendKind::Cuda,
        RunBackend::Auto => {
            if moe_cuda::CudaBackend::new(0).is_ok() {
                BackendKind::Cuda
            } else if moe_wgpu::list_adapters().iter().any(|x| x.kind != "Cpu") {
                BackendKind::Wgpu
            } else {
                BackendKind::Cpu
            }
        }
    }
}

/// Runs the stack (or with `--model`, the model's MoE layers) and prints throughput,
/// per-layer expert load and dropped tokens.
pub fn run(a: Args) -> CliResult<ExitCode> {
    if let Some(spec) = &a.model {
        return crate::model_run::run(&a, spec);
    }
    let kind = backend_kind(a.backend);
    // Activations of one pass through a layer, f32: input, routing, permuted rows, the
    // expert intermediate and outputs (k = 1), the residual MLP.
    let shape = PrMoeShape::default();
    let (t, h, f) = (a.tokens, shape.hidden as u64, shape.ffn as u64);
    let max_e = shape.experts.iter().copied().max().unwrap_or(1) as u64;
    moe_engine::memory::check_host(
        &format!(
            "`moe run --tokens {}` ({} per layer of activations)",
            a.tokens,
            human_bytes(4 * t * (6 * h + 3 * f + 2 * max_e))
        ),
        4 * t * (6 * h + 3 * f + 2 * max_e),
    )?;
    let args = BackendArgs { backend: Some(kind), device: a.device.clone(), threads: a.threads };
    dispatch(&args, kind, None, Demo { a: &a, shape })
}

struct Demo<'a> {
    a: &'a Args,
    shape: PrMoeShape,
}

impl OnBackend for Demo<'_> {
    type Out = ExitCode;
    fn run<B: Backend>(self, kind: BackendKind, open: &(dyn Fn(usize) -> Result<B> + Sync)) -> CliResult<ExitCode> {
        let (a, shape) = (self.a, self.shape);
        let b = open(0)?;
        let (tokens, steps) = (a.tokens as usize, a.steps as usize);
        let specs = stack::specs(&shape);
        let layers: Vec<MoeLayer<B>> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| MoeLayer::new(&b, s.clone(), &stack::random_weights(s, 100 + i as u64)?, DType::F32))
            .collect::<Result<_>>()?;
        let caps = b.capabilities();
        out!(
            "PR-MoE demo stack on {} ({}): {} residual-MoE layers, experts per layer {:?}, hidden {}, ffn {}, top-{}",
            kind.name(),
            caps.device,
            layers.len(),
            shape.experts,
            shape.hidden,
            shape.ffn,
            shape.k
        )?;
        let bar = indicatif::ProgressBar::new(steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} forward passes").expect("static template"),
        );
        let mut reports = Vec::new();
        let t0 = Instant::now();
        for step in 0..steps {
            let x: Vec<f32> = moe_engine::philox::noise(
                moe_engine::philox::NoiseKind::Uniform,
                7,
                step as u32,
                tokens * shape.hidden,
            )
            .into_iter()
            .map(|u| 2.0 * u - 1.0)
            .collect();
            let mut h = b.upload(&HostTensor::f32(&[tokens, shape.hidden], x)?)?;
            let last = step + 1 == steps;
            for layer in &layers {
                let out = layer.forward(&b, &h, &LayerOptions::default())?;
                if last {
                    reports.push(out.report(&b)?);
                }
                // A transformer block adds the MoE output to its residual stream.
                h = b.add_gated(&h, &out.y, None)?;
            }
            b.download(&h)?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        out!(
            "throughput: {:.0} tokens/s through the stack ({} passes of {} tokens in {:.2} s)",
            (steps * tokens) as f64 / secs,
            steps,
            tokens,
            secs
        )?;
        out!("per-layer expert load (last pass; routes per expert before capacity), capacity, dropped:")?;
        let mut total_dropped = 0;
        for (i, r) in reports.iter().enumerate() {
            total_dropped += r.dropped_tokens;
            out!(
                "  layer {i}: E={:<3} load {:?}  capacity {}  dropped tokens {} ({:.1}%)  l_aux {:.4}",
                r.exp_counts.len(),
                r.exp_counts,
                r.capacity,
                r.dropped_tokens,
                100.0 * r.dropped_tokens as f64 / r.tokens as f64,
                r.losses.l_aux
            )?;
        }
        out!("dropped tokens in the last pass, all layers: {total_dropped} (their MoE output is 0; the residual MLP still carries them)")?;
        if let Some(path) = &a.svg {
            let loads: Vec<crate::chart::LayerLoad> = reports
                .iter()
                .enumerate()
                .map(|(i, r)| crate::chart::LayerLoad {
                    name: format!("layer {i}"),
                    counts: r.exp_counts.clone(),
                    real: r.exp_counts.len(),
                })
                .collect();
            let title = format!("PR-MoE demo stack: routes per expert before capacity, last pass of {tokens} tokens");
            crate::chart::write(path, &title, &loads)?;
            out!("wrote the expert-load chart to {}", path.display())?;
        }
        Ok(ExitCode::SUCCESS)
    }
}
