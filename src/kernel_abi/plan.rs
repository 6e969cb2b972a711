//! The dispatch plan's multi-pass schedule, as data: which entry points run in which
//! order over how many invocations, the three scratch buffers they share and where each
//! output of the plan sits in them. The wgpu and cuda backends and the emulated-kernel
//! tests all run the plan from this one description (shaders/plan.wgsl and
//! kernels/plan.cu implement the passes; every pass binds the same eight buffers).
//!
//! Buffers (i32 words unless noted):
//!
//! ```text
//! scratch: cnt [G·E] | first [G·E] | kept [G·E] | base [G·E] | keep [S·k] | drop [S] | dead [S]
//! info:    counts [E] | first_counts [E] | kept_counts [E] | offsets [E + 1] |
//!          stats [4] (capacity, dropped routes, masked routes, dropped tokens) | C
//! sr:      slots [S·k] | rows [S·k]
//! weights: the plan's combine weights [S·k] (f32)
//! ```

use super::{grid_1d, PlanParams, WG_PLAN};

/// The buffers every plan pass binds, in binding order (after the parameter block):
/// route experts, route weights, `used_token`, priority, then the four written ones.
pub const BINDINGS: [&str; 8] =
    ["routes.experts", "routes.weights", "used_token", "priority", "scratch", "info", "slots_rows", "weights"];

/// One pass of the plan: an entry point and how many invocations it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanPass {
    /// Entry point (the same name in plan.wgsl and plan.cu).
    pub entry: &'static str,
    /// Invocations (threads); the grid is `grid_1d(invocations, WG_PLAN)`.
    pub invocations: usize,
}

impl PlanPass {
    /// The pass's grid of [`WG_PLAN`]-thread workgroups.
    pub fn grid(&self) -> [u32; 3] {
        grid_1d(self.invocations, WG_PLAN)
    }
}

/// Which scratch buffer a plan output sits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanBuffer {
    /// The info buffer.
    Info,
    /// The slots-and-rows buffer.
    SlotsRows,
}

/// Where one output of the plan sits: buffer, first word, shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanSlice {
    /// The buffer.
    pub buffer: PlanBuffer,
    /// First word.
    pub offset: usize,
    /// Shape of the output tensor (its words follow `offset` contiguously).
    pub shape: Vec<usize>,
}

impl PlanSlice {
    /// Words of the slice.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The whole schedule of one plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanSchedule {
    /// The parameter block every pass takes.
    pub params: PlanParams,
    /// The passes, in order.
    pub passes: Vec<PlanPass>,
    /// i32 words of the scratch buffer.
    pub scratch_words: usize,
    /// i32 words of the info buffer.
    pub info_words: usize,
    /// i32 words of the slots-and-rows buffer.
    pub slots_rows_words: usize,
    /// f32 values of the combine-weights output.
    pub weights_len: usize,
}

impl PlanSchedule {
    /// The schedule for checked parameters (the plan front door builds it, having checked
    /// that S·k, G·E and the scratch words each fit an i32, which the kernels' 32-bit
    /// indices need).
    pub fn new(params: PlanParams) -> Self {
        let (s, k, e, g) = (params.s as usize, params.k as usize, params.e as usize, params.n_groups as usize);
        let (sk, ge) = (s * k, g * e);
        let mut passes = vec![
            PlanPass { entry: "plan_count", invocations: ge },
            PlanPass { entry: "plan_capacity", invocations: 1 },
        ];
        if params.keep == 2 {
            passes.push(PlanPass { entry: "plan_rank", invocations: sk });
        }
        passes.extend([
            PlanPass { entry: "plan_slots", invocations: ge },
            PlanPass { entry: "plan_offsets", invocations: 1 },
            PlanPass { entry: "plan_finish", invocations: s },
            PlanPass { entry: "plan_stats", invocations: 1 },
        ]);
        PlanSchedule {
            params,
            passes,
            scratch_words: 4 * ge + sk + 2 * s,
            info_words: 4 * e + 6,
            slots_rows_words: 2 * sk,
            weights_len: sk,
        }
    }

    fn dims(&self) -> (usize, usize, usize) {
        (self.params.s as usize, self.params.k as usize, self.params.e as usize)
    }

    /// Routes per expert before dropping, `[E]`.
    pub fn counts(&self) -> PlanSlice {
        let (_, _, e) = self.dims();
        PlanSlice { buffer: PlanBuffer::Info, offset: 0, shape: vec![e] }
    }
    /// First choices per expert, `[E]`.
    pub fn first_counts(&self) -> PlanSlice {
        let (_, _, e) = self.dims();
        PlanSlice { buffer: PlanBuffer::Info, offset: e, shape: vec![e] }
    }
    /// Routes per expert after dropping, `[E]`.
    pub fn kept_counts(&self) -> PlanSlice {
        let (_, _, e) = self.dims();
        PlanSlice { buffer: PlanBuffer::Info, offset: 2 * e, shape: vec![e] }
    }
    /// Exclusive prefix sum of the kept counts, `[E + 1]`.
    pub fn offsets(&self) -> PlanSlice {
        let (_, _, e) = self.dims();
        PlanSlice { buffer: PlanBuffer::Info, offset: 3 * e, shape: vec![e + 1] }
    }
    /// `[capacity, dropped routes, masked routes, dropped tokens]`.
    pub fn stats(&self) -> PlanSlice {
        let (_, _, e) = self.dims();
        PlanSlice { buffer: PlanBuffer::Info, offset: 4 * e + 1, shape: vec![4] }
    }
    /// Slot of every route, `[S, k]`.
    pub fn slots(&self) -> PlanSlice {
        let (s, k, _) = self.dims();
        PlanSlice { buffer: PlanBuffer::SlotsRows, offset: 0, shape: vec![s, k] }
    }
    /// Compact row of every route, `[S, k]`.
    pub fn rows(&self) -> PlanSlice {
        let (s, k, _) = self.dims();
        PlanSlice { buffer: PlanBuffer::SlotsRows, offset: s * k, shape: vec![s, k] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_fit_their_buffers_and_do_not_overlap() {
        let params = PlanParams { s: 7, k: 3, e: 5, group: 7, n_groups: 1, keep: 2, ..Default::default() };
        let p = PlanSchedule::new(params);
        assert_eq!(p.passes.len(), 7);
        assert_eq!(p.passes[2].entry, "plan_rank");
        let mut info: Vec<(usize, usize)> = [p.counts(), p.first_counts(), p.kept_counts(), p.offsets(), p.stats()]
            .iter()
            .map(|s| (s.offset, s.offset + s.len()))
            .collect();
        info.sort_unstable();
        assert!(info.windows(2).all(|w| w[0].1 <= w[1].0));
        assert!(info.last().unwrap().1 < p.info_words, "the capacity word follows the stats");
        assert_eq!(p.rows().offset + p.rows().len(), p.slots_rows_words);
        let no_rank = PlanSchedule::new(PlanParams { keep: 0, ..params });
        assert!(no_rank.passes.iter().all(|x| x.entry != "plan_rank"));
    }
}
