//! Philox noise: one counter-based generator with the same layout on every backend.

use super::output;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::kernel_abi::NoiseParams;
use crate::philox::NoiseKind;
use crate::tensor::DType;

/// Philox 4x32-10 noise of `kind` for `shape`, stream `stream` of `seed`. Checked.
#[non_exhaustive]
pub struct NoiseOp {
    /// The distribution.
    pub kind: NoiseKind,
    /// The seed.
    pub seed: u64,
    /// The stream.
    pub stream: u32,
    /// Output shape.
    pub shape: Vec<usize>,
    /// Values to draw.
    pub n: usize,
    /// Kernel parameters.
    pub params: NoiseParams,
}

impl NoiseOp {
    /// Checks the shape (at most 2³² − 1 values in one draw, on every backend: WGSL counts
    /// in 32 bits, and one limit keeps the backends alike) and the jitter width.
    pub fn check<B: Device>(b: &B, kind: NoiseKind, seed: u64, stream: u32, shape: &[usize]) -> Result<Self> {
        let n = output(b, "noise", shape, DType::F32)?;
        if n > u32::MAX as usize {
            return Err(Error::too_large("one noise draw", format!("{n} values"), "4294967295 values"));
        }
        let (code, eps) = match kind {
            NoiseKind::Uniform => (0, 0.0),
            NoiseKind::Jitter(eps) => {
                if !(eps.is_finite() && (0.0..1.0).contains(&eps)) {
                    return Err(Error::config("jitter eps", format!("must be in [0, 1), got {eps}")));
                }
                (1, eps)
            }
            NoiseKind::Gumbel => (2, 0.0),
        };
        let params = NoiseParams {
            n: n as u64,
            seed_lo: seed as u32,
            seed_hi: (seed >> 32) as u32,
            stream,
            kind: code,
            eps,
            _pad0: 0,
        };
        Ok(NoiseOp { kind, seed, stream, shape: shape.to_vec(), n, params })
    }
}
