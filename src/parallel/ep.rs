//! The expert-parallel exchange, in the spirit of DeepEP's dispatch/combine (normal mode)
//! and vLLM's prepare/finalize, with every step on the device:
//!
//! ```text
//! dispatch: bucket (slot + send row of every kept route, routes per slot)
//!           → all-gather the routes per slot and read them on the host: the one read
//!           → permute into a send buffer of exactly the rows sent (by destination
//!             rank, then local slot) → all-to-all of the rows → regroup by local slot
//!             (the experts' layout)
//! combine:  regroup back by source → all-to-all back → weighted combine of this rank's
//!           tokens → (tensor-parallel ranks) all-gather of the outputs
//! ```
//!
//! The routes per slot, gathered from every rank, are the only values read on the host:
//! they size every transfer and the expert groups. Everything the combine and a backward
//! pass need is kept in [`EpState`].

use super::placement::Placement;
use super::transport::{RowCounts, Transport};
use crate::backend::Backend;
use crate::device::Tensor;
use crate::error::{Error, Result};
use crate::ops::{BlockTable, DevicePlacement, Offsets, Plan, RouteRows};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the batch is spread over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenLayout {
    /// Every rank holds the same tokens (tensor-parallel ranks, DeepSpeed-MoE's
    /// parallelism-coordinated exchange): each sends only its share of them to the
    /// experts (`drop_tokens`), and the outputs are gathered after (`gather_tokens`), so
    /// every rank ends with the whole output.
    Replicated,
    /// Each rank holds its own tokens (data parallel): each gates and drops on its own
    /// tokens, and its output equals a single-rank run on its shard. The exchange is
    /// variable-size, so no capacity needs agreeing across the group.
    Sharded,
}

/// What an expert-parallel layer is built with: the transport of its group, where the
/// experts live, and how the tokens are spread.
pub struct ExpertParallel<B: Backend> {
    /// The group's transport; this rank is `transport.rank()` of `transport.size()`.
    pub transport: Arc<dyn Transport<B>>,
    /// Where the experts live; its ranks must be the transport's.
    pub placement: Placement,
    /// How the tokens are spread.
    pub tokens: TokenLayout,
}

impl<B: Backend> ExpertParallel<B> {
    /// DeepSpeed's layout: `num_experts` in contiguous blocks over the transport's ranks.
    pub fn deepspeed(transport: Arc<dyn Transport<B>>, num_experts: usize, tokens: TokenLayout) -> Result<Self> {
        let placement = Placement::contiguous(num_experts, transport.size())?;
        Ok(ExpertParallel { transport, placement, tokens })
    }
}

/// Contiguous share `rank` of `n` items over `size` ranks (sizes differ by at most one).
fn share(n: usize, rank: usize, size: usize) -> Range<usize> {
    rank * n / size..(rank + 1) * n / size
}

/// Now, after the device has finished what is queued when `sync` asks (so that what is
/// timed from here is the exchange alone).
fn start_timer<B: Backend>(b: &B, sync: bool) -> Result<Instant> {
    if sync {
        b.synchronize()?;
    }
    Ok(Instant::now())
}

/// The expert-parallel dispatcher of one rank: checked against its transport when built.
pub struct EpDispatcher<B: Backend> {
    transport: Arc<dyn Transport<B>>,
    placement: Placement,
    device: DevicePlacement<B>,
    tokens: TokenLayout,
}

/// What the expert-parallel dispatch keeps for its combine and for a backward pass (which
/// runs the same exchange in reverse: gradients of the returned rows go back to the
/// experts' ranks through `to_experts`, the input gradients return through
/// `from_experts`, and the expert gradients stay where the experts live).
pub struct EpState<B: Backend> {
    /// The send row of every route of this rank's tokens (−1: not sent), within the rows
    /// this rank sent.
    pub send_rows: RouteRows<B>,
    /// Rows every rank sent every rank.
    pub rows: RowCounts,
    /// Received rows (by source, then local slot) → the experts' layout (by local slot,
    /// then source).
    pub to_experts: BlockTable<B>,
    /// The experts' layout → by source again, as the rows go back.
    pub from_experts: BlockTable<B>,
    /// The tokens this rank sent and combines.
    pub tokens: Range<usize>,
    /// The expert outputs returned to this rank, in send order (for the gradient of the
    /// combine weights); set by the combine.
    pub returned: Option<Tensor<B>>,
    /// Wall time spent in the exchange: the count gather and its read, and the transfers.
    pub exchange_time: Duration,
}

impl<B: Backend> EpDispatcher<B> {
    /// Checks the placement against the layer's experts and the transport's group.
    pub fn new(b: &B, ep: ExpertParallel<B>, num_experts: usize) -> Result<Self> {
        let ExpertParallel { transport, placement, tokens } = ep;
        if placement.replicas().len() != num_experts {
            return Err(Error::config(
                "placement",
                format!("places {} experts, the layer has {num_experts}", placement.replicas().len()),
            ));
        }
        if placement.ranks() != transport.size() {
            return Err(Error::config(
                "ep_size",
                format!(
                    "the experts are placed over {} ranks, the communicator has {} (rank {})",
                    placement.ranks(),
                    transport.size(),
                    transport.rank()
                ),
            ));
        }
        let device = DevicePlacement::new(b, placement.replicas(), placement.slots_per_rank(), placement.ranks())?;
        Ok(EpDispatcher { transport, placement, device, tokens })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    /// The logical experts this rank holds, in local slot order.
    pub fn local_experts(&self) -> &[usize] {
        self.placement.local(self.rank())
    }

    /// The group's transport.
    pub fn transport(&self) -> &dyn Transport<B> {
        &*self.transport
    }

    /// Errors unless every rank's counts are non-negative, every rank holds the same
    /// placement and (tensor-parallel ranks) the same number of tokens: otherwise the
    /// transfers the ranks plan would not match, and NCCL would wait forever.
    fn check_agreement(&self, counts: &[i32], tokens: usize) -> Result<()> {
        let (me, slots) = (self.rank(), self.device.slots());
        let width = slots + 2;
        let fail = |msg: String| Err(Error::Communication { rank: me, msg });
        for (r, row) in counts.chunks(width).enumerate() {
            if let Some(l) = row[..slots].iter().position(|&v| v < 0) {
                return fail(format!("rank {r} reported {} routes for slot {l}", row[l]));
            }
            if row[slots + 1] as u32 != self.device.fingerprint() {
                return fail(format!("rank {r} places the experts differently from rank {me}"));
            }
            if self.tokens == TokenLayout::Replicated && row[slots] as usize != tokens {
                return fail(format!(
                    "rank {r} holds {} tokens and rank {me} {tokens}: tensor-parallel ranks must hold the same batch",
                    row[slots]
                ));
            }
        }
        Ok(())
    }

    fn mine(&self, s: usize) -> Range<usize> {
        match self.tokens {
            TokenLayout::Replicated => share(s, self.rank(), self.transport.size()),
            TokenLayout::Sharded => 0..s,
        }
    }

    /// Sends the kept routes of this rank's tokens to their experts' ranks; returns the
    /// rows this rank's experts run (grouped by local slot), their group offsets, and the
    /// state the combine needs.
    /// With `scale_input` each row leaves multiplied by its route's combine weight (Llama 4
    /// weights the expert input): combine those unweighted ([`EpDispatcher::combine`]).
    pub fn dispatch(
        &self,
        b: &B,
        x: &Tensor<B>,
        plan: &Plan<B>,
        time_exchange: bool,
        scale_input: bool,
    ) -> Result<(Tensor<B>, Offsets<B>, EpState<B>)> {
        let (me, n) = (self.rank(), self.transport.size());
        let (spr, slots) = (self.placement.slots_per_rank(), self.device.slots());
        let tokens = self.mine(plan.tokens());
        let bucket = b.bucket(plan, &self.device, tokens.clone())?;
        let t0 = start_timer(b, time_exchange)?;
        // Every rank's routes per slot, its tokens and its placement's fingerprint: they
        // size every transfer below. The one host read.
        let width = slots + 2;
        let all = self.transport.all_gather_rows(b, &bucket.counts.reshape(&[1, width])?, &vec![1; n])?;
        let counts = b.download(&all)?.into_i32("routes per slot")?;
        self.check_agreement(&counts, plan.tokens())?;
        let c = |src: usize, dst: usize, l: usize| counts[src * width + dst * spr + l] as usize;
        let rows = RowCounts::new(n, (0..n * n).map(|i| (0..spr).map(|l| c(i / n, i % n, l)).sum()).collect())?;
        let (sent, routes) = (rows.sent_by(me), plan.tokens() * plan.k());
        // This rank's own counts came back as it sent them: they bound its send rows.
        if counts[me * width..me * width + slots].iter().map(|&v| v as usize).sum::<usize>() != sent || sent > routes {
            return Err(Error::Internal(format!("bucketing sent {sent} rows of {routes} routes")));
        }
        let send_rows = bucket.rows.with_bound(rows.sent_by(me));
        let counted = t0.elapsed();
        // The send buffer holds exactly the rows sent, by destination rank.
        let send =
            if scale_input { b.permute_scaled(x, &send_rows, &plan.weights)? } else { b.permute(x, &send_rows)? };
        let t1 = start_timer(b, time_exchange)?;
        let recv = self.transport.all_to_all_rows(b, &send, &rows)?;
        let exchange_time = counted + t1.elapsed();
        // What arrived is by source, then local slot; the experts run by local slot, then
        // source. Block tables from the counts (a loop over ranks × slots, not rows).
        let mut by_source = vec![0usize; n * spr];
        let mut at = 0;
        for src in 0..n {
            for l in 0..spr {
                by_source[src * spr + l] = at;
                at += c(src, me, l);
            }
        }
        let mut to_experts = Vec::with_capacity(n * spr);
        let mut by_expert = vec![0usize; n * spr];
        let mut offsets = vec![0i32];
        let mut at = 0;
        for l in 0..spr {
            for src in 0..n {
                to_experts.push((by_source[src * spr + l], c(src, me, l)));
                by_expert[src * spr + l] = at;
                at += c(src, me, l);
            }
            offsets.push(i32::try_from(at).map_err(|_| Error::too_large("received rows", at.to_string(), "i32"))?);
        }
        let from_experts: Vec<(usize, usize)> = (0..n * spr).map(|i| (by_expert[i], c(i / spr, me, i % spr))).collect();
        let in_rows = rows.received_by(me);
        let to_experts = BlockTable::new(b, &to_experts, in_rows)?;
        let from_experts = BlockTable::new(b, &from_experts, in_rows)?;
        let xp = b.regroup(&recv, &to_experts)?;
        let offsets = Offsets::from_host(b, &offsets)?;
        let state = EpState { send_rows, rows, to_experts, from_experts, tokens, returned: None, exchange_time };
        Ok((xp, offsets, state))
    }

    /// Sends the expert outputs back and combines this rank's tokens by their combine
    /// weights (`weighted`), or unweighted after a dispatch with `scale_input`;
    /// tensor-parallel ranks then gather every rank's tokens.
    pub fn combine(
        &self,
        b: &B,
        yp: &Tensor<B>,
        plan: &Plan<B>,
        state: &mut EpState<B>,
        time_exchange: bool,
        weighted: bool,
    ) -> Result<Tensor<B>> {
        if weighted {
            self.combine_by(b, yp, plan, &plan.weights, state, time_exchange)
        } else {
            let ones = crate::ops::unit_weights(b, plan.tokens(), plan.k())?;
            self.combine_by(b, yp, plan, &ones, state, time_exchange)
        }
    }

    fn combine_by(
        &self,
        b: &B,
        yp: &Tensor<B>,
        plan: &Plan<B>,
        weights: &Tensor<B>,
        state: &mut EpState<B>,
        time_exchange: bool,
    ) -> Result<Tensor<B>> {
        let back = b.regroup(yp, &state.from_experts)?;
        let t0 = start_timer(b, time_exchange)?;
        let returned = self.transport.all_to_all_rows(b, &back, &state.rows.transposed())?;
        state.exchange_time += t0.elapsed();
        let y = b.combine(&returned, &state.send_rows, weights, state.tokens.clone())?;
        state.returned = Some(returned);
        match self.tokens {
            TokenLayout::Sharded => Ok(y),
            TokenLayout::Replicated => {
                let (n, s) = (self.transport.size(), plan.tokens());
                let shares: Vec<usize> = (0..n).map(|r| share(s, r, n).len()).collect();
                let t0 = start_timer(b, time_exchange)?;
                let all = self.transport.all_gather_rows(b, &y, &shares)?;
                state.exchange_time += t0.elapsed();
                Ok(all)
            }
        }
    }

    /// Rows `range` of `x [R, C]` (a one-block regroup).
    fn rows_of(b: &B, x: &Tensor<B>, range: Range<usize>) -> Result<Tensor<B>> {
        let table = BlockTable::new(b, &[(range.start, range.len())], x.shape()[0])?;
        b.regroup(x, &table)
    }

    /// The combine's backward, the forward's combine in reverse: from the gradient of the
    /// layer's routed output (every token when tensor-parallel, this rank's when data
    /// parallel) to the gradient of the expert outputs in the experts' layout (sent back
    /// over the forward's dispatch exchange) and, for a `weighted` combine, of the plan's
    /// combine weights `[S, k]` (tensor-parallel ranks gather every rank's share, so each
    /// holds them all).
    pub fn combine_backward(
        &self,
        b: &B,
        dy: &Tensor<B>,
        plan: &Plan<B>,
        state: &EpState<B>,
        weighted: bool,
    ) -> Result<(Tensor<B>, Option<Tensor<B>>)> {
        if !weighted {
            let ones = crate::ops::unit_weights(b, plan.tokens(), plan.k())?;
            return Ok((self.combine_backward_by(b, dy, &ones, state)?.0, None));
        }
        let (d_yp, d_weights) = self.combine_backward_by(b, dy, &plan.weights, state)?;
        Ok((d_yp, Some(self.gather_weights_grad(b, d_weights, plan, state)?)))
    }

    /// A tensor-parallel rank's share of the combine weights' gradient, gathered from
    /// every rank (data-parallel ranks hold only their own tokens').
    fn gather_weights_grad(
        &self,
        b: &B,
        d_weights: Tensor<B>,
        plan: &Plan<B>,
        state: &EpState<B>,
    ) -> Result<Tensor<B>> {
        match self.tokens {
            TokenLayout::Sharded => Ok(d_weights),
            TokenLayout::Replicated => {
                let (n, s) = (self.transport.size(), plan.tokens());
                let shares: Vec<usize> = (0..n).map(|r| share(s, r, n).len()).collect();
                let mine = Self::rows_of(b, &d_weights, state.tokens.clone())?;
                self.transport.all_gather_rows(b, &mine, &shares)
            }
        }
    }

    /// The combine's backward with the routes weighted by `weights`: the expert outputs'
    /// gradient (in the experts' layout) and this rank's combine weights' (`[S, k]`, rows
    /// of other ranks' tokens zero).
    fn combine_backward_by(
        &self,
        b: &B,
        dy: &Tensor<B>,
        weights: &Tensor<B>,
        state: &EpState<B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        let returned = state
            .returned
            .as_ref()
            .ok_or_else(|| Error::Misuse("backward of an expert-parallel forward that did not combine".into()))?;
        let dy_mine = match self.tokens {
            TokenLayout::Sharded => dy.clone(),
            TokenLayout::Replicated => Self::rows_of(b, dy, state.tokens.clone())?,
        };
        let g = b.combine_grad(&dy_mine, returned, &state.send_rows, weights, state.tokens.clone())?;
        // The returned rows' gradients go where the rows came from: the experts' ranks.
        let recv = self.transport.all_to_all_rows(b, &g.d_yp, &state.rows)?;
        Ok((b.regroup(&recv, &state.to_experts)?, g.d_weights))
    }

    /// The dispatch's backward: the input gradient of the experts' rows goes back to the
    /// ranks that sent them, and each token sums its routes' (a combine with unit
    /// weights); tensor-parallel ranks gather every rank's tokens. `[S, M]`.
    pub fn dispatch_backward(&self, b: &B, dxp: &Tensor<B>, plan: &Plan<B>, state: &EpState<B>) -> Result<Tensor<B>> {
        let d_send = self.sent_rows_grad(b, dxp, state)?;
        let (s, k) = (plan.tokens(), plan.k());
        let ones = crate::ops::unit_weights(b, s, k)?;
        let dx = b.combine(&d_send, &state.send_rows, &ones, state.tokens.clone())?;
        self.gather_tokens(b, dx, s)
    }

    /// The backward of a dispatch with `scale_input`: the input's gradient `[S, M]`
    /// (`Σ_j w · d_row`) and the combine weights' `[S, k]` (`x[t] · d_row`), both gathered
    /// over tensor-parallel ranks.
    pub fn dispatch_scaled_backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        dxp: &Tensor<B>,
        plan: &Plan<B>,
        state: &EpState<B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        let d_send = self.sent_rows_grad(b, dxp, state)?;
        let s = plan.tokens();
        let dx = b.combine(&d_send, &state.send_rows, &plan.weights, state.tokens.clone())?;
        let x_mine = match self.tokens {
            TokenLayout::Sharded => x.clone(),
            TokenLayout::Replicated => Self::rows_of(b, x, state.tokens.clone())?,
        };
        let dw = b.combine_grad(&x_mine, &d_send, &state.send_rows, &plan.weights, state.tokens.clone())?.d_weights;
        Ok((self.gather_tokens(b, dx, s)?, self.gather_weights_grad(b, dw, plan, state)?))
    }

    /// The gradient of the rows this rank sent, back from the experts' ranks.
    fn sent_rows_grad(&self, b: &B, dxp: &Tensor<B>, state: &EpState<B>) -> Result<Tensor<B>> {
        let back = b.regroup(dxp, &state.from_experts)?;
        self.transport.all_to_all_rows(b, &back, &state.rows.transposed())
    }

    /// This rank's tokens' rows `[share, M]`, gathered into every token's when the tokens
    /// are replicated.
    fn gather_tokens(&self, b: &B, dx: Tensor<B>, s: usize) -> Result<Tensor<B>> {
        match self.tokens {
            TokenLayout::Sharded => Ok(dx),
            TokenLayout::Replicated => {
                let n = self.transport.size();
                let shares: Vec<usize> = (0..n).map(|r| share(s, r, n).len()).collect();
                self.transport.all_gather_rows(b, &dx, &shares)
            }
        }
    }
}
