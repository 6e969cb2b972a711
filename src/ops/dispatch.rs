//! Row movement between token order and the compact expert-major layout of a plan.

use super::{f32_matrix, output, to_u32, Plan};
use crate::device::{Device, Tensor};
use crate::error::{Error, Result};
use crate::kernel_abi::PermuteParams;
use crate::tensor::{mul_size, DType};

/// Gather token rows into the compact layout: row `rows[s, j]` of the output `[S·k, M]`
/// is `x[s]`; rows past the kept total are zero. Checked.
#[non_exhaustive]
pub struct PermuteOp<'a, B: Device> {
    /// Token rows `[S, M]`, f32.
    pub x: &'a Tensor<B>,
    /// The plan.
    pub plan: &'a Plan<B>,
    /// Output shape `[S·k, M]`.
    pub out_shape: [usize; 2],
    /// Kernel parameters (`n` = S·k·M).
    pub params: PermuteParams,
}

impl<'a, B: Device> PermuteOp<'a, B> {
    /// Checks `x` against the plan.
    pub fn check(b: &B, x: &'a Tensor<B>, plan: &'a Plan<B>) -> Result<Self> {
        let (s, m) = f32_matrix("x", x)?;
        if s != plan.tokens() {
            return Err(Error::shape("x", format!("[{}, hidden] (the plan's tokens)", plan.tokens()), x.shape()));
        }
        let rows = mul_size("permuted rows", s, plan.k())?;
        let n = output(b, "permuted rows", &[rows, m], DType::F32)?;
        let params = PermuteParams { n: n as u64, cols: to_u32("hidden size", m)?, k: plan.k() as u32 };
        Ok(PermuteOp { x, plan, out_shape: [rows, m], params })
    }
}

/// Weighted sum back to token order: `y[s] = Σⱼ weights[s, j] · yp[rows[s, j]]`, f32
/// accumulation in route order; dropped routes contribute nothing. Checked.
#[non_exhaustive]
pub struct CombineOp<'a, B: Device> {
    /// Expert outputs in the compact layout `[S·k, M]`, f32.
    pub yp: &'a Tensor<B>,
    /// The plan.
    pub plan: &'a Plan<B>,
    /// Output shape `[S, M]`.
    pub out_shape: [usize; 2],
    /// Kernel parameters (`n` = S·M).
    pub params: PermuteParams,
}

impl<'a, B: Device> CombineOp<'a, B> {
    /// Checks `yp` against the plan: one row per route.
    pub fn check(b: &B, yp: &'a Tensor<B>, plan: &'a Plan<B>) -> Result<Self> {
        let (r, m) = f32_matrix("expert output", yp)?;
        let (s, k) = (plan.tokens(), plan.k());
        if r != s * k {
            return Err(Error::shape("expert output", format!("[{}, hidden] (tokens × k rows)", s * k), yp.shape()));
        }
        let n = output(b, "combined output", &[s, m], DType::F32)?;
        let params = PermuteParams { n: n as u64, cols: to_u32("hidden size", m)?, k: k as u32 };
        Ok(CombineOp { yp, plan, out_shape: [s, m], params })
    }
}
