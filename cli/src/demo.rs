//! `moe run`: the built-in PR-MoE demo stack.

use moe_engine::stack::{self, PrMoeShape};
use moe_engine::{Backend, DType, ForwardOptions, HostTensor, MoeLayer};
use std::process::ExitCode;
use std::time::Instant;

/// Arguments of `moe run`.
#[derive(clap::Args)]
pub struct Args {
    /// Backend (`auto`: the best available).
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Tokens per forward.
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
    /// Forward passes through the whole stack.
    #[arg(long, default_value_t = 8)]
    steps: usize,
}

/// Runs the stack and prints throughput, per-layer expert load and dropped tokens.
pub fn run(a: Args) -> Result<ExitCode, String> {
    // `auto`: CUDA when a device answers, else a real GPU through wgpu; a software adapter (lavapipe) is
    // slower than the cpu backend, so it is never the automatic choice.
    let name = if a.backend == "auto" {
        let gpu = moe_wgpu::list_adapters().iter().any(|x| x.kind != "Cpu");
        if moe_cuda::CudaBackend::new(0).is_ok() {
            "cuda"
        } else if gpu {
            "wgpu"
        } else {
            "cpu"
        }
        .to_string()
    } else {
        a.backend.clone()
    };
    crate::check_backend(&name)?;
    match name.as_str() {
        "wgpu" => run_on(&moe_wgpu::WgpuBackend::new(None).map_err(|e| e.to_string())?, &name, &a),
        "cuda" => run_on(&moe_cuda::CudaBackend::new(0).map_err(|e| e.to_string())?, &name, &a),
        _ => run_on(&moe_cpu::CpuBackend::new(None).map_err(|e| e.to_string())?, &name, &a),
    }
}

fn run_on<B: Backend>(b: &B, name: &str, a: &Args) -> Result<ExitCode, String> {
    let err = |e: moe_engine::Error| e.to_string();
    let shape = PrMoeShape::default();
    let specs = stack::specs(&shape);
    let layers: Vec<MoeLayer<_>> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            MoeLayer::new(b, s.clone(), &stack::random_weights(s, 100 + i as u64).map_err(err)?, DType::F32)
                .map_err(err)
        })
        .collect::<Result<_, _>>()?;
    let caps = b.capabilities();
    println!(
        "PR-MoE demo stack on {} ({}): {} residual-MoE layers, experts per layer {:?}, hidden {}, ffn {}, top-{}",
        name,
        caps.device,
        layers.len(),
        shape.experts,
        shape.hidden,
        shape.ffn,
        shape.k
    );
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} forward passes").expect("static template"),
    );
    let mut reports = Vec::new();
    let t0 = Instant::now();
    for step in 0..a.steps {
        let x: Vec<f32> =
            moe_engine::philox::noise(moe_engine::philox::NoiseKind::Uniform, 7, step as u32, a.tokens * shape.hidden)
                .into_iter()
                .map(|u| 2.0 * u - 1.0)
                .collect();
        let mut h = b.upload(&HostTensor::f32(&[a.tokens, shape.hidden], x).map_err(err)?).map_err(err)?;
        let last = step + 1 == a.steps;
        for layer in &layers {
            let out = layer.forward(b, &h, &ForwardOptions::default()).map_err(err)?;
            if last {
                reports.push(out.report(b).map_err(err)?);
            }
            // A transformer block adds the MoE output to its residual stream.
            h = b.add_gated(&h, &out.y, None).map_err(err)?;
        }
        b.download(&h).map_err(err)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "throughput: {:.0} tokens/s through the stack ({} passes of {} tokens in {:.2} s)",
        (a.steps * a.tokens) as f64 / secs,
        a.steps,
        a.tokens,
        secs
    );
    println!("per-layer expert load (last pass; routes per expert before capacity), capacity, dropped:");
    let mut total_dropped = 0;
    for (i, r) in reports.iter().enumerate() {
        total_dropped += r.dropped_tokens;
        println!(
            "  layer {i}: E={:<3} load {:?}  capacity {}  dropped tokens {} ({:.1}%)  l_aux {:.4}",
            r.exp_counts.len(),
            r.exp_counts,
            r.capacity,
            r.dropped_tokens,
            100.0 * r.dropped_tokens as f64 / r.tokens as f64,
            r.losses.l_aux
        );
    }
    println!("dropped tokens in the last pass, all layers: {total_dropped} (their MoE output is 0; the residual MLP still carries them)");
    Ok(ExitCode::SUCCESS)
}
