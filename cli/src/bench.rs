//! `moe bench layer`: times a random-weight Mixtral-style MoE layer forward.

use moe_engine::backend::Activation;
use moe_engine::config::{ExpertKind, ExpertSpec, GateSpec, LayerSpec};
use moe_engine::{stack, Backend, DType, ForwardOptions, HostTensor, MoeLayer};
use std::process::ExitCode;
use std::time::Instant;

/// What to benchmark.
#[derive(clap::Subcommand)]
pub enum What {
    /// One MoE layer: SwiGLU experts, softmax top-k renormalised, no dropping (Mixtral).
    Layer(LayerArgs),
}

/// Arguments of `moe bench layer`.
#[derive(clap::Args)]
pub struct LayerArgs {
    /// Backend.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Hidden size.
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    /// Expert intermediate size.
    #[arg(long, default_value_t = 2816)]
    ffn: usize,
    /// Number of experts.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Routes per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Tokens per forward.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Weight dtype.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed iterations (after 2 warm-up runs).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Device of the backend: an adapter index or name fragment (see `moe info`).
    #[arg(long)]
    device: Option<String>,
    /// cpu worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs a benchmark.
pub fn run(w: What) -> Result<ExitCode, String> {
    match w {
        What::Layer(a) => layer(a),
    }
}

fn layer(a: LayerArgs) -> Result<ExitCode, String> {
    crate::check_backend(&a.backend)?;
    match a.backend.as_str() {
        "wgpu" => layer_on(&moe_wgpu::WgpuBackend::new(a.device.as_deref()).map_err(|e| e.to_string())?, &a),
        "cuda" => layer_on(
            &moe_cuda::CudaBackend::new(crate::cuda_device(a.device.as_deref())?).map_err(|e| e.to_string())?,
            &a,
        ),
        _ => layer_on(&moe_cpu::CpuBackend::new(a.threads).map_err(|e| e.to_string())?, &a),
    }
}

fn layer_on<B: Backend>(b: &B, a: &LayerArgs) -> Result<ExitCode, String> {
    let dtype: DType = a.dtype.parse().map_err(|e: moe_engine::Error| e.to_string())?;
    let spec = LayerSpec {
        hidden: a.hidden,
        num_experts: a.experts,
        gate: GateSpec::SoftmaxTopK { k: a.top_k, normalize: true },
        expert: ExpertSpec { kind: ExpertKind::Glu { activation: Activation::Silu }, ffn: a.ffn, bias: false },
        residual: false,
        shared: None,
    };
    let err = |e: moe_engine::Error| e.to_string();
    let weights = stack::random_weights(&spec, 1).map_err(err)?;
    let layer = MoeLayer::new(b, spec, &weights, dtype).map_err(err)?;
    let x: Vec<f32> = moe_engine::philox::noise(moe_engine::philox::NoiseKind::Uniform, 2, 0, a.tokens * a.hidden)
        .into_iter()
        .map(|u| 2.0 * u - 1.0)
        .collect();
    let x = b.upload(&HostTensor::f32(&[a.tokens, a.hidden], x).map_err(err)?).map_err(err)?;
    let opts = ForwardOptions::default();
    let mut times = Vec::with_capacity(a.iters);
    for i in 0..a.iters + 2 {
        let t0 = Instant::now();
        let out = layer.forward(b, &x, &opts).map_err(err)?;
        b.download(&out.y).map_err(err)?;
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|p, q| p.partial_cmp(q).expect("finite times"));
    let median = times[times.len() / 2];
    let min = times[0];
    // FLOPs of the expert products: 2 · tokens · k · (3 · hidden · ffn).
    let flops = 2.0 * a.tokens as f64 * a.top_k as f64 * 3.0 * a.hidden as f64 * a.ffn as f64;
    let tps = a.tokens as f64 / (median / 1e3);
    let gflops = flops / (median / 1e3) / 1e9;
    let caps = b.capabilities();
    if a.json {
        let v = serde_json::json!({
            "backend": a.backend, "device": caps.device, "threads": caps.threads, "dtype": a.dtype,
            "hidden": a.hidden, "ffn": a.ffn, "experts": a.experts, "top_k": a.top_k, "tokens": a.tokens, "iters": a.iters,
            "median_ms": median, "min_ms": min, "tokens_per_s": tps, "gflops": gflops,
        });
        println!("{v}");
    } else {
        let threads = if caps.threads > 0 { format!(" ({} threads)", caps.threads) } else { String::new() };
        println!(
            "{} on {}{threads}, H {} F {} E {} k {} T {} {}",
            a.backend, caps.device, a.hidden, a.ffn, a.experts, a.top_k, a.tokens, a.dtype
        );
        println!("median {median:.2} ms  min {min:.2} ms  {tps:.0} tokens/s  {gflops:.1} GFLOP/s");
    }
    Ok(ExitCode::SUCCESS)
}
