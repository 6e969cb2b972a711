//! `cast_weight`: an f32 tensor on the device stored as a weight in a storage dtype
//! without a trip through the host. The result is exactly what
//! `upload_weight(download(x), dtype)` gives: the same storage layout (the cpu's
//! transposed matrices, wgpu's halves packed two per u32 word and split into parts, CUDA's
//! 16-bit patterns) and the same rounding, bit for bit: round to nearest even as the
//! `half` crate rounds ([`crate::DType::half_bits`]), infinities kept, values past the
//! largest half to infinity, NaN kept a quiet NaN with its sign and the payload's top
//! bits. Mixed-precision training refreshes the compute copies of its f32 master weights
//! with it after every step.

use crate::device::{storable, Device, Tensor};
use crate::error::{Error, Result};
use crate::kernel_abi::CastParams;
use crate::tensor::DType;

/// A checked `cast_weight`: an f32 matrix `[N, K]` or stack `[G, N, K]` and a storage dtype
/// the device lists.
#[non_exhaustive]
pub struct CastWeightOp<'a, B: Device> {
    /// The f32 values (any f32 tensor of the shape: plain, or itself an uploaded weight).
    pub x: &'a Tensor<B>,
    /// The storage dtype of the result (f32, f16 or bf16).
    pub dtype: DType,
    /// Groups G (1 for a matrix), rows N, columns K.
    pub dims: (usize, usize, usize),
    /// Kernel parameters of the rounding kernels (`n` elements, `bf16` 1 for bf16, 0 for
    /// f16; `cols` unused).
    pub params: CastParams,
}

impl<'a, B: Device> CastWeightOp<'a, B> {
    /// Checks the input (f32, `[N, K]` or `[G, N, K]`) and that the device stores `dtype`
    /// (a backend without the half type, such as `CpuBackend::f32_reference`, gets
    /// [`Error::Unsupported`], as for `upload_weight`).
    pub fn check(b: &B, x: &'a Tensor<B>, dtype: DType) -> Result<Self> {
        let dims = match x.shape()[..] {
            [n, k] => (1, n, k),
            [g, n, k] => (g, n, k),
            _ => return Err(Error::shape("cast_weight input", "[out, in] or [groups, out, in]", x.shape())),
        };
        x.expect_dtype("cast_weight input", DType::F32)?;
        if !dtype.is_float() {
            return Err(Error::dtype("cast_weight storage", "f32, f16 or bf16", dtype));
        }
        storable(b, dtype)?;
        // The input exists, so its element count is sized; the result is no larger in
        // bytes, and wgpu splits it into parts where upload_weight would.
        let params = CastParams { n: x.numel() as u64, cols: 0, bf16: u32::from(dtype == DType::BF16) };
        Ok(CastWeightOp { x, dtype, dims, params })
    }
}
