//! # moe-cpu
//!
//! The reference backend: every other backend is checked against it, and it is the laptop
//! fallback when no GPU is present. Routing and planning are written for clarity and
//! exactness (they are O(S·E) and never the bottleneck); the matrix products run on a
//! rayon pool, grouped over compact expert-major rows without padding: expert groups of a
//! few rows (decode) through the matrix-vector kernels of `matvec` (AVX-512F, AVX2 or
//! portable, found at run time), larger ones through the `gemm` crate. Weights are stored
//! K-major in f32, f16 or bf16; half weights stay 16-bit in memory and are widened to f32
//! inside the products, which accumulate in f32.
//!
//! Operands arrive checked by the trait's front doors (`moe_engine::ops`); this crate does
//! only the cpu's work.

mod affinity;
mod amx;
mod bf16dot;
mod buffer;
mod elementwise;
mod exchange;
mod experts;
mod grad;
mod malloc;
mod matmul;
mod matvec;
mod optim;
mod par;
mod plan;
mod route;
mod weights;

pub use buffer::{CpuBuffer, Half};
pub use malloc::retain_freed_memory;

use moe_engine::backend::Backend;
use moe_engine::device::{Capabilities, Device, UploadOp, WeightUploadOp};
use moe_engine::expert::ExpertKind;
use moe_engine::ops::{
    ActGradOp, BucketOp, BucketParts, CastWeightOp, CombineGrad, CombineGradOp, CombineOp, ElementwiseOp, GatedAddGrad,
    GatedAddGradOp, GroupedLinearOp, GroupedMlpOp, LinearDxOp, LinearOp, MixGrad, MixGradOp, MlpOutput, OptimStepOp,
    PassRowsOp, PermuteOp, PermuteScaledOp, PlanOp, PlanParts, RegroupOp, RouteGradOp, RouteOp, RouterStatsOp,
    RoutesParts, StepOut, SumRowsOp, SumSquaresOp, WeightGrad, WeightGradOp,
};
use moe_engine::tensor::HostData;
use moe_engine::{DType, Error, HostTensor, Result, Tensor};
use par::{Par, SMALL_OP};

/// The cpu backend: a rayon thread pool and host memory.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    caps: Capabilities,
    /// Tensors downloaded so far (what a forward reads back to the host, for the tests
    /// that prove it reads nothing, or only what it must).
    downloads: std::sync::atomic::AtomicU64,
}

impl CpuBackend {
    /// A backend with `threads` workers (`None`: one per available core, or the
    /// `RAYON_NUM_THREADS` environment variable). `Some(0)` is an error.
    pub fn new(threads: Option<usize>) -> Result<Self> {
        if threads == Some(0) {
            return Err(Error::config("threads", "a backend needs at least one thread"));
        }
        let threads = threads
            .or_else(|| std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse().ok()))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        // gemm copies ("packs") the weight operand into its panel layout only when a
        // product has more than threshold x 6 token rows (default 8 x 6). Expert weights
        // come cold from memory and each is used by a few dozen rows, so packing from 7
        // rows on pays: fine-grained E64/k6/T512 forward 90 -> 70 ms, Mixtral T32 26 ->
        // 22 ms, T512 unchanged (measured A/B on the 2-core dev VM). Process-wide setting.
        gemm::set_lhs_packing_threshold_single_thread(1);
        let mut builder = rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("moe-cpu-{i}"));
        // One pinned worker per CPU where the pool covers every CPU the process may use
        // (affinity.rs says why); a smaller pool, as tests and benches beside other work
        // make, is left to the scheduler.
        if let Some(cpus) = affinity::allowed_cpus()
            .filter(|c| c.len() == threads && std::env::var_os("MOE_CPU_PIN").is_none_or(|v| v != "0"))
        {
            // A refused pin leaves that worker to the scheduler, as with no pinning.
            builder = builder.start_handler(move |i| {
                affinity::pin_current(cpus[i]);
            });
        }
        let pool = builder.build().map_err(|e| Error::Backend {
            backend: "cpu".into(),
            msg: "thread pool".into(),
            source: Some(Box::new(e)),
        })?;
        let caps = Capabilities {
            backend: "cpu".into(),
            device: cpu_name(),
            // Half weights are stored as halves and widened in the products' kernels.
            storage_dtypes: vec![DType::F32, DType::F16, DType::BF16],
            // One tensor can take at most what the host has free: an op whose output is
            // larger is refused before it allocates, instead of ending in the OOM killer.
            max_buffer_bytes: moe_engine::memory::host_available().unwrap_or(u64::MAX).min(isize::MAX as u64),
            subgroups: false,
            threads,
            // Products with bf16 weights multiply bf16-rounded activations (weights.rs,
            // `Inputs`); f16 ones take f32 activations, which the f16 bound also holds.
            half_inputs: true,
            max_route_experts: None,
            max_route_groups: None,
        };
        Ok(CpuBackend { pool, caps, downloads: Default::default() })
    }

    /// As [`CpuBackend::new`], storing f32 weights only: the reference that the parity
    /// harness compares the cpu's own half-precision paths with (it multiplies the same
    /// values, rounded to the half type and held in f32).
    pub fn f32_reference(threads: Option<usize>) -> Result<Self> {
        let mut b = Self::new(threads)?;
        b.caps.storage_dtypes = vec![DType::F32];
        Ok(b)
    }

    /// The instruction set the cpu's matrix-vector kernels run with (found at run time).
    pub fn simd(&self) -> &'static str {
        matvec::Level::detected().name()
    }

    /// The f32 FMA rate (GFLOP/s) every worker thread together reaches with the
    /// instructions the kernels run with, over about `seconds`: the denominator of a
    /// compute floor. Each thread runs independent FMA chains from registers.
    pub fn fma_peak_gflops(&self, seconds: f64) -> f64 {
        let level = matvec::Level::detected();
        self.peak_gflops(&|iters| matvec::fma_probe(level, iters), seconds)
    }

    /// As [`CpuBackend::fma_peak_gflops`] for AVX-512 BF16's pair dot products, which the
    /// products with bf16 weights run with (4 FLOPs per lane per instruction): the compute
    /// floor's denominator for them. `None` where the cpu lacks the instruction.
    pub fn bf16_dot_peak_gflops(&self, seconds: f64) -> Option<f64> {
        bf16dot::available().then(|| self.peak_gflops(&|iters| bf16dot::dot_probe(iters).unwrap_or_default(), seconds))
    }

    /// As [`CpuBackend::fma_peak_gflops`] for AMX-BF16's tile products (`tdpbf16ps`,
    /// 16384 FLOPs each), which the products with bf16 weights run on where the cpu and OS
    /// have them: then the compute floor's denominator for them. `None` elsewhere.
    pub fn bf16_tile_peak_gflops(&self, seconds: f64) -> Option<f64> {
        amx::available().then(|| self.peak_gflops(&|iters| amx::tile_probe(iters).unwrap_or_default(), seconds))
    }

    /// The rate of `probe` (FLOPs done, a value depending on them) on every worker thread
    /// at once, over about `seconds`.
    fn peak_gflops(&self, probe: &(dyn Fn(usize) -> (f64, f32) + Sync), seconds: f64) -> f64 {
        // Calibrate the rounds per thread on one short run, then time all threads.
        let t0 = std::time::Instant::now();
        let (flops, _) = probe(1 << 16);
        let rate = flops / t0.elapsed().as_secs_f64().max(1e-9);
        let iters = ((rate * seconds.max(1e-3)) / flops * f64::from(1 << 16)) as usize;
        let t0 = std::time::Instant::now();
        let total: f64 = self
            .pool
            .broadcast(|_| {
                let (f, check) = probe(iters.max(1));
                std::hint::black_box(check);
                f
            })
            .into_iter()
            .sum();
        total / t0.elapsed().as_secs_f64() / 1e9
    }

    /// Runs op `f` on the pool's threads, or where `small` on the calling thread in order
    /// ([`par`]: the handoff costs more than such an op).
    fn on_pool<R: Send>(&self, small: bool, f: impl FnOnce(Par) -> R + Send) -> R {
        if small {
            f(Par(false))
        } else {
            self.pool.install(|| f(Par(true)))
        }
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.caps.threads
    }

    /// Tensors downloaded from this backend so far.
    pub fn downloads(&self) -> u64 {
        self.downloads.load(std::sync::atomic::Ordering::Relaxed)
    }
}

pub(crate) type T = Tensor<CpuBackend>;

pub(crate) fn f32s<'a>(t: &'a T, name: &str) -> Result<&'a [f32]> {
    match t.buffer() {
        CpuBuffer::F32(v) => Ok(v),
        CpuBuffer::I32(_) => Err(Error::dtype(name, "f32", "i32")),
        CpuBuffer::WeightT { .. } | CpuBuffer::WeightHalf { .. } | CpuBuffer::WeightTiles { .. } => {
            Err(Error::Misuse(format!("tensor `{name}` is an uploaded weight; only matrix products read it")))
        }
    }
}

pub(crate) fn i32s<'a>(t: &'a T, name: &str) -> Result<&'a [i32]> {
    match t.buffer() {
        CpuBuffer::I32(v) => Ok(v),
        CpuBuffer::F32(_) | CpuBuffer::WeightT { .. } => Err(Error::dtype(name, "i32", "f32")),
        CpuBuffer::WeightHalf { half, .. } => Err(Error::dtype(name, "i32", half.dtype())),
        CpuBuffer::WeightTiles { .. } => Err(Error::dtype(name, "i32", DType::BF16)),
    }
}

pub(crate) fn tf32(shape: &[usize], v: Vec<f32>) -> Result<T> {
    T::from_parts(CpuBuffer::F32(v), shape.to_vec(), DType::F32)
}

pub(crate) fn ti32(shape: &[usize], v: Vec<i32>) -> Result<T> {
    T::from_parts(CpuBuffer::I32(v), shape.to_vec(), DType::I32)
}

impl Device for CpuBackend {
    type Buffer = CpuBuffer;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn available_memory(&self) -> Option<u64> {
        moe_engine::memory::host_available()
    }

    fn run_upload(&self, op: &UploadOp<'_>) -> Result<T> {
        let t = op.tensor;
        match t.data() {
            HostData::F32(v) => tf32(t.shape(), v.clone()),
            HostData::I32(v) => ti32(t.shape(), v.clone()),
        }
    }

    fn run_upload_weight(&self, op: &WeightUploadOp<'_>) -> Result<T> {
        let (_, n, k) = op.dims;
        let v = op.tensor.as_f32("weight")?;
        weight_buffer(buffer::transpose_stack(v, n, k), op.dtype, (n, k), op.tensor.shape())
    }

    fn run_download(&self, t: &T) -> Result<HostTensor> {
        self.downloads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match t.buffer() {
            CpuBuffer::F32(v) => HostTensor::f32(t.shape(), v[..t.numel()].to_vec()),
            CpuBuffer::I32(v) => HostTensor::i32(t.shape(), v[..t.numel()].to_vec()),
            // Transposing the stored [k, n] matrices gives back [n, k], whatever the
            // handle's shape says.
            CpuBuffer::WeightT { data, n, k } => HostTensor::f32(t.shape(), buffer::transpose_stack(data, *k, *n)),
            // Half weights come back as their f32 values (exact), in the logical layout.
            CpuBuffer::WeightHalf { data, half, n, k } => {
                let mut wide = vec![0f32; data.len()];
                half.decode_into(data, &mut wide);
                HostTensor::f32(t.shape(), buffer::transpose_stack(&wide, *k, *n))
            }
            CpuBuffer::WeightTiles { data, n, k } => {
                let bits = amx::Layout { n: *n, k: *k }.untiled(data);
                let mut wide = vec![0f32; bits.len()];
                Half::Bf16.decode_into(&bits, &mut wide);
                HostTensor::f32(t.shape(), buffer::transpose_stack(&wide, *k, *n))
            }
        }
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn run_linear(&self, op: &LinearOp<'_, Self>) -> Result<T> {
        let d = op.dims;
        self.on_pool(d.rows * d.n * d.k < matmul::SERIAL_WORK, |par| {
            matmul::linear(op, if par.0 { self.threads() } else { 1 })
        })
    }

    fn run_grouped_linear(&self, op: &GroupedLinearOp<'_, Self>) -> Result<T> {
        self.pool.install(|| matmul::grouped_linear(op, self.threads()))
    }

    fn run_grouped_mlp(&self, op: &GroupedMlpOp<'_, Self>) -> Result<MlpOutput<Self>> {
        let w = op.weights;
        let ExpertKind::Glu { activation, clamp } = w.kind else {
            return self.grouped_mlp_unfused(op);
        };
        let (h, pre) = self.pool.install(|| experts::grouped_glu(op, activation, clamp, self.threads()))?;
        let w_out = w.w_out.ok_or_else(|| Error::Internal("checked GLU experts without w_out".into()))?;
        let y = self.grouped_linear(&h, op.offsets, w_out, w.b_out)?;
        Ok(MlpOutput { pre, y })
    }

    fn run_elementwise(&self, op: &ElementwiseOp<'_, Self>) -> Result<T> {
        self.on_pool(op.a.numel() < SMALL_OP, |par| elementwise::run(op, par))
    }

    fn run_route(&self, op: &RouteOp<'_, Self>) -> Result<RoutesParts<Self>> {
        self.on_pool(op.tokens * op.experts < SMALL_OP, |par| route::route(op, par))
    }

    fn run_plan(&self, op: &PlanOp<'_, Self>) -> Result<PlanParts<Self>> {
        plan::plan(op)
    }

    fn run_permute(&self, op: &PermuteOp<'_, Self>) -> Result<T> {
        self.on_pool(op.out_shape[0] * op.out_shape[1] < SMALL_OP, |par| elementwise::permute(op, par))
    }

    fn run_combine(&self, op: &CombineOp<'_, Self>) -> Result<T> {
        let work = op.out_shape[0] * op.out_shape[1] * op.rows.k();
        self.on_pool(work < SMALL_OP, |par| elementwise::combine(op, par))
    }

    fn run_permute_scaled(&self, op: &PermuteScaledOp<'_, Self>) -> Result<T> {
        self.on_pool(op.out_shape[0] * op.out_shape[1] < SMALL_OP, |par| elementwise::permute_scaled(op, par))
    }

    fn run_pass_rows(&self, op: &PassRowsOp<'_, Self>) -> Result<T> {
        elementwise::pass_rows(op)
    }

    fn run_bucket(&self, op: &BucketOp<'_, Self>) -> Result<BucketParts<Self>> {
        exchange::bucket(op)
    }

    fn run_regroup(&self, op: &RegroupOp<'_, Self>) -> Result<T> {
        self.on_pool(op.out_shape[0] * op.out_shape[1] < SMALL_OP, |par| exchange::regroup(op, par))
    }

    fn run_router_stats(&self, op: &RouterStatsOp<'_, Self>) -> Result<T> {
        route::router_stats(op)
    }

    fn run_linear_dx(&self, op: &LinearDxOp<'_, Self>) -> Result<T> {
        self.pool.install(|| grad::linear_dx(op, self.threads()))
    }

    fn run_weight_grad(&self, op: &WeightGradOp<'_, Self>) -> Result<WeightGrad<Self>> {
        self.pool.install(|| grad::weight_grad(op, self.threads()))
    }

    fn run_act_grad(&self, op: &ActGradOp<'_, Self>) -> Result<T> {
        self.pool.install(|| grad::act_grad(op))
    }

    fn run_sum_rows(&self, op: &SumRowsOp<'_, Self>) -> Result<T> {
        grad::sum_rows(op)
    }

    fn run_combine_grad(&self, op: &CombineGradOp<'_, Self>) -> Result<CombineGrad<Self>> {
        grad::combine_grad(op)
    }

    fn run_route_grad(&self, op: &RouteGradOp<'_, Self>) -> Result<T> {
        self.pool.install(|| grad::route_grad(op))
    }

    fn run_mix_grad(&self, op: &MixGradOp<'_, Self>) -> Result<MixGrad<Self>> {
        grad::mix_grad(op)
    }

    fn run_gated_add_grad(&self, op: &GatedAddGradOp<'_, Self>) -> Result<GatedAddGrad<Self>> {
        grad::gated_add_grad(op)
    }

    /// The values in the weight layout `upload_weight` makes, each matrix transposed to
    /// `[K, N]`, in the op's storage dtype.
    fn run_cast_weight(&self, op: &CastWeightOp<'_, Self>) -> Result<T> {
        let (_, n, k) = op.dims;
        let data = match op.x.buffer() {
            CpuBuffer::F32(v) => buffer::transpose_stack(&v[..op.x.numel()], n, k),
            CpuBuffer::WeightT { data, n: wn, k: wk } if (*wn, *wk) == (n, k) => data.clone(),
            // A weight handle reshaped to other matrices: back to its logical values first.
            CpuBuffer::WeightT { data, n: wn, k: wk } => {
                buffer::transpose_stack(&buffer::transpose_stack(data, *wk, *wn), n, k)
            }
            CpuBuffer::I32(_) | CpuBuffer::WeightHalf { .. } | CpuBuffer::WeightTiles { .. } => {
                return Err(Error::Internal("a checked cast_weight input is not f32".into()))
            }
        };
        weight_buffer(data, op.dtype, (n, k), op.x.shape())
    }

    fn run_optim_step(&self, op: &OptimStepOp<'_, Self>) -> Result<StepOut<Self>> {
        self.pool.install(|| optim::optim_step(op))
    }

    fn run_optim_step_in_place(
        &self,
        _params: &moe_engine::kernel_abi::OptimParams,
        rule: moe_engine::ops::StepRule,
        param: &mut T,
        grad: &T,
        m: Option<&mut T>,
        v: Option<&mut T>,
    ) -> Result<bool> {
        self.pool.install(|| optim::optim_step_in_place(rule, param, grad, m, v))
    }

    fn run_sum_squares(&self, op: &SumSquaresOp<'_, Self>) -> Result<T> {
        optim::sum_squares(op)
    }
}

/// A weight tensor of logical `shape` from its matrices already transposed to `[K, N]`
/// (`data`, f32), stored in `dtype`: f32 as is, f16 / bf16 rounded to nearest even; bf16
/// in the tile layout where the cpu runs the AMX kernels; read once after it is written
/// ([`buffer::read_once`]).
fn weight_buffer(data: Vec<f32>, dtype: DType, (n, k): (usize, usize), shape: &[usize]) -> Result<T> {
    let buf = match Half::of(dtype) {
        None => CpuBuffer::WeightT { data, n, k },
        Some(Half::Bf16) if amx::available() => {
            CpuBuffer::WeightTiles { data: amx::Layout { n, k }.tiled(&dtype.half_bits(&data)?), n, k }
        }
        Some(half) => CpuBuffer::WeightHalf { data: dtype.half_bits(&data)?, half, n, k },
    };
    match &buf {
        CpuBuffer::WeightT { data, .. } => buffer::read_once(data),
        CpuBuffer::WeightHalf { data, .. } | CpuBuffer::WeightTiles { data, .. } => buffer::read_once(data),
        CpuBuffer::F32(_) | CpuBuffer::I32(_) => {}
    }
    T::from_parts(buf, shape.to_vec(), dtype)
}

/// The processor's model name from /proc/cpuinfo, or a generic name.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
