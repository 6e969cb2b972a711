//! Uploads: host tensors onto the device, as data or as matrix-product weights.

use crate::backend::Backend;
use crate::error::{human_bytes, Error, Result};
use crate::tensor::{DType, HostTensor};

/// A checked upload of a host tensor in its own dtype (f32 or i32).
#[non_exhaustive]
pub struct UploadOp<'a> {
    /// The tensor.
    pub tensor: &'a HostTensor,
}

impl<'a> UploadOp<'a> {
    /// Checks that the tensor fits the backend's largest buffer.
    pub fn check<B: Backend>(b: &B, tensor: &'a HostTensor) -> Result<Self> {
        fits(b, "tensor", tensor)?;
        Ok(UploadOp { tensor })
    }
}

/// A checked upload of a weight matrix `[N, K]` or stack `[G, N, K]` in a storage dtype
/// the backend lists.
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
    pub fn check<B: Backend>(b: &B, tensor: &'a HostTensor, dtype: DType) -> Result<Self> {
        let dims = match tensor.shape()[..] {
            [n, k] => (1, n, k),
            [g, n, k] => (g, n, k),
            _ => return Err(Error::shape("weight", "[out, in] or [groups, out, in]", tensor.shape())),
        };
        tensor.as_f32("weight")?;
        storable(b, dtype)?;
        if !dtype.is_float() {
            return Err(Error::dtype("weight", "f32, f16 or bf16 storage", dtype));
        }
        Ok(WeightUploadOp { tensor, dtype, dims })
    }
}

/// Errors unless the backend stores `dtype`.
pub(crate) fn storable<B: Backend>(b: &B, dtype: DType) -> Result<()> {
    let caps = b.capabilities();
    if dtype != DType::I32 && !caps.storage_dtypes.contains(&dtype) {
        let list: Vec<String> = caps.storage_dtypes.iter().map(|d| d.to_string()).collect();
        return Err(Error::unsupported(b.name(), format!("{dtype} storage (it stores {})", list.join(", "))));
    }
    Ok(())
}

fn fits<B: Backend>(b: &B, what: &str, t: &HostTensor) -> Result<()> {
    let bytes = (t.numel() as u64).saturating_mul(t.dtype().size() as u64);
    let max = b.capabilities().max_buffer_bytes;
    if bytes > max {
        return Err(Error::too_large(
            format!("{what} of shape {:?}", t.shape()),
            human_bytes(bytes),
            format!("the largest buffer backend {} allocates ({})", b.name(), human_bytes(max)),
        ));
    }
    Ok(())
}

/// The front door of `upload_as`: `t` stored as `dtype`. i32 data stays i32; f32 data
/// asked for in f16 / bf16 (a bias next to half-precision weights, say) is rounded to
/// that type on the host and kept in f32, the same on every backend that lists the type.
pub(crate) fn upload_as<B: Backend>(b: &B, t: &HostTensor, dtype: DType) -> Result<crate::Tensor<B>> {
    match (t.dtype(), dtype) {
        (DType::I32, DType::I32) | (DType::F32, DType::F32) => b.run_upload(&UploadOp::check(b, t)?),
        (DType::F32, DType::F16 | DType::BF16) => {
            storable(b, dtype)?;
            let r = t.rounded(dtype)?;
            b.run_upload(&UploadOp::check(b, &r)?)
        }
        (have, want) => Err(Error::dtype("uploaded tensor", format!("data convertible to {want}"), have)),
    }
}
