//! The small host-side summary of a forward: loads, drops and losses.

use crate::losses::Losses;

/// Loads, drops and losses of one forward (downloaded from the per-expert tensors).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Routes per expert before capacity (DeepSpeed `exp_counts`).
    pub exp_counts: Vec<i64>,
    /// Routes per expert after capacity.
    pub kept_counts: Vec<i64>,
    /// Capacity in force (the reference's value; the largest count when unlimited).
    pub capacity: i64,
    /// Routes dropped by capacity.
    pub dropped_routes: i64,
    /// Tokens whose every route was dropped (their routed output is 0).
    pub dropped_tokens: i64,
    /// Routes not taken because the token was masked by `used_token`.
    pub masked_routes: i64,
    /// Tokens in the batch.
    pub tokens: usize,
    /// Losses.
    pub losses: Losses,
}
