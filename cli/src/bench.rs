//! `moe bench layer`: times a random-weight Mixtral-style MoE layer forward.

use moe_engine::backend::Activation;
use moe_engine::config::{ExpertKind, ExpertSpec, GateSpec, LayerSpec};
use moe_engine::parallel::Communicator;
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
    /// In-process expert-parallel ranks (cpu): the experts are spread over N threads that
    /// all hold the batch, each with its share of the cores.
    #[arg(long, default_value_t = 1)]
    ep: usize,
    /// Expert parallelism over NCCL across processes launched torchrun-style (RANK,
    /// WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), one GPU each; rank 0 reports.
    #[arg(long)]
    nccl: bool,
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
    if a.ep > 1 {
        return layer_ep(&a);
    }
    if a.nccl {
        let comm = moe_cuda::NcclComm::from_env(std::time::Duration::from_secs(300)).map_err(|e| e.to_string())?;
        let local = moe_engine::parallel::LaunchEnv::from_env().map_err(|e| e.to_string())?.local_rank;
        let b = moe_cuda::CudaBackend::new(local).map_err(|e| e.to_string())?;
        let times = time_layer(&b, &a, Some(&comm))?;
        if comm.rank() != 0 {
            return Ok(ExitCode::SUCCESS);
        }
        let setup = format!(" ({} NCCL ranks, experts spread over ranks)", comm.size());
        return report(&a, &b.capabilities(), times, &setup);
    }
    match a.backend.as_str() {
        "wgpu" => layer_on(&moe_wgpu::WgpuBackend::new(a.device.as_deref()).map_err(|e| e.to_string())?, &a),
        "cuda" => layer_on(
            &moe_cuda::CudaBackend::new(crate::cuda_device(a.device.as_deref())?).map_err(|e| e.to_string())?,
            &a,
        ),
        _ => layer_on(&moe_cpu::CpuBackend::new(a.threads).map_err(|e| e.to_string())?, &a),
    }
}

/// What a rank of `--ep` returns: rank 0 its times and device, the others nothing.
type RankResult = Result<Option<(Vec<f64>, moe_engine::Capabilities)>, String>;

/// `--ep N`: N cpu ranks as threads; rank 0 reports.
fn layer_ep(a: &LayerArgs) -> Result<ExitCode, String> {
    if a.backend != "cpu" {
        return Err(format!("--ep runs in-process cpu ranks; got --backend {}", a.backend));
    }
    moe_engine::parallel::EpLayout::new(a.experts, 0, a.ep).map_err(|e| e.to_string())?;
    let cores = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let per_rank = (cores / a.ep).max(1);
    let comms = moe_engine::parallel::in_process(a.ep, std::time::Duration::from_secs(600));
    let results: Vec<RankResult> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let b = moe_cpu::CpuBackend::new(Some(per_rank)).map_err(|e| e.to_string())?;
                    let rank = moe_engine::parallel::Communicator::rank(&c);
                    let times = time_layer(&b, a, Some(&c))?;
                    Ok((rank == 0).then(|| (times, b.capabilities())))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a rank panicked".into()))).collect()
    });
    let mut report_of = None;
    for r in results {
        if let Some(x) = r? {
            report_of = Some(x);
        }
    }
    let (times, caps) = report_of.ok_or("rank 0 returned nothing")?;
    report(a, &caps, times, &format!(" ({} ranks x {per_rank} threads, experts spread over ranks)", a.ep))
}

fn layer_on<B: Backend>(b: &B, a: &LayerArgs) -> Result<ExitCode, String> {
    let times = time_layer(b, a, None)?;
    let caps = b.capabilities();
    let threads = if caps.threads > 0 { format!(" ({} threads)", caps.threads) } else { String::new() };
    report(a, &caps, times, &threads)
}

/// Forward times in ms (after two warm-up runs); with `comm`, this rank's part of an
/// expert-parallel layer.
fn time_layer<B: Backend>(
    b: &B,
    a: &LayerArgs,
    comm: Option<&dyn moe_engine::parallel::Communicator>,
) -> Result<Vec<f64>, String> {
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
    let layer = match comm {
        Some(c) => {
            let layout = moe_engine::parallel::EpLayout::new(a.experts, c.rank(), c.size()).map_err(err)?;
            MoeLayer::new_ep(b, spec, &weights, dtype, layout).map_err(err)?
        }
        None => MoeLayer::new(b, spec, &weights, dtype).map_err(err)?,
    };
    let x: Vec<f32> = moe_engine::philox::noise(moe_engine::philox::NoiseKind::Uniform, 2, 0, a.tokens * a.hidden)
        .into_iter()
        .map(|u| 2.0 * u - 1.0)
        .collect();
    let x = b.upload(&HostTensor::f32(&[a.tokens, a.hidden], x).map_err(err)?).map_err(err)?;
    let opts = ForwardOptions::default();
    let mut times = Vec::with_capacity(a.iters);
    for i in 0..a.iters + 2 {
        if let Some(c) = comm {
            c.barrier().map_err(err)?;
        }
        let t0 = Instant::now();
        let out = match comm {
            Some(c) => layer.forward_ep(b, &x, &opts, c, moe_engine::parallel::TokenLayout::Replicated),
            None => layer.forward(b, &x, &opts),
        }
        .map_err(err)?;
        b.download(&out.y).map_err(err)?;
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

/// Prints median and min ms, tokens/s and GFLOP/s (or one JSON object).
fn report(
    a: &LayerArgs,
    caps: &moe_engine::Capabilities,
    mut times: Vec<f64>,
    setup: &str,
) -> Result<ExitCode, String> {
    times.sort_by(|p, q| p.partial_cmp(q).expect("finite times"));
    let median = times[times.len() / 2];
    let min = times[0];
    // FLOPs of the expert products: 2 · tokens · k · (3 · hidden · ffn).
    let flops = 2.0 * a.tokens as f64 * a.top_k as f64 * 3.0 * a.hidden as f64 * a.ffn as f64;
    let tps = a.tokens as f64 / (median / 1e3);
    let gflops = flops / (median / 1e3) / 1e9;
    if a.json {
        let v = serde_json::json!({
            "backend": a.backend, "device": caps.device, "threads": caps.threads, "ep": a.ep, "dtype": a.dtype,
            "hidden": a.hidden, "ffn": a.ffn, "experts": a.experts, "top_k": a.top_k, "tokens": a.tokens, "iters": a.iters,
            "median_ms": median, "min_ms": min, "tokens_per_s": tps, "gflops": gflops,
        });
        println!("{v}");
    } else {
        println!(
            "{} on {}{setup}, H {} F {} E {} k {} T {} {}",
            a.backend, caps.device, a.hidden, a.ffn, a.experts, a.top_k, a.tokens, a.dtype
        );
        println!("median {median:.2} ms  min {min:.2} ms  {tps:.0} tokens/s  {gflops:.1} GFLOP/s");
    }
    Ok(ExitCode::SUCCESS)
}
