//! How a layer's routed rows reach their experts and come back: the [`Dispatcher`] is
//! chosen when the layer is built, and [`crate::MoeLayer::forward`] runs the same steps
//! whichever it is (vLLM's prepare/finalize, DeepEP's dispatch/combine):
//!
//! ```text
//! dispatch(x, plan) → rows grouped by expert + group offsets → experts → combine → y
//! ```
//!
//! Local: `permute` into the plan's compact expert-major layout and `combine` back. Expert
//! parallel: the exchange of [`crate::parallel::EpDispatcher`] over a transport.

use crate::backend::Backend;
use crate::device::Tensor;
use crate::error::{Error, Result};
use crate::ops::{Offsets, Plan, RouteRows};
use crate::parallel::{EpDispatcher, EpState, ExpertParallel};
use std::time::Duration;

/// The exchange of a layer, fixed when it is built.
pub enum Dispatcher<B: Backend> {
    /// Every expert is on this rank.
    Local,
    /// The experts are spread over the ranks of a transport.
    ExpertParallel(Box<EpDispatcher<B>>),
}

/// What a dispatch keeps for its combine and for a backward pass.
pub enum DispatchState<B: Backend> {
    /// The compact row of every route (the plan's).
    Local(RouteRows<B>),
    /// The expert-parallel exchange's state.
    ExpertParallel(Box<EpState<B>>),
}

impl<B: Backend> DispatchState<B> {
    /// Wall time spent exchanging rows with other ranks (zero when local).
    pub fn exchange_time(&self) -> Duration {
        match self {
            DispatchState::Local(_) => Duration::ZERO,
            DispatchState::ExpertParallel(s) => s.exchange_time,
        }
    }
}

/// Rows for this rank's experts: grouped by local expert, with the group offsets.
pub struct Dispatched<B: Backend> {
    /// The rows `[R, M]`, f32.
    pub xp: Tensor<B>,
    /// Group boundaries of the local experts.
    pub offsets: Offsets<B>,
    /// What the combine needs.
    pub state: DispatchState<B>,
}

impl<B: Backend> Dispatcher<B> {
    /// The expert-parallel dispatcher, checked against the transport's group.
    pub fn expert_parallel(b: &B, ep: ExpertParallel<B>, num_experts: usize) -> Result<Self> {
        Ok(Dispatcher::ExpertParallel(Box::new(EpDispatcher::new(b, ep, num_experts)?)))
    }

    /// The logical experts this rank holds (`None`: all of them).
    pub fn local_experts(&self) -> Option<&[usize]> {
        match self {
            Dispatcher::Local => None,
            Dispatcher::ExpertParallel(ep) => Some(ep.local_experts()),
        }
    }

    /// Moves the kept routes' token rows of `x [S, M]` to their experts. `time_exchange`:
    /// see [`crate::LayerOptions::time_exchange`]. With `scale_input` each row leaves
    /// multiplied by its route's combine weight (Llama 4 weights the expert input, not its
    /// output): combine those unweighted.
    pub fn dispatch(
        &self,
        b: &B,
        x: &Tensor<B>,
        plan: &Plan<B>,
        time_exchange: bool,
        scale_input: bool,
    ) -> Result<Dispatched<B>> {
        match self {
            Dispatcher::Local => {
                let rows = plan.route_rows();
                let xp = if scale_input { b.permute_scaled(x, &rows, &plan.weights)? } else { b.permute(x, &rows)? };
                Ok(Dispatched { xp, offsets: plan.offsets.clone(), state: DispatchState::Local(rows) })
            }
            Dispatcher::ExpertParallel(ep) => {
                let (xp, offsets, state) = ep.dispatch(b, x, plan, time_exchange, scale_input)?;
                Ok(Dispatched { xp, offsets, state: DispatchState::ExpertParallel(Box::new(state)) })
            }
        }
    }

    /// Brings the expert outputs `yp` (in the dispatched layout) back and sums each
    /// token's routes by their combine weights (`weighted`), or unweighted after a
    /// dispatch that scaled the rows: `[S, M]`.
    pub fn combine(
        &self,
        b: &B,
        yp: &Tensor<B>,
        plan: &Plan<B>,
        state: &mut DispatchState<B>,
        time_exchange: bool,
        weighted: bool,
    ) -> Result<Tensor<B>> {
        match (self, state) {
            (Dispatcher::Local, DispatchState::Local(rows)) => {
                let s = plan.tokens();
                if weighted {
                    b.combine(yp, rows, &plan.weights, 0..s)
                } else {
                    b.combine(yp, rows, &crate::ops::unit_weights(b, s, plan.k())?, 0..s)
                }
            }
            (Dispatcher::ExpertParallel(ep), DispatchState::ExpertParallel(s)) => {
                ep.combine(b, yp, plan, s, time_exchange, weighted)
            }
            _ => Err(Error::Misuse("combine with the state of another dispatcher".into())),
        }
    }

    /// The combine's backward: the gradient of the expert outputs `yp` (in the
    /// dispatched layout) and, for a `weighted` combine, of the plan's combine weights
    /// `[S, k]`, from the gradient of the combined output `dy [S, M]`.
    pub fn combine_backward(
        &self,
        b: &B,
        dy: &Tensor<B>,
        yp: &Tensor<B>,
        plan: &Plan<B>,
        state: &DispatchState<B>,
        weighted: bool,
    ) -> Result<(Tensor<B>, Option<Tensor<B>>)> {
        match (self, state) {
            (Dispatcher::Local, DispatchState::Local(rows)) if weighted => {
                let g = b.combine_grad(dy, yp, rows, &plan.weights, 0..plan.tokens())?;
                Ok((g.d_yp, Some(g.d_weights)))
            }
            // Unweighted: each route's row takes its token's gradient.
            (Dispatcher::Local, DispatchState::Local(rows)) => Ok((b.permute(dy, rows)?, None)),
            (Dispatcher::ExpertParallel(ep), DispatchState::ExpertParallel(s)) => {
                ep.combine_backward(b, dy, plan, s, weighted)
            }
            _ => Err(Error::Misuse("backward with the state of another dispatcher".into())),
        }
    }

    /// The dispatch's backward: from the gradient of the dispatched rows to the tokens'
    /// `[S, M]` (each token sums its routes'). After a dispatch that scaled the rows,
    /// `scaled_from` is its input `x`: the rows' gradients are summed by the combine
    /// weights, and the weights' gradient `[S, k]` (`x[t] · d(row)`) comes too.
    pub fn dispatch_backward(
        &self,
        b: &B,
        dxp: &Tensor<B>,
        plan: &Plan<B>,
        state: &DispatchState<B>,
        scaled_from: Option<&Tensor<B>>,
    ) -> Result<(Tensor<B>, Option<Tensor<B>>)> {
        match (self, state, scaled_from) {
            (Dispatcher::Local, DispatchState::Local(rows), None) => {
                let (s, k) = (plan.tokens(), plan.k());
                let ones = crate::ops::unit_weights(b, s, k)?;
                Ok((b.combine(dxp, rows, &ones, 0..s)?, None))
            }
            (Dispatcher::Local, DispatchState::Local(rows), Some(x)) => {
                let s = plan.tokens();
                let dx = b.combine(dxp, rows, &plan.weights, 0..s)?;
                let dw = b.combine_grad(x, dxp, rows, &plan.weights, 0..s)?.d_weights;
                Ok((dx, Some(dw)))
            }
            (Dispatcher::ExpertParallel(ep), DispatchState::ExpertParallel(s), None) => {
                Ok((ep.dispatch_backward(b, dxp, plan, s)?, None))
            }
            (Dispatcher::ExpertParallel(ep), DispatchState::ExpertParallel(s), Some(x)) => {
                let (dx, dw) = ep.dispatch_scaled_backward(b, x, dxp, plan, s)?;
                Ok((dx, Some(dw)))
            }
            _ => Err(Error::Misuse("backward with the state of another dispatcher".into())),
        }
    }
}
