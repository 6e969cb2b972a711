//! The CUDA [`Backend`]: device memory through cudarc, one stream, the kernels of
//! `kernels/*.cu` compiled by NVRTC for the device's architecture on first use.
//!
//! Everything is enqueued on one stream; `download` and `synchronize` wait. Like the wgpu
//! backend, the route kernel flags non-finite logits on the device and the next download
//! reports them, so a layer forward has no host synchronisation inside it: no copy to or
//! from the host, no stream wait, group sizes stay on the device.
//!
//! Products: dense ones (`linear`) go to cuBLAS, SGEMM for f32 weights (the exact path)
//! and `cublasGemmEx` on tensor cores for f16/bf16 weights (activations cast to the
//! weights' type, float32 accumulation). Grouped expert products use kernels/matmul_tc.cu
//! (mma.sync tensor cores) for f16/bf16 weights on sm_80 and later and kernels/matmul.cu
//! (f32 SIMT) otherwise: cuBLAS's grouped GEMM needs the group sizes on the host, which
//! would put a synchronisation inside every forward.
//!
//! Not yet verified on a GPU (none was lent while this was written): the golden and
//! parity tests run it whenever a driver is present and skip with a message otherwise.

use crate::probe::{driver_status, nvrtc_status};
use cudarc::cublas::{sys as blas_sys, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use moe_engine::backend::{
    Activation, Backend, Capabilities, Choice, GroupScore, KeepPolicy, Normalize, Plan, PlanSpec, RouteSpec, Routes,
    ScoreFn,
};
use moe_engine::philox::NoiseKind;
use moe_engine::tensor::HostData;
use moe_engine::{DType, Error, HostTensor, Result, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Device memory of one tensor.
#[derive(Debug)]
pub enum CudaBuffer {
    /// f32 values.
    F32(CudaSlice<f32>),
    /// i32 values.
    I32(CudaSlice<i32>),
    /// f16 or bf16 weights, as their 16-bit patterns.
    Half(CudaSlice<u16>),
}

type T = Tensor<CudaBackend>;

fn derr(e: impl std::fmt::Debug) -> Error {
    Error::Backend { backend: "cuda".into(), msg: format!("{e:?}") }
}

/// Parameters of `route` (kernels/route.cu `RouteParams`).
#[repr(C)]
#[derive(Clone, Copy)]
struct RouteParams {
    s: u32,
    e: u32,
    k: u32,
    score_fn: u32,
    choice: u32,
    has_bias: u32,
    has_noise: u32,
    normalize: u32,
    eps: f32,
    scale: f32,
    n_group: u32,
    topk_group: u32,
    group_score: u32,
}
// SAFETY: plain-old-data with the C layout the kernel declares.
unsafe impl DeviceRepr for RouteParams {}

/// Parameters of the plan kernels (kernels/plan.cu `PlanParams`).
#[repr(C)]
#[derive(Clone, Copy)]
struct PlanParams {
    s: u32,
    k: u32,
    e: u32,
    group: u32,
    n_groups: u32,
    cap_rule: u32,
    cap_value: u32,
    clamp: u32,
    keep: u32,
    has_used: u32,
    renorm: u32,
}
// SAFETY: plain-old-data with the C layout the kernel declares.
unsafe impl DeviceRepr for PlanParams {}

/// The CUDA backend on one device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: &'static str,
    name: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// `[first non-finite logit as t·E + e, or u32::MAX]`. Behind a lock because cudarc's
    /// `CudaSlice::clone` copies the buffer: the kernel must get this very allocation.
    status: Mutex<CudaSlice<u32>>,
    pending: Mutex<Option<(CudaSlice<f32>, usize)>>,
    /// Stand-in for absent optional f32 inputs.
    dummy: CudaSlice<f32>,
    /// cuBLAS on `stream`; `None` where libcublas is absent (dense products then use the
    /// grouped kernels, with a warning at start).
    blas: Option<CudaBlas>,
    /// sm_80 or later: f16/bf16 products on tensor cores (mma.sync m16n8k16 needs sm_80).
    tensor_cores: bool,
}

/// The NVRTC target of a compute capability; unknown ones are an error rather than a
/// cubin the device cannot load.
fn arch_name(major: i32, minor: i32) -> Result<&'static str> {
    Ok(match (major, minor) {
        (12, _) => "sm_120",
        (10, _) => "sm_100",
        (9, _) => "sm_90",
        (8, 9) => "sm_89",
        (8, 6) => "sm_86",
        (8, _) => "sm_80",
        (7, 5) => "sm_75",
        (7, _) => "sm_70",
        _ => {
            return Err(Error::Unsupported {
                backend: "cuda".into(),
                what: format!("compute capability {major}.{minor}"),
            })
        }
    })
}

fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n.div_ceil(block as usize)).max(1) as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Opens device `ordinal`. No driver, no NVRTC or no such device is an `Err`.
    pub fn new(ordinal: usize) -> Result<Self> {
        driver_status()?;
        nvrtc_status()?;
        let count = CudaContext::device_count().map_err(derr)?;
        if ordinal as i32 >= count {
            return Err(Error::Backend {
                backend: "cuda".into(),
                msg: format!("device {ordinal} requested, {count} present"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(derr)?;
        let stream = ctx.default_stream();
        let (major, minor) = ctx.compute_capability().map_err(derr)?;
        let name = ctx.name().map_err(derr)?;
        let status = Mutex::new(stream.clone_htod(&[u32::MAX]).map_err(derr)?);
        let dummy = stream.alloc_zeros::<f32>(4).map_err(derr)?;
        let blas = match crate::probe::cublas_status() {
            Ok(()) => Some(CudaBlas::new(stream.clone()).map_err(derr)?),
            Err(e) => {
                tracing::warn!("{e}; dense products fall back to the grouped kernels");
                None
            }
        };
        Ok(CudaBackend {
            ctx,
            stream,
            arch: arch_name(major, minor)?,
            name,
            modules: Mutex::new(HashMap::new()),
            status,
            pending: Mutex::new(None),
            dummy,
            blas,
            tensor_cores: major >= 8,
        })
    }

    fn function(&self, family: &'static str, name: &str) -> Result<CudaFunction> {
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        let module = match mods.get(family) {
            Some(m) => m.clone(),
            None => {
                let src = crate::compile::FAMILIES
                    .iter()
                    .find(|(f, _)| *f == family)
                    .map(|(_, s)| crate::compile::source(s))
                    .ok_or_else(|| Error::Invalid(format!("no kernel family {family}")))?;
                let dir = crate::compile::cache_dir();
                let cubin = crate::compile::cached_cubin(family, &src, self.arch, dir.as_deref())?;
                let m = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(derr)?;
                mods.insert(family, m.clone());
                m
            }
        };
        module.load_function(name).map_err(derr)
    }

    fn zeros_f32(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(n.max(1)).map_err(derr)
    }

    fn zeros_i32(&self, n: usize) -> Result<CudaSlice<i32>> {
        self.stream.alloc_zeros::<i32>(n.max(1)).map_err(derr)
    }

    fn f32s<'a>(t: &'a T, name: &str) -> Result<&'a CudaSlice<f32>> {
        match t.buffer() {
            CudaBuffer::F32(s) => Ok(s),
            _ => Err(Error::Invalid(format!("{name}: expected f32 data, got {}", t.dtype()))),
        }
    }

    fn i32s<'a>(t: &'a T, name: &str) -> Result<&'a CudaSlice<i32>> {
        match t.buffer() {
            CudaBuffer::I32(s) => Ok(s),
            _ => Err(Error::Invalid(format!("{name}: expected i32 data, got {}", t.dtype()))),
        }
    }

    fn out(shape: &[usize], s: CudaSlice<f32>) -> T {
        Tensor::from_parts(CudaBuffer::F32(s), shape.to_vec(), DType::F32)
    }

    fn out_i32(shape: &[usize], s: CudaSlice<i32>) -> T {
        Tensor::from_parts(CudaBuffer::I32(s), shape.to_vec(), DType::I32)
    }

    fn settle_checks(&self) -> Result<()> {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some((logits, e)) = pending else { return Ok(()) };
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let first = self.stream.clone_dtoh(&*status).map_err(derr)?[0];
        if first == u32::MAX {
            return Ok(());
        }
        self.stream.memcpy_htod(&[u32::MAX], &mut *status).map_err(derr)?;
        drop(status);
        let value = self.stream.clone_dtoh(&logits.slice(first as usize..first as usize + 1)).map_err(derr)?[0];
        let e = e.max(1);
        Err(Error::NonFiniteLogits { token: first as usize / e, expert: first as usize % e, value })
    }

    /// A device copy of `v` (at least one element, as zero-byte allocations fail).
    fn htod<T: DeviceRepr + Copy + cudarc::driver::ValidAsZeroBits>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        let mut d = self.stream.alloc_zeros::<T>(v.len().max(1)).map_err(derr)?;
        if !v.is_empty() {
            self.stream.memcpy_htod(v, &mut d).map_err(derr)?;
        }
        Ok(d)
    }

    /// The function, a zeroed output and the element count of an elementwise kernel.
    fn ew_prep(&self, name: &str, shape: &[usize]) -> Result<(CudaFunction, CudaSlice<f32>, usize)> {
        let n: usize = shape.iter().product();
        Ok((self.function("elementwise.cu", name)?, self.zeros_f32(n)?, n))
    }

    fn grouped_impl(
        &self,
        x: &T,
        offsets: &CudaSlice<i32>,
        groups: usize,
        w: &T,
        bias: Option<&T>,
        glu: Option<(u32, bool)>,
    ) -> Result<(T, Option<T>)> {
        let (r, k) = x.dims2("grouped input")?;
        let n = w.shape()[w.shape().len() - 2];
        let f = if glu.is_some() { n / 2 } else { n };
        let max_tiles = r.div_ceil(64) + groups;
        let mut tiles = self.zeros_i32(1 + 3 * max_tiles)?;
        let tm = self.function("matmul.cu", "tile_map")?;
        let g = groups as u32;
        // SAFETY: matches kernels/matmul.cu tile_map(offsets, tiles, groups).
        unsafe { self.stream.launch_builder(&tm).arg(offsets).arg(&mut tiles).arg(&g).launch(grid_1d(1, 1)) }
            .map_err(derr)?;
        let mut out = self.zeros_f32(r * f)?;
        let keep_pre = glu.is_some_and(|(_, k)| k);
        let mut pre = if keep_pre { Some(self.zeros_f32(r * n)?) } else { None };
        let (wdtype, act) = (
            match w.dtype() {
                DType::F32 => 0u32,
                DType::F16 => 1,
                _ => 2,
            },
            glu.map_or(0, |(a, _)| a),
        );
        let is_glu = glu.is_some() as u32;
        let (nn, kk) = (n as u32, k as u32);
        let y = max_tiles.clamp(1, 65535);
        let cfg = LaunchConfig {
            grid_dim: (f.div_ceil(64).max(1) as u32, y as u32, max_tiles.div_ceil(y).max(1) as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // f16/bf16 weights on tensor cores where the device has mma.sync m16n8k16.
        let tc = wdtype != 0 && self.tensor_cores;
        let func = match (tc, wdtype) {
            (false, _) => self.function("matmul.cu", "grouped")?,
            (true, 1) => self.function("matmul_tc.cu", "grouped_tc_f16")?,
            (true, _) => self.function("matmul_tc.cu", "grouped_tc_bf16")?,
        };
        let cfg = if tc { LaunchConfig { block_dim: (128, 1, 1), ..cfg } } else { cfg };
        let xs = Self::f32s(x, "grouped input")?;
        let null = 0u64;
        let mut args = self.stream.launch_builder(&func);
        args.arg(xs);
        match w.buffer() {
            CudaBuffer::F32(s) => args.arg(s),
            CudaBuffer::Half(s) => args.arg(s),
            CudaBuffer::I32(_) => return Err(Error::Invalid("expert weights stored as i32".into())),
        };
        match bias {
            Some(b) => args.arg(Self::f32s(b, "expert biases")?),
            None => args.arg(&null),
        };
        args.arg(&tiles).arg(&mut out);
        match pre.as_mut() {
            Some(p) => args.arg(p),
            None => args.arg(&null),
        };
        args.arg(&nn).arg(&kk);
        if !tc {
            args.arg(&wdtype);
        }
        args.arg(&is_glu).arg(&act);
        // SAFETY: matches kernels/matmul.cu grouped(x, w, bias, tiles, out, pre, n, k,
        // wdtype, glu, act_kind) and kernels/matmul_tc.cu grouped_tc_*(x, w, bias, tiles,
        // out, pre, n, k, glu, act_kind); buffers are sized for [r, k], [G, n, k], [r, f],
        // [r, n]; the grid is the same (64 × 64 tiles), the blocks 256 or 128 threads.
        unsafe { args.launch(cfg) }.map_err(derr)?;
        Ok((Self::out(&[r, f], out), pre.map(|p| Self::out(&[r, n], p))))
    }
}

/// The cuBLAS call for out [r, n] = x [r, k] · w [n, k]ᵀ on row-major buffers, with no
/// copies: cuBLAS is column-major, and a row-major [r, n] buffer is the column-major n × r
/// matrix outᵀ = w · xᵀ. So C (m = n, n = r, ldc = n) = op(A) · op(B) with A = the weight
/// buffer read as column-major k × n (lda = k) and transposed, B = the input buffer read as
/// column-major k × r (ldb = k) as is. Sizes over i32 are an error.
fn linear_gemm(r: usize, n: usize, k: usize, beta: f32) -> Result<GemmConfig<f32>> {
    let dim = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::Invalid(format!("linear: {what} = {v} exceeds cuBLAS's 32-bit sizes")))
    };
    let (m32, n32, k32) = (dim(n, "out features")?, dim(r, "rows")?, dim(k, "in features")?);
    Ok(GemmConfig {
        transa: blas_sys::cublasOperation_t::CUBLAS_OP_T,
        transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
        m: m32,
        n: n32,
        k: k32,
        alpha: 1.0,
        lda: k32,
        ldb: k32,
        beta,
        ldc: m32,
    })
}

impl CudaBackend {
    /// out [r, n] = x [r, k] · w [n, k]ᵀ (+ bias) through cuBLAS, in the layout of
    /// [`linear_gemm`]. The bias is written into out first and accumulated onto (beta = 1).
    #[allow(clippy::too_many_arguments)]
    fn blas_linear(&self, blas: &CudaBlas, x: &T, w: &T, bias: Option<&T>, r: usize, n: usize, k: usize) -> Result<T> {
        let mut out = self.zeros_f32(r * n)?;
        if r == 0 || n == 0 {
            return Ok(Self::out(&[r, n], out));
        }
        if let Some(b) = bias {
            let f = self.function("matmul_tc.cu", "fill_rows")?;
            let (count, cols) = ((r * n) as u64, n as u32);
            // SAFETY: matches kernels/matmul_tc.cu fill_rows(bias, out, n, cols).
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(Self::f32s(b, "linear bias")?)
                    .arg(&mut out)
                    .arg(&count)
                    .arg(&cols)
                    .launch(grid_1d(r * n, 256))
            }
            .map_err(derr)?;
        }
        let beta = if bias.is_some() { 1.0f32 } else { 0.0 };
        let cfg = linear_gemm(r, n, k, beta)?;
        let xs = Self::f32s(x, "linear input")?;
        match w.buffer() {
            CudaBuffer::F32(ws) => {
                // SAFETY: w holds n·k, x r·k and out r·n f32 values, as the sizes say.
                unsafe { blas.gemm(cfg, ws, xs, &mut out) }.map_err(derr)?;
            }
            CudaBuffer::Half(ws) => {
                let bf16 = w.dtype() == DType::BF16;
                let mut xh = self.stream.alloc_zeros::<u16>(r * k).map_err(derr)?;
                let f = self.function("matmul_tc.cu", "to_half")?;
                let (count, flag) = ((r * k) as u64, bf16 as u32);
                // SAFETY: matches kernels/matmul_tc.cu to_half(x, out, n, bf16); both hold r·k.
                unsafe {
                    self.stream
                        .launch_builder(&f)
                        .arg(xs)
                        .arg(&mut xh)
                        .arg(&count)
                        .arg(&flag)
                        .launch(grid_1d(r * k, 256))
                }
                .map_err(derr)?;
                let ty =
                    if bf16 { blas_sys::cudaDataType_t::CUDA_R_16BF } else { blas_sys::cudaDataType_t::CUDA_R_16F };
                let (a, _ra) = ws.device_ptr(&self.stream);
                let (b, _rb) = xh.device_ptr(&self.stream);
                let (c, _rc) = out.device_ptr_mut(&self.stream);
                // SAFETY: as the f32 case, with A and B as 16-bit values of `ty`, C f32 and
                // f32 scalars for CUBLAS_COMPUTE_32F; the guards keep the buffers' stream
                // order until the call is enqueued.
                unsafe {
                    cudarc::cublas::result::gemm_ex(
                        *blas.handle(),
                        cfg.transa,
                        cfg.transb,
                        cfg.m,
                        cfg.n,
                        cfg.k,
                        (&cfg.alpha as *const f32).cast(),
                        a as *const _,
                        ty,
                        cfg.lda,
                        b as *const _,
                        ty,
                        cfg.ldb,
                        (&cfg.beta as *const f32).cast(),
                        c as *mut _,
                        blas_sys::cudaDataType_t::CUDA_R_32F,
                        cfg.ldc,
                        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .map_err(derr)?;
            }
            CudaBuffer::I32(_) => return Err(Error::Invalid("linear weight stored as i32".into())),
        }
        Ok(Self::out(&[r, n], out))
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            backend: "cuda".into(),
            device: format!("{} ({})", self.name, self.arch),
            storage_dtypes: vec![DType::F32, DType::F16, DType::BF16],
            max_buffer_bytes: self.ctx.total_mem().unwrap_or(0) as u64,
            subgroups: true,
            threads: 0,
            half_inputs: self.tensor_cores,
        }
    }

    fn upload_as(&self, t: &HostTensor, dtype: DType) -> Result<T> {
        let buf = match (&t.data, dtype) {
            (HostData::F32(v), DType::F32) => CudaBuffer::F32(self.htod(v)?),
            (HostData::F32(v), DType::F16 | DType::BF16) => {
                // Non-weight tensors are rounded to the dtype and kept in f32 (as on wgpu).
                let r: Vec<f32> = v
                    .iter()
                    .map(|&x| {
                        if dtype == DType::F16 {
                            half::f16::from_f32(x).to_f32()
                        } else {
                            half::bf16::from_f32(x).to_f32()
                        }
                    })
                    .collect();
                return Ok(Self::out(&t.shape, self.htod(&r)?));
            }
            (HostData::I32(v), DType::I32) => CudaBuffer::I32(self.htod(v)?),
            _ => {
                return Err(Error::Unsupported {
                    backend: "cuda".into(),
                    what: format!("storing {} data as {dtype}", t.dtype()),
                })
            }
        };
        Ok(Tensor::from_parts(buf, t.shape.clone(), dtype))
    }

    fn upload_weight(&self, t: &HostTensor, dtype: DType) -> Result<T> {
        let v = t.as_f32("weight")?;
        let bits: Vec<u16> = match dtype {
            DType::F32 => return self.upload_as(t, DType::F32),
            DType::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect(),
            DType::BF16 => v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect(),
            d => return Err(Error::Unsupported { backend: "cuda".into(), what: format!("{d} weights") }),
        };
        let s = self.htod(&bits)?;
        Ok(Tensor::from_parts(CudaBuffer::Half(s), t.shape.clone(), dtype))
    }

    fn download(&self, t: &T) -> Result<HostTensor> {
        self.settle_checks()?;
        let n = t.numel();
        match t.buffer() {
            CudaBuffer::F32(s) => HostTensor::f32(t.shape(), self.stream.clone_dtoh(&s.slice(..n)).map_err(derr)?),
            CudaBuffer::I32(s) => HostTensor::i32(t.shape(), self.stream.clone_dtoh(&s.slice(..n)).map_err(derr)?),
            CudaBuffer::Half(s) => {
                let bits = self.stream.clone_dtoh(&s.slice(..n)).map_err(derr)?;
                let v = bits
                    .iter()
                    .map(|&b| {
                        if t.dtype() == DType::F16 {
                            half::f16::from_bits(b).to_f32()
                        } else {
                            half::bf16::from_bits(b).to_f32()
                        }
                    })
                    .collect();
                HostTensor::f32(t.shape(), v)
            }
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(derr)?;
        self.settle_checks()
    }

    fn linear(&self, x: &T, w: &T, bias: Option<&T>) -> Result<T> {
        let (r, k) = x.dims2("linear input")?;
        let (n, wk) = w.dims2("linear weight")?;
        if wk != k {
            return Err(Error::shape("linear weight", format!("[out, {k}]"), w.shape()));
        }
        if let Some(b) = bias {
            if b.shape() != [n] {
                return Err(Error::shape("linear bias", format!("[{n}]"), b.shape()));
            }
        }
        match &self.blas {
            Some(blas) if w.dtype() == DType::F32 || self.tensor_cores => self.blas_linear(blas, x, w, bias, r, n, k),
            _ => {
                let offsets = self.htod(&[0i32, r as i32])?;
                Ok(self.grouped_impl(x, &offsets, 1, w, bias, None)?.0)
            }
        }
    }

    fn grouped_linear(&self, x: &T, offsets: &T, w: &T, bias: Option<&T>) -> Result<T> {
        let (_, k) = x.dims2("grouped input")?;
        let (g, n, wk) = w.dims3("expert weights")?;
        if wk != k {
            return Err(Error::shape("expert weights", format!("[experts, out, {k}]"), w.shape()));
        }
        if offsets.shape() != [g + 1] {
            return Err(Error::shape("offsets", format!("[{}]", g + 1), offsets.shape()));
        }
        if let Some(b) = bias {
            if b.shape() != [g, n] {
                return Err(Error::shape("expert biases", format!("[{g}, {n}]"), b.shape()));
            }
        }
        Ok(self.grouped_impl(x, Self::i32s(offsets, "offsets")?, g, w, bias, None)?.0)
    }

    fn grouped_mlp(
        &self,
        xp: &T,
        offsets: &T,
        w: &moe_engine::backend::MlpWeights<'_, Self>,
        keep_pre: bool,
    ) -> Result<moe_engine::backend::MlpOutput<Self>> {
        let moe_engine::config::ExpertKind::Glu { activation } = w.kind else {
            return moe_engine::backend::grouped_mlp_unfused(self, xp, offsets, w, keep_pre);
        };
        let (g, n, wk) = w.w_in.dims3("expert weights")?;
        let (_, k) = xp.dims2("grouped input")?;
        if wk != k {
            return Err(Error::shape("expert weights", format!("[experts, out, {k}]"), w.w_in.shape()));
        }
        if let Some(b) = w.b_in {
            if b.shape() != [g, n] {
                return Err(Error::shape("expert biases", format!("[{g}, {n}]"), b.shape()));
            }
        }
        if n % 2 != 0 || offsets.shape() != [g + 1] {
            return moe_engine::backend::grouped_mlp_unfused(self, xp, offsets, w, keep_pre);
        }
        let (h, pre) = self.grouped_impl(
            xp,
            Self::i32s(offsets, "offsets")?,
            g,
            w.w_in,
            w.b_in,
            Some((activation.kernel_code(), keep_pre)),
        )?;
        let w_out = w.w_out.ok_or_else(|| Error::MissingTensor("w_out (output projection)".into()))?;
        let y = self.grouped_linear(&h, offsets, w_out, w.b_out)?;
        Ok(moe_engine::backend::MlpOutput { pre, y })
    }

    fn activation(&self, x: &T, act: Activation) -> Result<T> {
        let xs = Self::f32s(x, "activation input")?;
        let a = act.kernel_code();
        let (f, mut out, n) = self.ew_prep("activation", x.shape())?;
        let nn = n as u64;
        if n > 0 {
            // SAFETY: the argument list matches kernels/elementwise.cu activation.
            unsafe { self.stream.launch_builder(&f).arg(xs).arg(&mut out).arg(&nn).arg(&a).launch(grid_1d(n, 256)) }
                .map_err(derr)?;
        }
        Ok(Self::out(x.shape(), out))
    }

    fn glu(&self, x: &T, act: Activation) -> Result<T> {
        let (r, two_i) = x.dims2("glu input")?;
        if two_i % 2 != 0 {
            return Err(Error::shape("glu input", "[rows, 2·ffn] (gate columns, then up)", x.shape()));
        }
        let xs = Self::f32s(x, "glu input")?;
        let (cols, a) = ((two_i / 2) as u32, act.kernel_code());
        let (f, mut out, n) = self.ew_prep("glu", &[r, two_i / 2])?;
        let nn = n as u64;
        if n > 0 {
            // SAFETY: the argument list matches kernels/elementwise.cu glu.
            unsafe {
                self.stream.launch_builder(&f).arg(xs).arg(&mut out).arg(&nn).arg(&cols).arg(&a).launch(grid_1d(n, 256))
            }
            .map_err(derr)?;
        }
        Ok(Self::out(&[r, two_i / 2], out))
    }

    fn mul(&self, a: &T, b: &T) -> Result<T> {
        if a.shape() != b.shape() {
            return Err(Error::shape("mul rhs", format!("{:?}", a.shape()), b.shape()));
        }
        let (x, y) = (Self::f32s(a, "mul lhs")?, Self::f32s(b, "mul rhs")?);
        let (f, mut out, n) = self.ew_prep("mul", a.shape())?;
        let nn = n as u64;
        if n > 0 {
            // SAFETY: the argument list matches kernels/elementwise.cu mul.
            unsafe { self.stream.launch_builder(&f).arg(x).arg(y).arg(&mut out).arg(&nn).launch(grid_1d(n, 256)) }
                .map_err(derr)?;
        }
        Ok(Self::out(a.shape(), out))
    }

    fn add_gated(&self, a: &T, b: &T, gate: Option<&T>) -> Result<T> {
        let (r, m) = a.dims2("add_gated lhs")?;
        if b.shape() != a.shape() {
            return Err(Error::shape("shared expert output", format!("[{r}, {m}]"), b.shape()));
        }
        let g = match gate {
            Some(g) if g.shape() != [r, 1] => {
                return Err(Error::shape("shared_expert_gate logits", format!("[{r}, 1]"), g.shape()))
            }
            Some(g) => Some(Self::f32s(g, "shared_expert_gate logits")?),
            None => None,
        };
        let (x, y, gb) =
            (Self::f32s(a, "add_gated lhs")?, Self::f32s(b, "shared expert output")?, g.unwrap_or(&self.dummy));
        let (cols, gated) = (m as u32, g.is_some() as u32);
        let (f, mut out, n) = self.ew_prep("add_gated", &[r, m])?;
        let nn = n as u64;
        if n > 0 {
            // SAFETY: the argument list matches kernels/elementwise.cu add_gated.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(x)
                    .arg(y)
                    .arg(gb)
                    .arg(&mut out)
                    .arg(&nn)
                    .arg(&cols)
                    .arg(&gated)
                    .launch(grid_1d(n, 256))
            }
            .map_err(derr)?;
        }
        Ok(Self::out(&[r, m], out))
    }

    fn residual_mix(&self, moe: &T, mlp: &T, coef: &T) -> Result<T> {
        let (r, m) = moe.dims2("moe output")?;
        if mlp.shape() != moe.shape() {
            return Err(Error::shape("residual mlp output", format!("[{r}, {m}]"), mlp.shape()));
        }
        if coef.shape() != [r, 2] {
            return Err(Error::shape("coefficient logits", format!("[{r}, 2]"), coef.shape()));
        }
        let (a, b, c) = (
            Self::f32s(moe, "moe output")?,
            Self::f32s(mlp, "residual mlp output")?,
            Self::f32s(coef, "coefficient logits")?,
        );
        let cols = m as u32;
        let (f, mut out, n) = self.ew_prep("residual_mix", &[r, m])?;
        let nn = n as u64;
        if n > 0 {
            // SAFETY: the argument list matches kernels/elementwise.cu residual_mix.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(a)
                    .arg(b)
                    .arg(c)
                    .arg(&mut out)
                    .arg(&nn)
                    .arg(&cols)
                    .launch(grid_1d(n, 256))
            }
            .map_err(derr)?;
        }
        Ok(Self::out(&[r, m], out))
    }

    fn route(&self, logits: &T, spec: &RouteSpec<'_, Self>) -> Result<Routes<Self>> {
        let (s, e) = logits.dims2("logits")?;
        let k = spec.k;
        spec.validate(e)?;
        if e > 1024 {
            return Err(Error::Unsupported {
                backend: "cuda".into(),
                what: format!("{e} experts (the route kernel takes up to 1024)"),
            });
        }
        let (choice, n_group, topk_group, group_score) = match spec.choice {
            Choice::TopK => (0, 0, 0, 0),
            Choice::DeepSpeedTop2 => (1, 0, 0, 0),
            Choice::GroupLimited { n_group, topk_group, group_score } => {
                if n_group > 64 {
                    return Err(Error::Unsupported {
                        backend: "cuda".into(),
                        what: format!("{n_group} expert groups (up to 64)"),
                    });
                }
                (2, n_group as u32, topk_group as u32, if group_score == GroupScore::Max { 0 } else { 1 })
            }
        };
        let bias = match spec.bias {
            Some(b) if b.shape() != [e] => {
                return Err(Error::shape("e_score_correction_bias", format!("[{e}]"), b.shape()))
            }
            Some(b) => Some(Self::f32s(b, "e_score_correction_bias")?),
            None => None,
        };
        let noise = match spec.choice_noise {
            Some(n) if n.shape() != [s, e] => {
                return Err(Error::shape("choice noise (gumbel)", format!("[{s}, {e}]"), n.shape()))
            }
            Some(n) => Some(Self::f32s(n, "gumbel")?),
            None => None,
        };
        let (normalize, eps) = match spec.normalize {
            Normalize::None => (0, 0.0),
            Normalize::Sum => (1, 0.0),
            Normalize::SumPlus(eps) => (2, eps),
        };
        let p = RouteParams {
            s: s as u32,
            e: e as u32,
            k: k as u32,
            score_fn: if spec.score == ScoreFn::Softmax { 0 } else { 1 },
            choice,
            has_bias: bias.is_some() as u32,
            has_noise: noise.is_some() as u32,
            normalize,
            eps,
            scale: spec.scale,
            n_group,
            topk_group,
            group_score,
        };
        let l = Self::f32s(logits, "logits")?;
        let mut scores = self.zeros_f32(s * e)?;
        let mut experts = self.zeros_i32(s * k)?;
        let mut weights = self.zeros_f32(s * k)?;
        if s > 0 {
            let f = self.function("route.cu", "route")?;
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            let cfg =
                LaunchConfig { grid_dim: (s.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: matches kernels/route.cu route(logits, bias, noise, scores, experts,
            // weights, status, params); one warp per token.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(l)
                    .arg(bias.unwrap_or(&self.dummy))
                    .arg(noise.unwrap_or(&self.dummy))
                    .arg(&mut scores)
                    .arg(&mut experts)
                    .arg(&mut weights)
                    .arg(&mut *status)
                    .arg(&p)
                    .launch(cfg)
            }
            .map_err(derr)?;
            drop(status);
            // The logits stay alive with the check (an Arc'd tensor would avoid this copy;
            // the copy is only read if a non-finite value was flagged).
            *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some((l.clone(), e));
        }
        Ok(Routes {
            experts: Self::out_i32(&[s, k], experts),
            weights: Self::out(&[s, k], weights),
            scores: Self::out(&[s, e], scores),
        })
    }

    fn plan(&self, routes: &Routes<Self>, spec: &PlanSpec<'_, Self>) -> Result<Plan<Self>> {
        let (s, k) = routes.experts.dims2("routes.experts")?;
        let e = spec.num_experts;
        let w = spec.kernel_params(s, k, routes.weights.shape())?;
        let (n_groups, keep) = (w[4] as usize, w[8]);
        let p = PlanParams {
            s: w[0],
            k: w[1],
            e: w[2],
            group: w[3],
            n_groups: w[4],
            cap_rule: w[5],
            cap_value: w[6],
            clamp: w[7],
            keep: w[8],
            has_used: w[9],
            renorm: w[10],
        };
        let used = spec.used_token.map(|u| Self::f32s(u, "used_token")).transpose()?;
        let priority = match &spec.keep {
            KeepPolicy::Priority(p) => Some(Self::f32s(p, "priority")?),
            _ => None,
        };
        let (sk, ge) = (s * k, n_groups * e);
        let ex = Self::i32s(&routes.experts, "routes.experts")?;
        let rw = Self::f32s(&routes.weights, "routes.weights")?;
        let used = used.unwrap_or(&self.dummy);
        let priority = priority.unwrap_or(&self.dummy);
        let mut scratch = self.zeros_i32(4 * ge + sk + 2 * s)?;
        let mut info = self.zeros_i32(4 * e + 6)?;
        let mut sr = self.zeros_i32(2 * sk)?;
        let mut pw = self.zeros_f32(sk)?;
        let f = |name: &str| self.function("plan.cu", name);
        let one = grid_1d(1, 1);
        // SAFETY (all launches below): argument lists match kernels/plan.cu; buffers are
        // sized by the layout documented there.
        unsafe {
            let st = &self.stream;
            st.launch_builder(&f("plan_count")?)
                .arg(ex)
                .arg(used)
                .arg(&mut scratch)
                .arg(&p)
                .launch(grid_1d(ge, 64))
                .map_err(derr)?;
            st.launch_builder(&f("plan_capacity")?)
                .arg(used)
                .arg(&mut scratch)
                .arg(&mut info)
                .arg(&p)
                .launch(one)
                .map_err(derr)?;
            if keep == 2 {
                st.launch_builder(&f("plan_rank")?)
                    .arg(ex)
                    .arg(used)
                    .arg(priority)
                    .arg(&mut scratch)
                    .arg(&info)
                    .arg(&p)
                    .launch(grid_1d(sk, 64))
                    .map_err(derr)?;
            }
            st.launch_builder(&f("plan_slots")?)
                .arg(ex)
                .arg(used)
                .arg(&mut scratch)
                .arg(&info)
                .arg(&mut sr)
                .arg(&p)
                .launch(grid_1d(ge, 64))
                .map_err(derr)?;
            st.launch_builder(&f("plan_offsets")?)
                .arg(&mut scratch)
                .arg(&mut info)
                .arg(&p)
                .launch(one)
                .map_err(derr)?;
            st.launch_builder(&f("plan_finish")?)
                .arg(ex)
                .arg(rw)
                .arg(used)
                .arg(&mut scratch)
                .arg(&mut sr)
                .arg(&mut pw)
                .arg(&p)
                .launch(grid_1d(s, 64))
                .map_err(derr)?;
            st.launch_builder(&f("plan_stats")?).arg(&scratch).arg(&mut info).arg(&p).launch(one).map_err(derr)?;
        }
        let part = |src: &CudaSlice<i32>, at: usize, len: usize| -> Result<CudaSlice<i32>> {
            let mut dst = self.zeros_i32(len)?;
            if len > 0 {
                self.stream.memcpy_dtod(&src.slice(at..at + len), &mut dst).map_err(derr)?;
            }
            Ok(dst)
        };
        Ok(Plan {
            counts: Self::out_i32(&[e], part(&info, 0, e)?),
            first_counts: Self::out_i32(&[e], part(&info, e, e)?),
            kept_counts: Self::out_i32(&[e], part(&info, 2 * e, e)?),
            offsets: Self::out_i32(&[e + 1], part(&info, 3 * e, e + 1)?),
            stats: Self::out_i32(&[4], part(&info, 4 * e + 1, 4)?),
            slots: Self::out_i32(&[s, k], part(&sr, 0, sk)?),
            rows: Self::out_i32(&[s, k], part(&sr, sk, sk)?),
            weights: Self::out(&[s, k], pw),
        })
    }

    fn permute(&self, x: &T, plan: &Plan<Self>) -> Result<T> {
        let (s, m) = x.dims2("x")?;
        let (ps, k) = plan.rows.dims2("plan.rows")?;
        if ps != s {
            return Err(Error::shape("plan.rows", format!("[{s}, k]"), plan.rows.shape()));
        }
        let n = s * k * m;
        let mut out = self.zeros_f32(n)?;
        if n > 0 {
            let f = self.function("permute.cu", "permute")?;
            let (nn, cols, kk) = (n as u64, m as u32, k as u32);
            // SAFETY: matches kernels/permute.cu permute(x, rows, out, n, cols, k).
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(Self::f32s(x, "x")?)
                    .arg(Self::i32s(&plan.rows, "plan.rows")?)
                    .arg(&mut out)
                    .arg(&nn)
                    .arg(&cols)
                    .arg(&kk)
                    .launch(grid_1d(n, 256))
            }
            .map_err(derr)?;
        }
        Ok(Self::out(&[s * k, m], out))
    }

    fn combine(&self, yp: &T, plan: &Plan<Self>) -> Result<T> {
        let (_, m) = yp.dims2("expert output")?;
        let (s, k) = plan.rows.dims2("plan.rows")?;
        let n = s * m;
        let mut out = self.zeros_f32(n)?;
        if n > 0 {
            let f = self.function("permute.cu", "combine")?;
            let (nn, cols, kk) = (n as u64, m as u32, k as u32);
            // SAFETY: matches kernels/permute.cu combine(yp, rows, w, out, n, cols, k).
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(Self::f32s(yp, "expert output")?)
                    .arg(Self::i32s(&plan.rows, "plan.rows")?)
                    .arg(Self::f32s(&plan.weights, "plan.weights")?)
                    .arg(&mut out)
                    .arg(&nn)
                    .arg(&cols)
                    .arg(&kk)
                    .launch(grid_1d(n, 256))
            }
            .map_err(derr)?;
        }
        Ok(Self::out(&[s, m], out))
    }

    fn router_stats(&self, logits: &T, scores: &T) -> Result<T> {
        let (s, e) = logits.dims2("logits")?;
        if scores.shape() != [s, e] {
            return Err(Error::shape("scores", format!("[{s}, {e}]"), scores.shape()));
        }
        let mut out = self.zeros_f32(e + 1)?;
        let f = self.function("stats.cu", "router_stats")?;
        let (ss, ee) = (s as u32, e as u32);
        // SAFETY: matches kernels/stats.cu router_stats(logits, scores, out, s, e).
        unsafe {
            self.stream
                .launch_builder(&f)
                .arg(Self::f32s(logits, "logits")?)
                .arg(Self::f32s(scores, "scores")?)
                .arg(&mut out)
                .arg(&ss)
                .arg(&ee)
                .launch(grid_1d(e + 1, 64))
        }
        .map_err(derr)?;
        Ok(Self::out(&[e + 1], out))
    }

    fn noise(&self, kind: NoiseKind, seed: u64, stream: u32, shape: &[usize]) -> Result<T> {
        let n: usize = shape.iter().product();
        let mut out = self.zeros_f32(n)?;
        if n > 0 {
            let (code, eps) = match kind {
                NoiseKind::Uniform => (0u32, 0.0f32),
                NoiseKind::Jitter(eps) => (1, eps),
                NoiseKind::Gumbel => (2, 0.0),
            };
            let f = self.function("philox.cu", "noise")?;
            let (nn, lo, hi) = (n as u64, seed as u32, (seed >> 32) as u32);
            // SAFETY: matches kernels/philox.cu noise(out, n, seed_lo, seed_hi, stream, kind, eps).
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(&mut out)
                    .arg(&nn)
                    .arg(&lo)
                    .arg(&hi)
                    .arg(&stream)
                    .arg(&code)
                    .arg(&eps)
                    .launch(grid_1d(n, 256))
            }
            .map_err(derr)?;
        }
        Ok(Self::out(shape, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GEMM as the BLAS reference defines it (column-major, leading dimensions, op = N or
    /// T): C = alpha · op(A) · op(B) + beta · C.
    fn reference_gemm(cfg: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let t = |op| op == blas_sys::cublasOperation_t::CUBLAS_OP_T;
        let (m, n, k) = (cfg.m as usize, cfg.n as usize, cfg.k as usize);
        let (lda, ldb, ldc) = (cfg.lda as usize, cfg.ldb as usize, cfg.ldc as usize);
        for j in 0..n {
            for i in 0..m {
                let mut s = 0.0f32;
                for l in 0..k {
                    let av = if t(cfg.transa) { a[l + i * lda] } else { a[i + l * lda] };
                    let bv = if t(cfg.transb) { b[j + l * ldb] } else { b[l + j * ldb] };
                    s += av * bv;
                }
                c[i + j * ldc] = cfg.alpha * s + cfg.beta * c[i + j * ldc];
            }
        }
    }

    #[test]
    fn the_cublas_call_computes_row_major_x_times_w_transposed() {
        let (r, n, k) = (5, 3, 4);
        let x: Vec<f32> = (0..r * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.91).cos()).collect();
        let bias = [0.5f32, -1.0, 2.0];
        let mut out: Vec<f32> = (0..r * n).map(|i| bias[i % n]).collect();
        reference_gemm(&linear_gemm(r, n, k, 1.0).expect("sizes"), &w, &x, &mut out);
        for row in 0..r {
            for col in 0..n {
                let want: f32 = (0..k).map(|l| x[row * k + l] * w[col * k + l]).sum::<f32>() + bias[col];
                approx::assert_relative_eq!(out[row * n + col], want, max_relative = 1e-6);
            }
        }
    }

    #[test]
    fn sizes_beyond_cublas_are_an_error_naming_the_dimension() {
        let err = linear_gemm(1 << 31, 8, 8, 0.0).expect_err("too many rows");
        assert!(err.to_string().contains("rows"), "{err}");
    }
}
