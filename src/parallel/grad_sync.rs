//! Data-parallel gradients: after each rank's backward on its own shard, the gradients
//! every rank applies are those of the mean of the W ranks' losses.
//!
//! - A non-expert parameter is replicated on every rank: its gradient is averaged over
//!   all W ranks.
//! - An expert's gradient is already the sum over the tokens its expert-parallel group
//!   sent it; the ranks that hold the same experts (its expert-data-parallel group, W / P
//!   ranks) sum theirs, and the sum is divided by W.
//!
//! This is what DeepSpeed 0.19.8 does: `DeepSpeedEngine._reduce_expert_gradients`
//! all-reduces expert gradients over the expert-data-parallel group dividing by the
//! data-parallel world size ("to maintain the gradients value unaffected by ep_size
//! setting"), and ZeRO stages 1 and 2 (`average_tensor`) divide a bucket holding MoE
//! parameters by the data-parallel world size before reducing its expert part over the
//! expert-data-parallel group. So one scaling serves both.
//!
//! The reductions run on device tensors through the transports'
//! [`Transport::all_reduce_scaled`] (NCCL's all-reduce on GPUs; elsewhere every rank's
//! block gathered and summed in rank order on the device), so every rank gets bitwise
//! the same result.

use super::transport::Transport;
use crate::backend::Backend;
use crate::device::Tensor;
use crate::error::{Error, Result};
use std::sync::Arc;

/// The groups a data-parallel step reduces over.
pub struct GradientSync<B: Backend> {
    world: Arc<dyn Transport<B>>,
    expert_data: Arc<dyn Transport<B>>,
}

impl<B: Backend> GradientSync<B> {
    /// `world`: every data-parallel rank (W); `expert_data`: this rank's
    /// expert-data-parallel group (the ranks holding the same experts, W / P of them;
    /// [`crate::parallel::ExpertGroups::split`] makes both groups DeepSpeed's way).
    pub fn new(world: Arc<dyn Transport<B>>, expert_data: Arc<dyn Transport<B>>) -> Result<Self> {
        let (w, d) = (world.size(), expert_data.size());
        if d == 0 || !w.is_multiple_of(d) {
            return Err(Error::config(
                "expert_data_parallel",
                format!("a group of {d} ranks does not divide the {w} data-parallel ranks"),
            ));
        }
        Ok(GradientSync { world, expert_data })
    }

    /// Replaces every gradient by the one the mean of the W ranks' losses has: non-expert
    /// gradients averaged over the world, expert gradients (`expert` true) summed over the
    /// expert-data-parallel group and divided by W. Every rank must call this with the
    /// same names in the same order (it is collective).
    pub fn reduce(&self, b: &B, grads: &mut [(String, bool, Tensor<B>)]) -> Result<()> {
        let w = self.world.size() as f32;
        for (name, expert, t) in grads.iter_mut() {
            let group: &dyn Transport<B> = if *expert { &*self.expert_data } else { &*self.world };
            *t = group.all_reduce_scaled(b, t, 1.0 / w).map_err(|e| match e {
                Error::Communication { rank, msg } => {
                    Error::Communication { rank, msg: format!("reducing the gradient of `{name}`: {msg}") }
                }
                e => e,
            })?;
        }
        Ok(())
    }
}
