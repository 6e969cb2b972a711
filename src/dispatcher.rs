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
    /// see [`crate::LayerOptions::time_exchange`].
    pub fn dispatch(&self, b: &B, x: &Tensor<B>, plan: &Plan<B>, time_exchange: bool) -> Result<Dispatched<B>> {
        match self {
            Dispatcher::Local => {
                let rows = plan.route_rows();
                let xp = b.permute(x, &rows)?;
                Ok(Dispatched { xp, offsets: plan.offsets.clone(), state: DispatchState::Local(rows) })
            }
            Dispatcher::ExpertParallel(ep) => {
                let (xp, offsets, state) = ep.dispatch(b, x, plan, time_exchange, false)?;
                Ok(Dispatched { xp, offsets, state: DispatchState::ExpertParallel(Box::new(state)) })
            }
        }
    }

    /// As [`Dispatcher::dispatch`], each route's row multiplied by its combine weight
    /// (Llama 4 scales the expert input, not its output); combine with
    /// [`Dispatcher::combine_unweighted`].
    pub fn dispatch_scaled(&self, b: &B, x: &Tensor<B>, plan: &Plan<B>, time_exchange: bool) -> Result<Dispatched<B>> {
        match self {
            Dispatcher::Local => {
                let rows = plan.route_rows();
                let xp = b.permute_scaled(x, &rows, &plan.weights)?;
                Ok(Dispatched { xp, offsets: plan.offsets.clone(), state: DispatchState::Local(rows) })
            }
            Dispatcher::ExpertParallel(ep) => {
                let (xp, offsets, state) = ep.dispatch(b, x, plan, time_exchange, true)?;
                Ok(Dispatched { xp, offsets, state: DispatchState::ExpertParallel(Box::new(state)) })
            }
        }
    }

    /// Sums each token's expert outputs unweighted (their inputs carried the weights):
    /// the combine of [`Dispatcher::dispatch_scaled`].
    pub fn combine_unweighted(
        &self,
        b: &B,
        yp: &Tensor<B>,
        plan: &Plan<B>,
        state: &mut DispatchState<B>,
        time_exchange: bool,
    ) -> Result<Tensor<B>> {
        match (self, state) {
            (Dispatcher::Local, DispatchState::Local(rows)) => {
                let ones = crate::ops::unit_weights(b, plan.tokens(), plan.k())?;
                b.combine(yp, rows, &ones, 0..plan.tokens())
            }
            (Dispatcher::ExpertParallel(ep), DispatchState::ExpertParallel(s)) => {
                ep.combine_unweighted(b, yp, plan, s, time_exchange)
            }
            _ => Err(Error::Misuse("combine with the state of another dispatcher".into())),
        }
    }

    /// The backward of [`Dispatcher::combine_unweighted`]: each route's row takes its
    /// token's gradient.
    pub fn combine_unweighted_backward(
        &self,
        b: &B,
        dy: &Tensor<B>,
        plan: &Plan<B>,
        state: &DispatchState<B>,
    ) -> Result<Tensor<B>> {
        match (self, state) {
            (Dispatcher::Local, DispatchState::Local(rows)) => b.permute(dy, rows),
            (Dispatcher::ExpertParallel(ep), DispatchState::ExpertParallel(s)) => {
                ep.combine_unweighted_backward(b, dy, plan, s)
            }
            _ => Err(Error::Misuse("backward with the state of another dispatcher".into())),
        }
    }

    /// The backward of [`Dispatcher::dispatch_scaled`]: the tokens' gradient `[S, M]`
    /// (`Σ_j w[t, j] · dxp[row(t, j)]`) and the combine weights' `[S, k]`
    /// (`x[t] · dxp[row(t, j)]`).
    pub fn dispatch_scaled_backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        dxp: &Tensor<B>,
        plan: &Plan<B>,
        state: &DispatchState<B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        match (self, state) {
            (Dispatcher::Local, DispatchState::Local(rows)) => {
                let s = plan.tokens();
                let dx = b.combine(dxp, rows, &plan.weights, 0..s)?;
                let dw = b.combine_grad(x, dxp, rows, &plan.weights, 0..s)?.d_weights;
                Ok((dx, dw))
            }
            (Dispatcher::ExpertParallel(ep), DispatchState::ExpertParallel(s)) => {
                ep.dispatch_scaled_backward(b, x, dxp, plan, s)
            }
            _ => Err(Error::Misuse("backward with the state of another dispatcher".into())),
        }
    }

    /// Brings the expert outputs `yp` (in the dispatched layout) back and sums each
    /// token's routes by their combine weights: `[S, M]`.
    pub fn combine(
        &self,
        b: &B,
        yp: &Tensor<B>,
        plan: &Plan<B>,
        state: &mut DispatchState<B>,
        time_exchange: bool,
    ) -> Result<Tensor<B>> {
        match (self, state) {
            (Dispatcher::Local, DispatchState::Local(rows)) => b.combine(yp, rows, &plan.weights, 0..plan.tokens()),
            (Dispatcher::ExpertParallel(ep), DispatchState::ExpertParallel(s)) => {
                ep.combine(b, yp, plan, s, time_exchange)
            }
            _ => Err(Error::Misuse("combine with the state of another dispatcher".into())),
        }
    }

    /// The combine's backward: the gradient of the expert outputs `yp` (in the
    /// dispatched layout) and of the plan's combine weights `[S, k]`, from the gradient
    /// of the combined output `dy [S, M]`.
    pub fn combine_backward(
        &self,
        b: &B,
        dy: &Tensor<B>,
        yp: &Tensor<B>,
        plan: &Plan<B>,
        state: &DispatchState<B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        match (self, state) {
            (Dispatcher::Local, DispatchState::Local(rows)) => {
                let g = b.combine_grad(dy, yp, rows, &plan.weights, 0..plan.tokens())?;
                Ok((g.d_yp, g.d_weights))
            }
            (Dispatcher::ExpertParallel(ep), DispatchState::ExpertParallel(s)) => ep.combine_backward(b, dy, plan, s),
            _ => Err(Error::Misuse("backward with the state of another dispatcher".into())),
        }
    }

    /// The dispatch's backward: from the gradient of the dispatched rows to the tokens'
    /// `[S, M]` (each token sums its routes').
    pub fn dispatch_backward(
        &self,
        b: &B,
        dxp: &Tensor<B>,
        plan: &Plan<B>,
        state: &DispatchState<B>,
    ) -> Result<Tensor<B>> {
        match (self, state) {
            (Dispatcher::Local, DispatchState::Local(rows)) => {
                let (s, k) = (plan.tokens(), plan.k());
                let ones = crate::ops::unit_weights(b, s, k)?;
                b.combine(dxp, rows, &ones, 0..s)
            }
            (Dispatcher::ExpertParallel(ep), DispatchState::ExpertParallel(s)) => ep.dispatch_backward(b, dxp, plan, s),
            _ => Err(Error::Misuse("backward with the state of another dispatcher".into())),
        }
    }
}
