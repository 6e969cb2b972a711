//! The CUDA device: context, stream, compiled modules, cuBLAS, and the buffer helpers every
//! op family's launcher uses.

use crate::probe::{driver_status, nvrtc_status};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use moe_engine::device::Capabilities;
use moe_engine::kernel_abi;
use moe_engine::ops::RouteChecks;
use moe_engine::{DType, Error, Result, Tensor};
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

impl moe_engine::DeviceBuffer for CudaBuffer {
    fn bytes(&self) -> u64 {
        match self {
            CudaBuffer::F32(s) => s.len() as u64 * 4,
            CudaBuffer::I32(s) => s.len() as u64 * 4,
            CudaBuffer::Half(s) => s.len() as u64 * 2,
        }
    }
}

pub(crate) type T = Tensor<CudaBackend>;

/// A kernel parameter block ([`moe_engine::kernel_abi`]) as a by-value kernel argument.
#[repr(transparent)]
pub(crate) struct Param<P>(pub(crate) P);

// SAFETY: the ABI structs are `Pod` with the C layout kernels/abi.cuh declares (checked by
// tests/kernel_abi.rs), so passing their bytes by value is what the kernels read.
unsafe impl<P: bytemuck::Pod> DeviceRepr for Param<P> {}

/// A driver or library error as the engine's, keeping it as the source.
pub(crate) fn derr<E: std::error::Error + Send + Sync + 'static>(e: E) -> Error {
    Error::Backend { backend: "cuda".into(), msg: "a CUDA call failed".into(), source: Some(Box::new(e)) }
}

/// The CUDA backend on one device.
pub struct CudaBackend {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) arch: &'static str,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// The route calls' input checks since the last download: each call's zeroed status
    /// buffer and the inputs its words index.
    pub(crate) checks: RouteChecks<CudaSlice<u32>, T>,
    /// Stand-in for absent optional f32 inputs.
    pub(crate) dummy: CudaSlice<f32>,
    /// cuBLAS on `stream`; `None` where libcublas is absent (dense products then use the
    /// grouped kernels, with a warning at start).
    pub(crate) blas: Option<CudaBlas>,
    /// sm_80 or later: f16/bf16 products on tensor cores (mma.sync m16n8k16 needs sm_80).
    pub(crate) tensor_cores: bool,
    caps: Capabilities,
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
        _ => return Err(Error::unsupported("cuda", format!("compute capability {major}.{minor}"))),
    })
}

impl CudaBackend {
    /// Opens device `ordinal`. No driver, no NVRTC or no such device is an `Err`.
    pub fn new(ordinal: usize) -> Result<Self> {
        driver_status()?;
        nvrtc_status()?;
        let count = CudaContext::device_count().map_err(derr)?;
        if ordinal as i64 >= count as i64 {
            return Err(Error::backend("cuda", format!("device {ordinal} requested, {count} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(derr)?;
        let stream = ctx.default_stream();
        let (major, minor) = ctx.compute_capability().map_err(derr)?;
        let name = ctx.name().map_err(derr)?;
        let dummy = stream.alloc_zeros::<f32>(4).map_err(derr)?;
        let blas = match crate::probe::cublas_status() {
            Ok(()) => Some(CudaBlas::new(stream.clone()).map_err(derr)?),
            Err(e) => {
                tracing::warn!("{e}; dense products fall back to the grouped kernels");
                None
            }
        };
        let arch = arch_name(major, minor)?;
        let tensor_cores = major >= 8;
        let caps = Capabilities {
            backend: "cuda".into(),
            device: format!("{name} ({arch})"),
            storage_dtypes: vec![DType::F32, DType::F16, DType::BF16],
            max_buffer_bytes: ctx.total_mem().map_err(derr)? as u64,
            subgroups: true,
            threads: 0,
            half_inputs: tensor_cores,
            max_route_experts: Some(kernel_abi::ROUTE_MAX_EXPERTS),
            max_route_groups: Some(kernel_abi::ROUTE_MAX_GROUPS),
        };
        Ok(CudaBackend {
            ctx,
            stream,
            arch,
            modules: Mutex::new(HashMap::new()),
            checks: RouteChecks::default(),
            dummy,
            blas,
            tensor_cores,
            caps,
        })
    }

    /// What the device can do.
    pub(crate) fn caps(&self) -> &Capabilities {
        &self.caps
    }

    /// Kernel `name` of `family` (a kernels/*.cu file), compiled on first use.
    pub(crate) fn function(&self, family: &'static str, name: &str) -> Result<CudaFunction> {
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        let module = match mods.get(family) {
            Some(m) => m.clone(),
            None => {
                let src = crate::compile::FAMILIES
                    .iter()
                    .find(|(f, _)| *f == family)
                    .map(|(_, s)| crate::compile::source(s))
                    .ok_or_else(|| Error::Internal(format!("no kernel family {family}")))?;
                let dir = crate::compile::cache_dir();
                let cubin = crate::compile::cached_cubin(family, &src, self.arch, dir.as_deref())?;
                let m = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(derr)?;
                mods.insert(family, m.clone());
                m
            }
        };
        module.load_function(name).map_err(derr)
    }

    /// `n` zeroed values (at least one: zero-byte allocations fail).
    pub(crate) fn zeros<V: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<V>> {
        self.stream.alloc_zeros::<V>(n.max(1)).map_err(derr)
    }

    /// A device copy of `v` (at least one element, as zero-byte allocations fail).
    pub(crate) fn htod<V: DeviceRepr + Copy + ValidAsZeroBits>(&self, v: &[V]) -> Result<CudaSlice<V>> {
        let mut d = self.zeros::<V>(v.len())?;
        if !v.is_empty() {
            self.stream.memcpy_htod(v, &mut d).map_err(derr)?;
        }
        Ok(d)
    }

    /// The f32 slice of a tensor.
    pub(crate) fn f32s<'a>(t: &'a T, name: &str) -> Result<&'a CudaSlice<f32>> {
        match t.buffer() {
            CudaBuffer::F32(s) => Ok(s),
            _ => Err(Error::dtype(name, "f32", t.dtype())),
        }
    }

    /// The i32 slice of a tensor.
    pub(crate) fn i32s<'a>(t: &'a T, name: &str) -> Result<&'a CudaSlice<i32>> {
        match t.buffer() {
            CudaBuffer::I32(s) => Ok(s),
            _ => Err(Error::dtype(name, "i32", t.dtype())),
        }
    }

    /// An f32 tensor over `s`.
    pub(crate) fn out(shape: &[usize], s: CudaSlice<f32>) -> Result<T> {
        T::from_parts(CudaBuffer::F32(s), shape.to_vec(), DType::F32)
    }

    /// An i32 tensor over `s`.
    pub(crate) fn out_i32(shape: &[usize], s: CudaSlice<i32>) -> Result<T> {
        T::from_parts(CudaBuffer::I32(s), shape.to_vec(), DType::I32)
    }

    /// Settles the route calls' input checks: `Err` naming the first bad token (logits) or
    /// element (bias, noise) of the first call that found one.
    pub(crate) fn settle_checks(&self) -> Result<()> {
        self.checks.settle(
            |status| {
                let w = self.stream.clone_dtoh(status).map_err(derr)?;
                Ok([w[0], w[1], w[2]])
            },
            |input, i| {
                let s = Self::f32s(input, "route input")?;
                let one =
                    s.try_slice(i..i + 1).ok_or_else(|| Error::Internal(format!("flag at {i} past its input")))?;
                Ok(self.stream.clone_dtoh(&one).map_err(derr)?[0])
            },
        )
    }
}
