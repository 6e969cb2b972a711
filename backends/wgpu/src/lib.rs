//! # moe-wgpu
//!
//! The portable GPU backend: every op of the [`Backend`] trait as a WGSL compute shader
//! (`shaders/*.wgsl`, one file per op family) on wgpu, so it runs on Vulkan, Metal, DX12
//! and GL, and on Mesa's software Vulkan (lavapipe) in CI.
//!
//! Ops are recorded into one command encoder and submitted when the host needs a result
//! (`download`, `synchronize`): a layer forward is one submission with no host read inside
//! it. Routing and the dispatch plan stay on the device from logits to combine; checks
//! that need device data (non-finite router logits, bias or noise, one status buffer per
//! route call) are reported by the next `download` or `synchronize`, naming the token or
//! element as the cpu backend does.
//!
//! Numbers: f32 storage and f32 accumulation in a fixed order, so the same inputs give
//! bitwise the same outputs on one device; no float atomics anywhere.

mod cast;
mod device;
mod elementwise;
mod exchange;
mod grad;
mod halves;
mod kernels;
mod linear;
mod routing;

pub use device::{list_adapters, AdapterSummary};
pub use kernels::FAMILIES;

use kernels::Family;
use moe_engine::backend::Backend;
use moe_engine::device::{Capabilities, Device, UploadOp, WeightUploadOp};
use moe_engine::kernel_abi::{self, Abi, ROUTE_STATUS_WORDS};
use moe_engine::ops::{
    ActGradOp, BucketOp, BucketParts, CastWeightOp, CombineGrad, CombineGradOp, CombineOp, ElementwiseOp, GatedAddGrad,
    GatedAddGradOp, GroupedLinearOp, GroupedMlpOp, LinearDxOp, LinearOp, MixGrad, MixGradOp, MlpOutput, NoiseOp,
    OptimStepOp, PassRowsOp, PermuteOp, PermuteScaledOp, PlanOp, PlanParts, RegroupOp, RouteChecks, RouteGradOp,
    RouteOp, RouterStatsOp, RoutesParts, StepOut, SumRowsOp, SumSquaresOp, WeightGrad, WeightGradOp,
};
use moe_engine::tensor::HostData;
use moe_engine::{DType, Error, ExpertKind, HostTensor, Result, Tensor};
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

/// A device buffer with its logical size in bytes (allocations are at least 4 bytes, as
/// wgpu does not bind empty buffers). A weight stack larger than the adapter's largest
/// storage binding lives in several parts instead (see [`WeightPart`]); only the matrix
/// products take such a tensor.
#[derive(Debug)]
pub struct WgpuBuffer {
    buf: wgpu::Buffer,
    bytes: u64,
    parts: Vec<WeightPart>,
}

impl moe_engine::DeviceBuffer for WgpuBuffer {
    fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// One buffer of a split weight stack `[G, N, K]`: experts `g0..g1`, output rows
/// (columns of the product) `c0..c1`. Parts are consecutive ranges of the flattened
/// tensor, in order; f16 / bf16 parts are packed two halves per u32 from their own start.
#[derive(Debug, Clone)]
pub(crate) struct WeightPart {
    pub(crate) buf: wgpu::Buffer,
    pub(crate) g0: usize,
    pub(crate) g1: usize,
    pub(crate) c0: usize,
    pub(crate) c1: usize,
}

type T = Tensor<WgpuBackend>;

/// Where a `map_async` callback leaves its outcome.
type MapSlot = Arc<Mutex<Option<std::result::Result<(), wgpu::BufferAsyncError>>>>;

/// The wgpu backend: one adapter, its device and queue, the pipeline cache and the
/// command encoder being recorded.
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter: AdapterSummary,
    limits: wgpu::Limits,
    cache: kernels::Cache,
    encoder: Mutex<Option<wgpu::CommandEncoder>>,
    /// First validation or out-of-memory error wgpu reported, surfaced as an `Err` by the
    /// next download or synchronize.
    error: Arc<Mutex<Option<String>>>,
    /// The route calls' input checks since the last download: each call's status buffer
    /// and the inputs its words index.
    checks: RouteChecks<wgpu::Buffer, wgpu::Buffer>,
    /// Bound in place of absent read-only inputs (biases, noise, masks).
    dummy: wgpu::Buffer,
    /// Bound in place of an unused read-write binding.
    dummy_rw: wgpu::Buffer,
    /// A second one, for entry points with two unused read-write bindings.
    dummy_rw2: wgpu::Buffer,
    /// What the adapter can do; `max_buffer_bytes` is its largest storage binding.
    caps: Capabilities,
    /// The largest weight part: the largest storage binding, or the smaller size a test
    /// asked for, to force split weights.
    weight_part_bytes: u64,
}

fn backend_err(msg: impl Into<String>) -> Error {
    Error::backend("wgpu", msg)
}

impl WgpuBackend {
    /// Opens an adapter: `selector` is an index or a name fragment (see `moe info`);
    /// `None` honours `WGPU_ADAPTER_NAME`, else picks the best kind available. A machine
    /// with no driver gets an `Err` saying what to install.
    pub fn new(selector: Option<&str>) -> Result<Self> {
        Self::with_max_binding(selector, None)
    }

    /// As [`WgpuBackend::new`], treating `max_binding` bytes (when smaller than the
    /// adapter's limit) as the largest storage binding: weight stacks above it are split.
    /// For tests of the split path on adapters with generous limits.
    pub fn with_max_binding(selector: Option<&str>, max_binding: Option<u64>) -> Result<Self> {
        let (adapter, index) = device::select(selector)?;
        let summary = device::summary(index, &adapter);
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("moe-wgpu"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::Backend {
            backend: "wgpu".into(),
            msg: format!("request_device on {}", summary.name),
            source: Some(Box::new(e)),
        })?;
        let error = Arc::new(Mutex::new(None::<String>));
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(e.to_string());
            }
        }));
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;

        let small = |label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: storage,
                mapped_at_creation: false,
            })
        };
        let (dummy, dummy_rw, dummy_rw2) = (small("dummy"), small("dummy_rw"), small("dummy_rw2"));
        let adapter_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let weight_part_bytes = max_binding.map_or(adapter_binding, |o| o.min(adapter_binding));
        let caps = Capabilities {
            backend: "wgpu".into(),
            device: format!("{} ({}, {})", summary.name, summary.api, summary.kind),
            storage_dtypes: vec![DType::F32, DType::F16, DType::BF16],
            max_buffer_bytes: adapter_binding,
            subgroups: false,
            threads: 0,
            half_inputs: false,
            max_route_experts: Some(kernel_abi::ROUTE_MAX_EXPERTS),
            max_route_groups: Some(kernel_abi::ROUTE_MAX_GROUPS),
        };
        Ok(WgpuBackend {
            device,
            queue,
            adapter: summary,
            limits,
            cache: kernels::Cache::default(),
            encoder: Mutex::new(None),
            error,
            checks: RouteChecks::default(),
            dummy,
            dummy_rw,
            dummy_rw2,
            caps,
            weight_part_bytes,
        })
    }

    /// Compiles every shader entry point on this device: `(family, entry, result)`.
    pub fn compile_all(&self) -> Vec<(&'static str, &'static str, Result<()>)> {
        self.cache.compile_all(&self.device)
    }

    /// The adapter this backend runs on.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.adapter
    }

    fn check_size(&self, bytes: u64, what: &str) -> Result<()> {
        let max = self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size);
        if bytes > max {
            return Err(Error::unsupported(
                "wgpu",
                format!("{what} of {bytes} bytes exceeds this adapter's largest storage binding ({max} bytes)"),
            ));
        }
        Ok(())
    }

    /// A zeroed device buffer of `bytes` (wgpu zero-initialises new buffers).
    fn alloc(&self, bytes: u64, what: &str) -> Result<WgpuBuffer> {
        self.check_size(bytes, what)?;
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(WgpuBuffer { buf, bytes, parts: Vec::new() })
    }

    fn tensor(&self, shape: &[usize], dtype: DType, what: &str) -> Result<T> {
        let bytes = moe_engine::tensor::nbytes(what, shape, dtype)?;
        T::from_parts(self.alloc(bytes, what)?, shape.to_vec(), dtype)
    }

    /// Records one compute dispatch of `entry` into the pending command encoder, with the
    /// family's parameter block `params` as its uniform.
    fn dispatch<P: Abi>(
        &self,
        f: &'static Family,
        entry: &'static str,
        params: &P,
        bufs: &[&wgpu::Buffer],
        grid: [u32; 3],
    ) -> Result<()> {
        if bufs.len() as u32 != f.reads + f.writes {
            return Err(Error::Internal(format!(
                "{}::{entry} takes {} buffers, got {}",
                f.name,
                f.reads + f.writes,
                bufs.len()
            )));
        }
        let max = self.limits.max_compute_workgroups_per_dimension;
        if grid.iter().any(|&g| g > max) {
            return Err(Error::unsupported(
                "wgpu",
                format!("{}::{entry} needs a {grid:?} workgroup grid (limit {max} per dimension)", f.name),
            ));
        }
        let (pipeline, layout) = self.cache.pipeline(&self.device, f, entry)?;
        // ABI blocks are whole 16-byte uniform rows (kernel_abi checks this).
        let uniform = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(entry),
            contents: bytemuck::bytes_of(params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: uniform.as_entire_binding() }];
        for (i, b) in bufs.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry { binding: 1 + i as u32, resource: b.as_entire_binding() });
        }
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(entry),
            layout: &layout,
            entries: &entries,
        });
        let mut enc = self.encoder.lock().unwrap_or_else(|e| e.into_inner());
        let enc = enc.get_or_insert_with(|| self.device.create_command_encoder(&Default::default()));
        let mut pass =
            enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(entry), timestamp_writes: None });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
        Ok(())
    }

    /// Records a buffer-to-buffer copy (byte offsets and size are multiples of 4).
    fn copy(&self, src: &wgpu::Buffer, src_off: u64, dst: &wgpu::Buffer, dst_off: u64, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut enc = self.encoder.lock().unwrap_or_else(|e| e.into_inner());
        let enc = enc.get_or_insert_with(|| self.device.create_command_encoder(&Default::default()));
        enc.copy_buffer_to_buffer(src, src_off, dst, dst_off, bytes);
    }

    /// Submits what has been recorded.
    fn flush(&self) {
        let enc = self.encoder.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(enc) = enc {
            self.queue.submit([enc.finish()]);
        }
    }

    fn take_error(&self) -> Result<()> {
        match self.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(msg) => Err(backend_err(msg)),
            None => Ok(()),
        }
    }

    /// Copies `bytes` at `offset` of each source to the host, in one submission with
    /// whatever is recorded.
    fn read_back(&self, parts: &[(&wgpu::Buffer, u64, u64)]) -> Result<Vec<Vec<u8>>> {
        let mut stages = Vec::with_capacity(parts.len());
        for &(src, offset, bytes) in parts {
            let size = bytes.max(4).next_multiple_of(4);
            let stage = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("read back"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.copy(src, offset, &stage, 0, size);
            stages.push((stage, bytes));
        }
        self.flush();
        let results: Vec<MapSlot> = stages.iter().map(|_| Arc::new(Mutex::new(None))).collect();
        for ((stage, _), slot) in stages.iter().zip(&results) {
            let slot = slot.clone();
            stage.map_async(wgpu::MapMode::Read, .., move |r| {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            });
        }
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| backend_err(format!("poll: {e}")))?;
        self.take_error()?;
        let mut out = Vec::with_capacity(stages.len());
        for ((stage, bytes), slot) in stages.iter().zip(&results) {
            match slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(backend_err(format!("mapping a read-back buffer: {e}"))),
                None => return Err(backend_err("read-back buffer was not mapped after the device went idle")),
            }
            let view = stage.get_mapped_range(..).map_err(|e| backend_err(format!("mapped range: {e}")))?;
            out.push(view[..*bytes as usize].to_vec());
            drop(view);
            stage.unmap();
        }
        Ok(out)
    }

    /// Settles the route calls' input checks: `Err` naming the first bad token (logits) or
    /// element (bias, noise) of the first call that found one.
    fn settle_checks(&self) -> Result<()> {
        let word = |buf: &wgpu::Buffer, at: u64| -> Result<[u8; 4]> {
            let v = self.read_back(&[(buf, at, 4)])?.remove(0);
            Ok([v[0], v[1], v[2], v[3]])
        };
        self.checks.settle(
            |status| {
                let v = self.read_back(&[(status, 0, 12)])?.remove(0);
                let w: Vec<u32> = bytemuck::pod_collect_to_vec(&v);
                Ok([w[0], w[1], w[2]])
            },
            |input, i| Ok(f32::from_le_bytes(word(input, i as u64 * 4)?)),
        )
    }

    /// A zeroed status buffer for one route call (wgpu zero-initialises new buffers).
    pub(crate) fn route_status_buffer(&self) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("route status"),
            size: (4 * ROUTE_STATUS_WORDS) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    fn buf<'a>(t: &'a T, name: &str, dtype: DType) -> Result<&'a wgpu::Buffer> {
        t.expect_dtype(name, dtype)?;
        if t.buffer().parts.len() > 1 {
            return Err(Error::unsupported(
                "wgpu",
                format!(
                    "{name} is split over {} buffers; only matrix products take split weights",
                    t.buffer().parts.len()
                ),
            ));
        }
        Ok(&t.buffer().buf)
    }

    /// The parts of a weight tensor (one covering everything when it is not split) and
    /// its storage code for the shaders (0 f32, 1 f16, 2 bf16).
    fn weight_parts(&self, t: &T) -> Result<Vec<WeightPart>> {
        let b = t.buffer();
        if !b.parts.is_empty() {
            return Ok(b.parts.clone());
        }
        let s = t.shape();
        let (g, n) = match s.len() {
            2 => (1, s[0]),
            3 => (s[0], s[1]),
            _ => return Err(Error::shape("weight", "[out, in] or [groups, out, in]", s)),
        };
        Ok(vec![WeightPart { buf: b.buf.clone(), g0: 0, g1: g, c0: 0, c1: n }])
    }

    /// How many buffers hold a tensor (more than one for a split weight stack).
    pub fn buffer_count(&self, t: &T) -> usize {
        t.buffer().parts.len().max(1)
    }

    /// Largest storage binding a weight part may take (the adapter's, or the smaller test
    /// override).
    fn max_binding(&self) -> u64 {
        self.weight_part_bytes
    }
}

impl Device for WgpuBackend {
    type Buffer = WgpuBuffer;

    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn run_upload(&self, op: &UploadOp<'_>) -> Result<T> {
        let t = op.tensor;
        let (dtype, mut contents): (DType, Vec<u8>) = match t.data() {
            HostData::F32(v) => (DType::F32, bytemuck::cast_slice(v).to_vec()),
            HostData::I32(v) => (DType::I32, bytemuck::cast_slice(v).to_vec()),
        };
        let n = contents.len() as u64;
        self.check_size(n, "tensor")?;
        contents.resize(contents.len().max(4).next_multiple_of(4), 0);
        let buf = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: &contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        });
        T::from_parts(WgpuBuffer { buf, bytes: n, parts: Vec::new() }, t.shape().to_vec(), dtype)
    }

    /// Weight matrices `[N, K]` or stacks `[G, N, K]` in f32, f16 or bf16 (halves packed
    /// two per u32), split into parts when larger than the largest storage binding.
    fn run_upload_weight(&self, op: &WeightUploadOp<'_>) -> Result<T> {
        let (g, n, k) = op.dims;
        let v = op.tensor.as_f32("weight")?;
        let ranges = halves::split(g, n, k, op.dtype.size() as u64, self.max_binding())?;
        let mut parts = Vec::with_capacity(ranges.len());
        let mut total = 0u64;
        for (g0, g1, c0, c1) in ranges {
            // Parts are consecutive ranges of the flattened stack.
            let start = (g0 * n + c0) * k;
            let len = if g1 - g0 > 1 || c1 - c0 == n { (g1 - g0) * n * k } else { (c1 - c0) * k };
            // An empty stack is one empty part (split names it experts 0..1).
            let start = start.min(v.len());
            let len = len.min(v.len() - start);
            let bytes = halves::encode(&v[start..start + len], op.dtype)?;
            total += bytes.len() as u64;
            let buf = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("weight"),
                contents: &bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            });
            parts.push(WeightPart { buf, g0, g1, c0, c1 });
        }
        let first = parts[0].buf.clone();
        let parts = if parts.len() == 1 { Vec::new() } else { parts };
        T::from_parts(WgpuBuffer { buf: first, bytes: total, parts }, op.tensor.shape().to_vec(), op.dtype)
    }

    fn run_download(&self, t: &T) -> Result<HostTensor> {
        self.settle_checks()?;
        let b = t.buffer();
        if matches!(t.dtype(), DType::F16 | DType::BF16) || !b.parts.is_empty() {
            // A weight: read every part, decode, concatenate (parts are in order).
            let parts = self.weight_parts(t)?;
            let k = *t.shape().last().unwrap_or(&1);
            let n = t.shape()[t.shape().len().saturating_sub(2)];
            // Each part's values, never past the tensor's (an empty stack is one empty part).
            let mut left = t.numel();
            let sizes: Vec<usize> = parts
                .iter()
                .map(|p| {
                    let len =
                        if p.g1 - p.g0 > 1 || p.c1 - p.c0 == n { (p.g1 - p.g0) * n * k } else { (p.c1 - p.c0) * k };
                    let len = len.min(left);
                    left -= len;
                    len
                })
                .collect();
            let reads: Vec<(&wgpu::Buffer, u64, u64)> =
                parts.iter().zip(&sizes).map(|(p, &len)| (&p.buf, 0, (len * t.dtype().size()) as u64)).collect();
            let data = self.read_back(&reads)?;
            let mut out = Vec::with_capacity(t.numel());
            for (bytes, &len) in data.iter().zip(&sizes) {
                out.extend(halves::decode(bytes, len, t.dtype())?);
            }
            return HostTensor::f32(t.shape(), out);
        }
        let bytes = (t.numel() * t.dtype().size()) as u64;
        let data = self.read_back(&[(&b.buf, 0, bytes)])?.remove(0);
        match t.dtype() {
            DType::F32 => HostTensor::f32(t.shape(), bytemuck::pod_collect_to_vec(&data)),
            DType::I32 => HostTensor::i32(t.shape(), bytemuck::pod_collect_to_vec(&data)),
            d => Err(Error::Internal(format!("a {d} tensor that is not a weight"))),
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.flush();
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| backend_err(format!("poll: {e}")))?;
        self.take_error()?;
        self.settle_checks()
    }
}

impl Backend for WgpuBackend {
    fn run_linear(&self, op: &LinearOp<'_, Self>) -> Result<T> {
        linear::linear(self, op)
    }

    fn run_grouped_linear(&self, op: &GroupedLinearOp<'_, Self>) -> Result<T> {
        linear::grouped(self, op)
    }

    /// GLU experts run their first product with the activation fused in (unless the
    /// weights are split by columns); other kinds compose the primitives.
    fn run_grouped_mlp(&self, op: &GroupedMlpOp<'_, Self>) -> Result<MlpOutput<Self>> {
        let w = op.weights;
        if let ExpertKind::Glu { .. } = w.kind {
            if let Some((h, pre)) = linear::grouped_glu(self, op)? {
                let w_out = w.w_out.ok_or_else(|| Error::Internal("checked GLU experts without w_out".into()))?;
                let y = self.grouped_linear(&h, op.offsets, w_out, w.b_out)?;
                return Ok(MlpOutput { pre, y });
            }
        }
        self.grouped_mlp_unfused(op)
    }

    fn run_elementwise(&self, op: &ElementwiseOp<'_, Self>) -> Result<T> {
        elementwise::run(self, op)
    }

    fn run_route(&self, op: &RouteOp<'_, Self>) -> Result<RoutesParts<Self>> {
        routing::route(self, op)
    }

    fn run_plan(&self, op: &PlanOp<'_, Self>) -> Result<PlanParts<Self>> {
        routing::plan(self, op)
    }

    fn run_permute(&self, op: &PermuteOp<'_, Self>) -> Result<T> {
        elementwise::permute(self, op)
    }

    fn run_combine(&self, op: &CombineOp<'_, Self>) -> Result<T> {
        elementwise::combine(self, op)
    }

    fn run_permute_scaled(&self, op: &PermuteScaledOp<'_, Self>) -> Result<T> {
        elementwise::permute_scaled(self, op)
    }

    fn run_pass_rows(&self, op: &PassRowsOp<'_, Self>) -> Result<T> {
        elementwise::pass_rows(self, op)
    }

    fn run_bucket(&self, op: &BucketOp<'_, Self>) -> Result<BucketParts<Self>> {
        exchange::bucket(self, op)
    }

    fn run_regroup(&self, op: &RegroupOp<'_, Self>) -> Result<T> {
        exchange::regroup(self, op)
    }

    fn run_router_stats(&self, op: &RouterStatsOp<'_, Self>) -> Result<T> {
        routing::router_stats(self, op)
    }

    fn run_linear_dx(&self, op: &LinearDxOp<'_, Self>) -> Result<T> {
        grad::linear_dx(self, op)
    }

    fn run_weight_grad(&self, op: &WeightGradOp<'_, Self>) -> Result<WeightGrad<Self>> {
        grad::weight_grad(self, op)
    }

    fn run_act_grad(&self, op: &ActGradOp<'_, Self>) -> Result<T> {
        grad::act_grad(self, op)
    }

    fn run_sum_rows(&self, op: &SumRowsOp<'_, Self>) -> Result<T> {
        grad::sum_rows(self, op)
    }

    fn run_combine_grad(&self, op: &CombineGradOp<'_, Self>) -> Result<CombineGrad<Self>> {
        grad::combine_grad(self, op)
    }

    fn run_route_grad(&self, op: &RouteGradOp<'_, Self>) -> Result<T> {
        grad::route_grad(self, op)
    }

    fn run_mix_grad(&self, op: &MixGradOp<'_, Self>) -> Result<MixGrad<Self>> {
        grad::mix_grad(self, op)
    }

    fn run_gated_add_grad(&self, op: &GatedAddGradOp<'_, Self>) -> Result<GatedAddGrad<Self>> {
        grad::gated_add_grad(self, op)
    }

    fn run_optim_step(&self, op: &OptimStepOp<'_, Self>) -> Result<StepOut<Self>> {
        grad::optim_step(self, op)
    }

    /// Rounded and packed on the device by `shaders/cast.wgsl` (f32: a buffer copy); a
    /// stack that `upload_weight` would split into parts takes the host round trip.
    fn run_cast_weight(&self, op: &CastWeightOp<'_, Self>) -> Result<T> {
        cast::cast_weight(self, op)
    }

    fn run_sum_squares(&self, op: &SumSquaresOp<'_, Self>) -> Result<T> {
        grad::sum_squares(self, op)
    }

    /// Drawn on the device by `shaders/philox.wgsl`, with the cpu's counter layout.
    fn run_noise(&self, op: &NoiseOp) -> Result<T> {
        let out = self.tensor(&op.shape, DType::F32, "noise")?;
        if op.n > 0 {
            let grid = kernel_abi::grid_1d(op.n, kernel_abi::WG_ELEMENTWISE);
            self.dispatch(&kernels::PHILOX, "noise", &op.params, &[&out.buffer().buf], grid)?;
        }
        Ok(out)
    }
}
