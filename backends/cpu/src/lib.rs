//! # moe-cpu
//!
//! The reference backend: every other backend is checked against it, and it is the laptop
//! fallback when no GPU is present. Routing and planning are written for clarity and
//! exactness (they are O(S·E) and never the bottleneck); the matrix products go through the
//! `gemm` crate and run on a rayon pool, grouped over compact expert-major rows without
//! padding.

mod buffer;
mod elementwise;
mod experts;
mod matmul;
mod plan;
mod route;

pub use buffer::CpuBuffer;

use moe_engine::backend::{
    grouped_mlp_unfused, Activation, Backend, Capabilities, MlpOutput, MlpWeights, Plan, PlanSpec, RouteSpec, Routes,
};
use moe_engine::config::ExpertKind;
use moe_engine::{DType, Error, HostTensor, Result, Tensor};

/// The cpu backend: a rayon thread pool and host memory.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl CpuBackend {
    /// A backend with `threads` workers (`None`: one per available core, or the
    /// `RAYON_NUM_THREADS` environment variable).
    pub fn new(threads: Option<usize>) -> Result<Self> {
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
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("moe-cpu-{i}"))
            .build()
            .map_err(|e| Error::Backend { backend: "cpu".into(), msg: format!("thread pool: {e}") })?;
        Ok(CpuBackend { pool, threads })
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

pub(crate) type T = Tensor<CpuBackend>;

pub(crate) fn f32s<'a>(t: &'a T, name: &str) -> Result<&'a [f32]> {
    match t.buffer() {
        CpuBuffer::F32(v) => Ok(v),
        CpuBuffer::I32(_) => Err(Error::DType { tensor: name.into(), expected: "f32".into(), got: "i32".into() }),
        CpuBuffer::WeightT(_) => {
            Err(Error::Invalid(format!("tensor `{name}` is an uploaded weight; only matrix products read it")))
        }
    }
}

/// The data of a matrix-product weight and whether it is stored transposed (`[K, N]`).
pub(crate) fn weight_data<'a>(t: &'a T, name: &str) -> Result<(&'a [f32], bool)> {
    match t.buffer() {
        CpuBuffer::F32(v) => Ok((v, false)),
        CpuBuffer::WeightT(v) => Ok((v, true)),
        CpuBuffer::I32(_) => Err(Error::DType { tensor: name.into(), expected: "f32".into(), got: "i32".into() }),
    }
}

pub(crate) fn i32s<'a>(t: &'a T, name: &str) -> Result<&'a [i32]> {
    match t.buffer() {
        CpuBuffer::I32(v) => Ok(v),
        CpuBuffer::F32(_) | CpuBuffer::WeightT(_) => {
            Err(Error::DType { tensor: name.into(), expected: "i32".into(), got: "f32".into() })
        }
    }
}

pub(crate) fn tf32(shape: &[usize], v: Vec<f32>) -> T {
    Tensor::from_parts(CpuBuffer::F32(v), shape.to_vec(), DType::F32)
}

pub(crate) fn ti32(shape: &[usize], v: Vec<i32>) -> T {
    Tensor::from_parts(CpuBuffer::I32(v), shape.to_vec(), DType::I32)
}

impl Backend for CpuBackend {
    type Buffer = CpuBuffer;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            backend: "cpu".into(),
            device: cpu_name(),
            storage_dtypes: vec![DType::F32],
            max_buffer_bytes: isize::MAX as u64,
            subgroups: false,
            threads: self.threads,
            half_inputs: false,
        }
    }

    fn upload_as(&self, t: &HostTensor, dtype: DType) -> Result<T> {
        match (&t.data, dtype) {
            (moe_engine::tensor::HostData::F32(v), DType::F32) => Ok(tf32(&t.shape, v.clone())),
            (moe_engine::tensor::HostData::I32(v), DType::I32) => Ok(ti32(&t.shape, v.clone())),
            _ => Err(Error::Unsupported {
                backend: "cpu".into(),
                what: format!("storing {} data as {dtype}", t.dtype()),
            }),
        }
    }

    fn upload_weight(&self, t: &HostTensor, dtype: DType) -> Result<T> {
        let (n, k) = match t.shape[..] {
            [.., n, k] if t.shape.len() >= 2 => (n, k),
            _ => return Err(Error::shape("weight", "[out, in] or [groups, out, in]", &t.shape)),
        };
        if dtype != DType::F32 {
            return Err(Error::Unsupported { backend: "cpu".into(), what: format!("{dtype} weights") });
        }
        let v = t.as_f32("weight")?;
        Ok(Tensor::from_parts(CpuBuffer::WeightT(buffer::transpose_stack(v, n, k)), t.shape.clone(), DType::F32))
    }

    fn download(&self, t: &T) -> Result<HostTensor> {
        match t.buffer() {
            CpuBuffer::F32(v) => HostTensor::f32(t.shape(), v.clone()),
            CpuBuffer::I32(v) => HostTensor::i32(t.shape(), v.clone()),
            CpuBuffer::WeightT(v) => {
                let s = t.shape();
                let (n, k) = (s[s.len() - 2], s[s.len() - 1]);
                // Transposing the stored [k, n] matrices gives back [n, k].
                HostTensor::f32(s, buffer::transpose_stack(v, k, n))
            }
        }
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn linear(&self, x: &T, w: &T, bias: Option<&T>) -> Result<T> {
        self.pool.install(|| matmul::linear(x, w, bias, self.threads))
    }

    fn grouped_linear(&self, x: &T, offsets: &T, w: &T, bias: Option<&T>) -> Result<T> {
        self.pool.install(|| matmul::grouped_linear(x, offsets, w, bias, self.threads))
    }

    fn grouped_mlp(&self, xp: &T, offsets: &T, w: &MlpWeights<'_, Self>, keep_pre: bool) -> Result<MlpOutput<Self>> {
        let ExpertKind::Glu { activation } = w.kind else {
            return grouped_mlp_unfused(self, xp, offsets, w, keep_pre);
        };
        let (h, pre) = self
            .pool
            .install(|| experts::grouped_glu(xp, offsets, w.w_in, w.b_in, activation, keep_pre, self.threads))?;
        let w_out = w.w_out.ok_or_else(|| Error::MissingTensor("w_out (output projection)".into()))?;
        let y = self.grouped_linear(&h, offsets, w_out, w.b_out)?;
        Ok(MlpOutput { pre, y })
    }

    fn activation(&self, x: &T, act: Activation) -> Result<T> {
        self.pool.install(|| elementwise::activation(x, act))
    }

    fn glu(&self, x: &T, act: Activation) -> Result<T> {
        self.pool.install(|| elementwise::glu(x, act))
    }

    fn mul(&self, a: &T, b: &T) -> Result<T> {
        elementwise::mul(a, b)
    }

    fn add_gated(&self, a: &T, b: &T, gate: Option<&T>) -> Result<T> {
        elementwise::add_gated(a, b, gate)
    }

    fn residual_mix(&self, moe: &T, mlp: &T, coef: &T) -> Result<T> {
        elementwise::residual_mix(moe, mlp, coef)
    }

    fn route(&self, logits: &T, spec: &RouteSpec<'_, Self>) -> Result<Routes<Self>> {
        self.pool.install(|| route::route(logits, spec))
    }

    fn plan(&self, routes: &Routes<Self>, spec: &PlanSpec<'_, Self>) -> Result<Plan<Self>> {
        plan::plan(routes, spec)
    }

    fn permute(&self, x: &T, plan: &Plan<Self>) -> Result<T> {
        self.pool.install(|| elementwise::permute(x, plan))
    }

    fn combine(&self, yp: &T, plan: &Plan<Self>) -> Result<T> {
        self.pool.install(|| elementwise::combine(yp, plan))
    }

    fn router_stats(&self, logits: &T, scores: &T) -> Result<T> {
        route::router_stats(logits, scores)
    }
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
