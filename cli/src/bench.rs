//! `moe bench layer`: times a random-weight Mixtral-style MoE layer forward.

use crate::backends::{dispatch, BackendArgs, BackendKind, OnBackend};
use crate::error::{CliError, CliResult};
use crate::out;
use moe_engine::config::{ExpertSpec, GateSpec, LayerSpec};
use moe_engine::error::human_bytes;
use moe_engine::parallel::{Communicator, ExpertParallel, TokenLayout, Transport};
use moe_engine::{stack, Activation, Backend, DType, Device, ExpertKind, HostTensor, LayerOptions, MoeLayer, Result};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// What to benchmark.
#[derive(clap::Subcommand)]
pub enum What {
    /// One MoE layer: SwiGLU experts, softmax top-k renormalised, no dropping (Mixtral).
    Layer(LayerArgs),
    /// The cpu's read bandwidth from memory and f32 FMA peak (the floors' denominators).
    Machine(crate::machine::MachineArgs),
}

/// Storage dtypes of the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightDtype {
    /// f32.
    F32,
    /// f16 (IEEE half), f32 accumulation.
    F16,
    /// bf16, f32 accumulation.
    Bf16,
}

impl WeightDtype {
    /// The engine's dtype.
    pub fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::F16 => DType::F16,
            WeightDtype::Bf16 => DType::BF16,
        }
    }
}

/// Arguments of `moe bench layer`.
#[derive(clap::Args)]
pub struct LayerArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// Hidden size.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    hidden: u64,
    /// Expert intermediate size.
    #[arg(long, default_value_t = 2816, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    ffn: u64,
    /// Number of experts.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1 << 16))]
    experts: u64,
    /// Routes per token, at most --experts.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1 << 16))]
    top_k: u64,
    /// Tokens per forward.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    tokens: u64,
    /// Storage dtype of the expert weights (the router is always f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: WeightDtype,
    /// Timed iterations (after 2 warm-up runs).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    iters: u64,
    /// In-process expert-parallel ranks (cpu): the experts are spread over N threads that
    /// all hold the batch, each with its share of the cores. Must divide --experts.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    ep: u64,
    /// Expert parallelism over NCCL across processes launched torchrun-style (RANK,
    /// WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), one GPU each; rank 0 reports.
    /// Needs --backend cuda.
    #[arg(long)]
    nccl: bool,
    /// Time a training step instead of a forward: forward (keeping activations),
    /// backward of `Σ y · dy` with `l_aux`, and an AdamW step over DeepSpeed's MoE
    /// parameter groups. The FLOP count is three forwards'.
    #[arg(long)]
    train: bool,
    /// A new seeded input every iteration (uploaded before the timer starts), so that a
    /// decode-sized forward routes to other experts each time and reads their weights from
    /// memory, as decoding does, rather than from the cache the last iteration filled.
    #[arg(long)]
    fresh_inputs: bool,
    /// Print where each forward's time went: the wall time of every op the layer called
    /// (`moe_engine::profile`), per forward, and its share (the JSON always has it). On
    /// wgpu and cuda an op's time is the time to enqueue it.
    #[arg(long)]
    profile: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs a benchmark.
pub fn run(w: What) -> CliResult<ExitCode> {
    match w {
        What::Layer(a) => layer(a),
        What::Machine(a) => crate::machine::run(a),
    }
}

impl LayerArgs {
    fn spec(&self) -> LayerSpec {
        LayerSpec {
            output_bias: false,
            hidden: self.hidden as usize,
            num_experts: self.experts as usize,
            gate: GateSpec::SoftmaxTopK { k: self.top_k as usize, normalize: true },
            expert: ExpertSpec {
                kind: ExpertKind::Glu { activation: Activation::Silu, clamp: None },
                ffn: self.ffn as usize,
                bias: false,
            },
            residual: false,
            shared: None,
        }
    }

    /// Bytes of the f32 activations of one forward: x, logits and scores, the permuted
    /// rows, the GLU intermediate and output, the expert outputs and y.
    fn activation_bytes(&self) -> u64 {
        let (t, h, e, k, f) = (self.tokens, self.hidden, self.experts, self.top_k, self.ffn);
        // Saturating: the flags allow products past 2⁶⁴, which no machine has anyway.
        let rows = t.saturating_mul(2 * h + 2 * e).saturating_add(t.saturating_mul(k).saturating_mul(2 * h + 3 * f));
        rows.saturating_mul(4)
    }

    /// The shape, for messages.
    fn shape(&self) -> String {
        format!(
            "--hidden {} --ffn {} --experts {} --top-k {} --tokens {}",
            self.hidden, self.ffn, self.experts, self.top_k, self.tokens
        )
    }
}

fn layer(a: LayerArgs) -> CliResult<ExitCode> {
    if a.top_k > a.experts {
        return Err(CliError::flag(
            "--top-k",
            format!("{} routes per token with only --experts {}", a.top_k, a.experts),
        ));
    }
    let kind = a.backend.backend.unwrap_or(BackendKind::Cpu);
    if a.ep > 1 {
        if !a.experts.is_multiple_of(a.ep) {
            return Err(CliError::flag("--ep", format!("{} ranks must divide --experts {}", a.ep, a.experts)));
        }
        if a.nccl {
            return Err(CliError::flag("--nccl", "takes its ranks from the launcher, not --ep"));
        }
    }
    if a.nccl && kind != BackendKind::Cuda {
        return Err(CliError::flag("--nccl", "needs --backend cuda"));
    }
    if a.train && a.fresh_inputs {
        return Err(CliError::flag("--fresh-inputs", "times forwards; a --train step runs on one fixed input"));
    }
    if a.train && a.dtype != WeightDtype::F32 {
        return Err(CliError::flag(
            "--dtype",
            "--train steps f32 weights (mixed-precision training is not in the bench yet)",
        ));
    }
    let spec = a.spec();
    spec.validate()?;
    // Before anything is allocated: the f32 weights are generated on the host (and, on the
    // cpu backend, copied into its own layout), the activations live where the backend runs.
    let weights = spec.weight_count()?.saturating_mul(4);
    let on_host = if kind == BackendKind::Cpu { 2 * weights + a.activation_bytes() } else { weights };
    moe_engine::memory::check_host(
        &format!("`moe bench layer {}` ({} of f32 weights on the host)", a.shape(), human_bytes(weights)),
        on_host,
    )?;
    if a.nccl {
        return layer_nccl(&a);
    }
    let per_rank = (a.ep > 1).then(|| {
        let cores = a
            .backend
            .threads
            .map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |t| t as usize);
        (cores / a.ep as usize).max(1)
    });
    dispatch(&a.backend, BackendKind::Cpu, per_rank, Bench { a: &a })
}

/// Forward (or training step) times and the part of each spent in the exchange, in ms;
/// with `--train`, the step's phases too.
struct Times {
    forward: Vec<f64>,
    exchange: Vec<f64>,
    /// Experts that received at least one route, per timed forward: the weights the
    /// forward had to read (the memory floor's bytes).
    touched: Vec<f64>,
    /// `--train`: (forward, backward, optimizer step) of every step.
    phases: Vec<[f64; 3]>,
    /// The ops of the timed forwards and their summed wall time (ms).
    ops: Vec<(&'static str, f64)>,
}

/// What a rank of `--ep` returns: rank 0 its times and device, the others nothing.
type RankResult = CliResult<Option<(Times, moe_engine::Capabilities)>>;

struct Bench<'a> {
    a: &'a LayerArgs,
}

impl OnBackend for Bench<'_> {
    type Out = ExitCode;
    fn run<B: Backend>(self, kind: BackendKind, open: &(dyn Fn(usize) -> Result<B> + Sync)) -> CliResult<ExitCode> {
        let a = self.a;
        if a.ep == 1 {
            let b = open(0)?;
            check_device(&b, a)?;
            let times = time_layer(&b, a, None)?;
            let caps = b.capabilities();
            let threads = if caps.threads > 0 { format!(" ({} threads)", caps.threads) } else { String::new() };
            return report(a, kind, caps, times, &threads);
        }
        let comms = moe_engine::parallel::in_process(a.ep as usize, std::time::Duration::from_secs(600));
        let results: Vec<RankResult> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let rank = c.rank();
                        let b = open(rank)?;
                        let times = time_layer(&b, a, Some(Arc::new(c)))?;
                        Ok((rank == 0).then(|| (times, b.capabilities().clone())))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(moe_engine::Error::Internal("a rank panicked".into()).into())))
                .collect()
        });
        let mut rank0 = None;
        for r in results {
            if let Some(x) = r? {
                rank0 = Some(x);
            }
        }
        let (times, caps) = rank0.ok_or_else(|| moe_engine::Error::Internal("rank 0 returned nothing".into()))?;
        let threads = if caps.threads > 0 { format!(" x {} threads", caps.threads) } else { String::new() };
        let setup = format!(" ({} in-process ranks{threads}, experts spread over ranks)", a.ep);
        report(a, kind, &caps, times, &setup)
    }
}

/// Refuses a dtype the backend does not store, and a forward that does not fit the
/// device's free memory, naming the flags.
fn check_device<B: Backend>(b: &B, a: &LayerArgs) -> CliResult<()> {
    let caps = b.capabilities();
    let dtype = a.dtype.dtype();
    if !caps.storage_dtypes.contains(&dtype) {
        let have: Vec<String> = caps.storage_dtypes.iter().map(|d| d.to_string()).collect();
        return Err(CliError::flag(
            "--dtype",
            format!("backend {} stores {} weights, not {dtype}", b.name(), have.join(", ")),
        ));
    }
    if b.name() != "cpu" {
        if let Some(free) = b.available_memory() {
            let need = a.spec().weight_count()?.saturating_mul(dtype.size() as u64) + a.activation_bytes();
            if need > free {
                return Err(moe_engine::Error::too_large(
                    format!("`moe bench layer {}` in {dtype} on {}", a.shape(), caps.device),
                    human_bytes(need),
                    format!("the {} free on the device", human_bytes(free)),
                )
                .into());
            }
        }
    }
    Ok(())
}

/// `--nccl`: this process is one rank of a torchrun-style job.
fn layer_nccl(a: &LayerArgs) -> CliResult<ExitCode> {
    let local = moe_engine::parallel::LaunchEnv::from_env()?.local_rank;
    let b = moe_cuda::CudaBackend::new(local)?;
    let comm = Arc::new(moe_cuda::NcclComm::from_env(&b, std::time::Duration::from_secs(300))?);
    check_device(&b, a)?;
    let (rank, size) = (comm.rank(), comm.size());
    let times = time_layer(&b, a, Some(comm))?;
    if rank != 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let setup = format!(" ({size} NCCL ranks, experts spread over ranks)");
    report(a, BackendKind::Cuda, b.capabilities(), times, &setup)
}

/// Forward times in ms (after two warm-up runs), and the part of each spent in the
/// exchange; with `comm`, this rank's part of an expert-parallel layer. A progress bar
/// shows on a terminal (rank 0).
fn time_layer<B: Backend>(b: &B, a: &LayerArgs, comm: Option<Arc<dyn Transport<B>>>) -> CliResult<Times> {
    let spec = a.spec();
    let dtype = a.dtype.dtype();
    let weights = stack::random_weights(&spec, 1)?;
    let leader = comm.as_ref().is_none_or(|c| c.rank() == 0);
    let layer = match (&comm, a.train) {
        (Some(c), train) => {
            let ep = ExpertParallel::deepspeed(c.clone(), spec.num_experts, TokenLayout::Replicated)?;
            if train {
                MoeLayer::new_ep_trainable(b, spec, &weights, ep)?
            } else {
                MoeLayer::new_ep(b, spec, &weights, dtype, ep)?
            }
        }
        (None, true) => MoeLayer::new_trainable(b, spec, &weights)?,
        (None, false) => MoeLayer::new(b, spec, &weights, dtype)?,
    };
    drop(weights);
    if a.train {
        return time_train(b, a, layer, comm);
    }
    let x = bench_input(b, a, 0)?;
    // The exchange time reported counts the exchange alone (a device sync before each step).
    let opts = LayerOptions { time_exchange: comm.is_some(), ..Default::default() };
    let iters = a.iters as usize;
    let bar = if leader { indicatif::ProgressBar::new((iters + 2) as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} forwards (2 warm-up)").expect("static template"),
    );
    let mut times =
        Times { forward: Vec::with_capacity(iters), exchange: vec![], touched: vec![], phases: vec![], ops: vec![] };
    for i in 0..iters + 2 {
        let fresh = if a.fresh_inputs { Some(bench_input(b, a, 100 + i as u32)?) } else { None };
        b.synchronize()?;
        if let Some(c) = &comm {
            c.barrier()?;
        }
        moe_engine::profile::start();
        let t0 = Instant::now();
        let out = layer.forward(b, fresh.as_ref().unwrap_or(&x), &opts)?;
        b.download(&out.y)?;
        let elapsed = t0.elapsed();
        let ops = moe_engine::profile::finish();
        if i >= 2 {
            times.forward.push(elapsed.as_secs_f64() * 1e3);
            for o in ops {
                let ms = o.total.as_secs_f64() * 1e3;
                match times.ops.iter_mut().find(|(n, _)| *n == o.op) {
                    Some((_, t)) => *t += ms,
                    None => times.ops.push((o.op, ms)),
                }
            }
            times.exchange.push(out.dispatch.exchange_time().as_secs_f64() * 1e3);
            let counts = out.report(b)?.exp_counts;
            times.touched.push(counts.iter().filter(|&&c| c > 0).count() as f64);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(times)
}

/// The bench's input `[T, H]`: uniforms in [-1, 1) from the Philox stream `stream`.
fn bench_input<B: Backend>(b: &B, a: &LayerArgs, stream: u32) -> Result<moe_engine::Tensor<B>> {
    let (t, h) = (a.tokens as usize, a.hidden as usize);
    let x: Vec<f32> = moe_engine::philox::noise(moe_engine::philox::NoiseKind::Uniform, 2, stream, t * h)
        .into_iter()
        .map(|u| 2.0 * u - 1.0)
        .collect();
    b.upload(&HostTensor::f32(&[t, h], x)?)
}

/// `--train`: times forward, backward and an AdamW step (each phase waited for).
fn time_train<B: Backend>(
    b: &B,
    a: &LayerArgs,
    mut layer: MoeLayer<B>,
    comm: Option<Arc<dyn Transport<B>>>,
) -> CliResult<Times> {
    use moe_engine::train::{Grouping, Hyper, Optimizer, OptimizerSpec};
    let leader = comm.as_ref().is_none_or(|c| c.rank() == 0);
    let (x, dy) = (bench_input(b, a, 0)?, bench_input(b, a, 1)?);
    let spec = OptimizerSpec::new(Hyper::adamw(1e-4));
    let mut opt = Optimizer::new(&mut layer, &spec, Grouping::DeepSpeed { ep_size: a.ep as usize })?;
    let fwd = LayerOptions { keep_activations: true, time_exchange: comm.is_some(), ..Default::default() };
    let bwd =
        moe_engine::BackwardOptions { losses: moe_engine::losses::LossCoefs { l_aux: 0.01, ..Default::default() } };
    let iters = a.iters as usize;
    let bar = if leader { indicatif::ProgressBar::new((iters + 2) as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} training steps (2 warm-up)")
            .expect("static template"),
    );
    let mut times = Times { forward: vec![], exchange: vec![], touched: vec![], phases: vec![], ops: vec![] };
    for i in 0..iters + 2 {
        if let Some(c) = &comm {
            c.barrier()?;
        }
        let t0 = Instant::now();
        let out = layer.forward(b, &x, &fwd)?;
        b.synchronize()?;
        let t1 = Instant::now();
        let grads = layer.backward(b, &out, &dy, &bwd)?;
        let exchange = out.dispatch.exchange_time();
        // The forward's activations are freed with the backward (as autograd frees its
        // graph during backward).
        drop(out);
        b.synchronize()?;
        let t2 = Instant::now();
        opt.step(b, &mut layer, grads)?;
        b.synchronize()?;
        let t3 = Instant::now();
        if i >= 2 {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            times.forward.push(ms(t3 - t0));
            times.exchange.push(ms(exchange));
            times.phases.push([ms(t1 - t0), ms(t2 - t1), ms(t3 - t2)]);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(times)
}

/// The median of `v` (sorted in place) and its minimum.
fn median_min(v: &mut [f64]) -> Option<(f64, f64)> {
    v.sort_by(f64::total_cmp);
    Some((*v.get(v.len() / 2)?, *v.first()?))
}

/// Prints median and min ms, tokens/s and GFLOP/s (or one JSON object).
fn report(
    a: &LayerArgs,
    kind: BackendKind,
    caps: &moe_engine::Capabilities,
    mut times: Times,
    setup: &str,
) -> CliResult<ExitCode> {
    let no_times = || moe_engine::Error::Internal("no timed iterations".into());
    let timed = times.forward.len().max(1) as f64;
    let mean = times.forward.iter().sum::<f64>() / timed;
    // Per forward: each op's mean time and its share of the mean forward.
    let ops: Vec<(&str, f64, f64)> = times.ops.iter().map(|&(op, t)| (op, t / timed, t / timed / mean)).collect();
    let (median, min) = median_min(&mut times.forward).ok_or_else(no_times)?;
    let (exchange, _) = median_min(&mut times.exchange).ok_or_else(no_times)?;
    // A training step's routes are not counted (its forward keeps every expert's weights busy).
    let touched = (!times.touched.is_empty()).then(|| times.touched.iter().sum::<f64>() / times.touched.len() as f64);
    // FLOPs of the expert products: 2 · tokens · k · (3 · hidden · ffn); a training step
    // does three times a forward's (the backward's two products per forward product).
    let passes = if a.train { 3.0 } else { 1.0 };
    let flops = passes * 2.0 * a.tokens as f64 * a.top_k as f64 * 3.0 * a.hidden as f64 * a.ffn as f64;
    let phase = |i: usize| {
        let mut v: Vec<f64> = times.phases.iter().map(|p| p[i]).collect();
        median_min(&mut v).map_or(0.0, |m| m.0)
    };
    let phases = [phase(0), phase(1), phase(2)];
    let tps = a.tokens as f64 / (median / 1e3);
    let gflops = flops / (median / 1e3) / 1e9;
    let dtype = a.dtype.dtype();
    if a.json {
        let v = serde_json::json!({
            "backend": kind.name(), "device": caps.device, "threads": caps.threads, "ep": a.ep, "dtype": dtype.to_string(),
            "hidden": a.hidden, "ffn": a.ffn, "experts": a.experts, "top_k": a.top_k, "tokens": a.tokens, "iters": a.iters,
            "median_ms": median, "min_ms": min, "tokens_per_s": tps, "gflops": gflops, "exchange_median_ms": exchange,
            "train": a.train, "forward_ms": phases[0], "backward_ms": phases[1], "step_ms": phases[2],
            "fresh_inputs": a.fresh_inputs, "experts_touched": touched,
            "ops": ops.iter().map(|(op, ms, share)| serde_json::json!({"op": op, "ms": ms, "share": share}))
                .collect::<Vec<_>>(),
        });
        out!("{v}")?;
    } else {
        out!(
            "{} on {}{setup}, H {} F {} E {} k {} T {} {dtype}",
            kind.name(),
            caps.device,
            a.hidden,
            a.ffn,
            a.experts,
            a.top_k,
            a.tokens
        )?;
        let what = if a.train { "training step" } else { "forward" };
        out!("{what}: median {median:.2} ms  min {min:.2} ms  {tps:.0} tokens/s  {gflops:.1} GFLOP/s")?;
        if let Some(t) = touched {
            let input = if a.fresh_inputs { "a new input each forward" } else { "the same input each forward" };
            out!("experts touched per forward: {t:.1} of {} ({input})", a.experts)?;
        }
        if a.train {
            out!(
                "  forward {:.2} ms, backward {:.2} ms, AdamW step {:.2} ms (medians)",
                phases[0],
                phases[1],
                phases[2]
            )?;
        }
        if a.profile && !ops.is_empty() {
            out!("where a forward's time went (mean of the timed forwards, {mean:.2} ms):")?;
            for (op, ms, share) in &ops {
                out!("  {op:<16} {ms:>9.3} ms  {:>5.1}%", 100.0 * share)?;
            }
            let rest = mean - ops.iter().map(|o| o.1).sum::<f64>();
            out!("  {:<16} {rest:>9.3} ms  {:>5.1}%", "(outside ops)", 100.0 * rest / mean)?;
        }
        if a.ep > 1 || a.nccl {
            let share = 100.0 * exchange / median;
            out!("exchange (count gather, all-to-all both ways, output gather) median {exchange:.2} ms, {share:.0}% of the forward")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
