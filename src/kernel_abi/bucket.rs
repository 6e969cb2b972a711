//! The expert-parallel bucketing schedule, as data (like [`super::plan`]): the passes
//! of shaders/bucket.wgsl and kernels/bucket.cu, their invocation counts and the scratch
//! layout they share. The wgpu and cuda backends and the emulated-kernel tests all run
//! the bucketing from this one description; every pass binds the same seven buffers.
//!
//! The bucketing gives every kept route of this rank's tokens its physical expert slot
//! (the replica `token % replicas` of its expert) and its row in the send buffer, which
//! is ordered by slot (so by destination rank, then local expert) and, within a slot, by
//! the route's compact row in the plan (so by the plan's slot order). Deterministic: one
//! workgroup per logical expert walks that expert's rows in order, 64 at a time.
//!
//! Buffers (i32 words):
//!
//! ```text
//! reads:   plan.rows [S·k] | plan.offsets [E + 1] | replica offsets [E + 1] | replica slots [R]
//! scratch: inverse [S·k] (compact row → route) | position [S·k] | slot [S·k] | base [P + 1]
//! counts:  routes per physical slot [P] | S | the placement's fingerprint
//! rows:    send row of every route [S·k] (−1: not sent)
//! ```

use super::{grid_1d, BucketParams, WG_PLAN};

/// The buffers every bucketing pass binds, in binding order (after the parameter block).
pub const BINDINGS: [&str; 7] =
    ["plan.rows", "plan.offsets", "replica offsets", "replica slots", "scratch", "counts", "send rows"];

/// One pass: an entry point and how many invocations it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketPass {
    /// Entry point (the same name in bucket.wgsl and bucket.cu).
    pub entry: &'static str,
    /// Invocations; the grid is `grid_1d(invocations, WG_PLAN)`.
    pub invocations: usize,
}

impl BucketPass {
    /// The pass's grid of [`WG_PLAN`]-thread workgroups.
    pub fn grid(&self) -> [u32; 3] {
        grid_1d(self.invocations, WG_PLAN)
    }
}

/// The whole schedule of one bucketing.
#[derive(Clone, Debug, PartialEq)]
pub struct BucketSchedule {
    /// The parameter block every pass takes.
    pub params: BucketParams,
    /// The passes, in order.
    pub passes: [BucketPass; 5],
    /// i32 words of the scratch buffer.
    pub scratch_words: usize,
}

impl BucketSchedule {
    /// The passes for `params` (sizes checked by the op's front door).
    pub fn new(params: BucketParams) -> Self {
        let sk = params.s as usize * params.k as usize;
        let slots = params.slots as usize;
        let pass = |entry, invocations| BucketPass { entry, invocations };
        BucketSchedule {
            params,
            passes: [
                pass("bucket_clear", sk.max(slots)),
                pass("bucket_invert", sk),
                // One workgroup of WG_PLAN invocations per logical expert.
                pass("bucket_rank", params.e as usize * WG_PLAN as usize),
                pass("bucket_offsets", 1),
                pass("bucket_rows", sk),
            ],
            scratch_words: 3 * sk + slots + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_holds_three_route_arrays_and_the_slot_bases() {
        let s = BucketSchedule::new(BucketParams { s: 10, k: 2, e: 4, slots: 6, t0: 0, t1: 10, ..Default::default() });
        assert_eq!(s.scratch_words, 3 * 20 + 7);
        assert_eq!(s.passes.map(|p| p.invocations), [20, 20, 4 * 64, 1, 20]);
        assert_eq!(s.passes[2].grid(), [4, 1, 1], "a workgroup per expert");
    }
}
