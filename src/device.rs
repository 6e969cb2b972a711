//! The device a backend runs on: its buffers, what it can do, its memory, and moving
//! tensors to and from it. [`crate::backend::Backend`] builds the ops on top of this.
//!
//! The uploads have front doors like every op: `upload_as`, `upload` and `upload_weight`
//! check the tensor (dtype the device stores, size within its largest buffer) and then
//! call the device's `run_upload*` work, which receives only checked uploads.

use crate::device_tensor::{DeviceBuffer, DeviceTensor};
use crate::error::{human_bytes, Error, Result};
use crate::tensor::{DType, HostTensor};

/// A tensor on device `B`: the handle over `B`'s buffers.
pub type Tensor<B> = DeviceTensor<<B as Device>::Buffer>;

/// What a backend and its device can do, reported up front instead of failing late.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Capabilities {
    /// Backend name (`cpu`, `wgpu`, `cuda`).
    pub backend: String,
    /// Human-readable device name.
    pub device: String,
    /// Storage dtypes for weights (f32 is always present).
    pub storage_dtypes: Vec<DType>,
    /// Largest single tensor in bytes (weights may be split by backends that split them).
    pub max_buffer_bytes: u64,
    /// Whether subgroup (warp) operations are used.
    pub subgroups: bool,
    /// Worker threads (cpu) or 0 where not meaningful.
    pub threads: usize,
    /// Products with f16/bf16 weights may round their f32 inputs to the weights' type first
    /// (tensor cores and AVX-512 BF16 take both operands in one type, as in PyTorch's bf16
    /// models), so they agree with f32-input products to that type's precision rather than
    /// to f32's.
    pub half_inputs: bool,
    /// Most experts the route op takes (`None`: no limit).
    pub max_route_experts: Option<usize>,
    /// Most expert groups group-limited routing takes (`None`: no limit).
    pub max_route_groups: Option<usize>,
}

/// A checked upload of a host tensor in its own dtype (f32 or i32).
#[non_exhaustive]
pub struct UploadOp<'a> {
    /// The tensor.
    pub tensor: &'a HostTensor,
}

impl<'a> UploadOp<'a> {
    /// Checks that the tensor fits the device's largest buffer.
    pub fn check<B: Device>(b: &B, tensor: &'a HostTensor) -> Result<Self> {
        let bytes = (tensor.numel() as u64).saturating_mul(tensor.dtype().size() as u64);
        let max = b.capabilities().max_buffer_bytes;
        if bytes > max {
            return Err(Error::too_large(
                format!("tensor of shape {:?}", tensor.shape()),
                human_bytes(bytes),
                format!("the largest buffer backend {} allocates ({})", b.name(), human_bytes(max)),
            ));
        }
        Ok(UploadOp { tensor })
    }
}

/// A checked upload of a weight matrix `[N, K]` or stack `[G, N, K]` in a storage dtype
/// the device lists.
#[non_exhaustive]
pub struct WeightUploadOp<'a> {
    /// The f32 values.
    pub tensor: &'a HostTensor,
    /// Storage dtype (f32, f16 or bf16).
    pub dtype: DType,
    /// Groups G (1 for a matrix), rows N, columns K.
    pub dims: (usize, usize, usize),
}

impl<'a> WeightUploadOp<'a> {
    /// Checks shape, data type and storage dtype.
    pub fn check<B: Device>(b: &B, tensor: &'a HostTensor, dtype: DType) -> Result<Self> {
        let dims = match tensor.shape()[..] {
            [n, k] => (1, n, k),
            [g, n, k] => (g, n, k),
            _ => return Err(Error::shape("weight", "[out, in] or [groups, out, in]", tensor.shape())),
        };
        tensor.as_f32("weight")?;
        if !dtype.is_float() {
            return Err(Error::dtype("weight", "f32, f16 or bf16 storage", dtype));
        }
        storable(b, dtype)?;
        Ok(WeightUploadOp { tensor, dtype, dims })
    }
}

/// Errors unless the device stores `dtype` (i32 index tensors are always stored).
pub(crate) fn storable<B: Device>(b: &B, dtype: DType) -> Result<()> {
    let caps = b.capabilities();
    if dtype != DType::I32 && !caps.storage_dtypes.contains(&dtype) {
        let list: Vec<String> = caps.storage_dtypes.iter().map(|d| d.to_string()).collect();
        return Err(Error::unsupported(b.name(), format!("{dtype} storage (it stores {})", list.join(", "))));
    }
    Ok(())
}

/// Errors (internal: the device's bug) unless `t` has `shape` and `dtype`.
pub(crate) fn returned<B: Device>(b: &B, op: &str, t: Tensor<B>, shape: &[usize], dtype: DType) -> Result<Tensor<B>> {
    if t.shape() != shape || t.dtype() != dtype {
        return Err(Error::Internal(format!(
            "backend {} returned a {} tensor of shape {:?} from `{op}`, which promises {dtype} {shape:?}",
            b.name(),
            t.dtype(),
            t.shape()
        )));
    }
    Ok(t)
}

/// A device: buffers, capabilities, memory, and the queue that moves tensors. See the
/// module docs; callers use the provided front doors, devices implement the `run_*` work.
pub trait Device: Send + Sync + Sized + 'static {
    /// A device buffer handle.
    type Buffer: DeviceBuffer;

    /// Short backend name (`cpu`, `wgpu`, `cuda`).
    fn name(&self) -> &'static str;
    /// What this backend and device can do (read once when the backend is made).
    fn capabilities(&self) -> &Capabilities;
    /// Bytes of device memory free now, where the device says (the cpu: the host's
    /// available memory). Layers check their weights against it before uploading.
    fn available_memory(&self) -> Option<u64> {
        None
    }

    /// Copies a checked host tensor to the device in its own dtype (f32 or i32).
    fn run_upload(&self, op: &UploadOp<'_>) -> Result<Tensor<Self>>;
    /// Uploads a checked weight matrix or stack in the storage dtype and layout this
    /// device's products run fastest on; [`Device::download`] returns the logical
    /// `[.., N, K]` values. The default stores f32 as data.
    fn run_upload_weight(&self, op: &WeightUploadOp<'_>) -> Result<Tensor<Self>> {
        if op.dtype != DType::F32 {
            return Err(Error::Internal(format!(
                "backend {} lists {} storage but cannot upload it",
                self.name(),
                op.dtype
            )));
        }
        self.run_upload(&UploadOp::check(self, op.tensor)?)
    }
    /// Copies a device tensor to the host (f16/bf16 come back as f32); waits for the
    /// queue and reports errors found on the device since the last download.
    fn run_download(&self, t: &Tensor<Self>) -> Result<HostTensor>;
    /// Waits until every enqueued op has finished.
    fn synchronize(&self) -> Result<()>;

    /// Copies a host tensor to the device, stored as `dtype`: i32 data as i32; f32 data as
    /// f32, or rounded to f16 / bf16 (and kept in f32) where the device lists the type (a
    /// bias next to half-precision weights, say), the same on every device.
    fn upload_as(&self, t: &HostTensor, dtype: DType) -> Result<Tensor<Self>> {
        let out = match (t.dtype(), dtype) {
            (DType::I32, DType::I32) | (DType::F32, DType::F32) => self.run_upload(&UploadOp::check(self, t)?)?,
            (DType::F32, DType::F16 | DType::BF16) => {
                storable(self, dtype)?;
                let r = t.rounded(dtype)?;
                self.run_upload(&UploadOp::check(self, &r)?)?
            }
            (have, want) => return Err(Error::dtype("uploaded tensor", format!("data convertible to {want}"), have)),
        };
        let stored = if t.dtype() == DType::I32 { DType::I32 } else { DType::F32 };
        returned(self, "upload", out, t.shape(), stored)
    }

    /// Copies a host tensor to the device in its own dtype.
    fn upload(&self, t: &HostTensor) -> Result<Tensor<Self>> {
        self.upload_as(t, t.dtype())
    }

    /// Uploads a weight matrix `[out, in]` or stack `[G, out, in]` (the right operand of
    /// the products) in `dtype` storage. The logical shape is unchanged and
    /// [`Device::download`] returns the original layout.
    fn upload_weight(&self, t: &HostTensor, dtype: DType) -> Result<Tensor<Self>> {
        let op = WeightUploadOp::check(self, t, dtype)?;
        returned(
            self,
            "upload_weight",
            crate::profile::time("upload_weight", || self.run_upload_weight(&op))?,
            t.shape(),
            dtype,
        )
    }

    /// Copies a device tensor to the host (f16/bf16 come back as f32); waits for the queue.
    fn download(&self, t: &Tensor<Self>) -> Result<HostTensor> {
        let h = self.run_download(t)?;
        if h.shape() != t.shape() {
            return Err(Error::Internal(format!(
                "backend {} downloaded shape {:?} for a tensor of shape {:?}",
                self.name(),
                h.shape(),
                t.shape()
            )));
        }
        Ok(h)
    }
}
