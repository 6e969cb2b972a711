//! Router reductions for the losses.

use super::{f32_matrix, f32_shaped, output, to_u32};
use crate::device::{Device, Tensor};
use crate::error::Result;
use crate::kernel_abi::StatsParams;
use crate::tensor::DType;

/// `[E + 1]` f32: the mean score of each expert over tokens, then the mean of
/// `logsumexp(logits)²` (Switch z-loss). Checked.
#[non_exhaustive]
pub struct RouterStatsOp<'a, B: Device> {
    /// Router logits `[S, E]`.
    pub logits: &'a Tensor<B>,
    /// Scores `[S, E]`.
    pub scores: &'a Tensor<B>,
    /// Tokens S.
    pub tokens: usize,
    /// Experts E.
    pub experts: usize,
    /// Kernel parameters.
    pub params: StatsParams,
}

impl<'a, B: Device> RouterStatsOp<'a, B> {
    /// Checks logits and scores.
    pub fn check(b: &B, logits: &'a Tensor<B>, scores: &'a Tensor<B>) -> Result<Self> {
        let (s, e) = f32_matrix("logits", logits)?;
        f32_shaped("scores", scores, &[s, e])?;
        output(b, "router stats", &[e + 1], DType::F32)?;
        // One invocation per output on a 1-D grid of 64-thread workgroups.
        let most = crate::kernel_abi::MAX_GRID_DIM * 64 - 1;
        if e > most {
            return Err(crate::error::Error::too_large(
                "router stats",
                format!("{e} experts"),
                format!("{most} experts"),
            ));
        }
        let params = StatsParams { s: to_u32("tokens", s)?, e: to_u32("experts", e)?, ..Default::default() };
        Ok(RouterStatsOp { logits, scores, tokens: s, experts: e, params })
    }
}
