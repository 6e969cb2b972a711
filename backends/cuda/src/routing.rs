//! Launchers of kernels/route.cu, kernels/plan.cu and kernels/stats.cu: routing, the
//! dispatch plan (the schedule `kernel_abi::plan` describes) and the router reductions.

use crate::device::{derr, CudaBackend, Param, T};
use crate::launch;
use cudarc::driver::{CudaSlice, PushKernelArg};
use moe_engine::kernel_abi::plan::{PlanBuffer, PlanSlice};
use moe_engine::kernel_abi::ROUTE_STATUS_WORDS;
use moe_engine::ops::{KeepPolicy, PendingRouteCheck, PlanOp, PlanParts, RouteOp, RouterStatsOp, RoutesParts};
use moe_engine::Result;

impl CudaBackend {
    pub(crate) fn route(&self, op: &RouteOp<'_, Self>) -> Result<RoutesParts<Self>> {
        let (s, e, k) = (op.tokens, op.experts, op.spec.k);
        let l = Self::f32s(op.logits, "logits")?;
        let bias = op.spec.bias.map(|b| Self::f32s(b, "e_score_correction_bias")).transpose()?;
        let noise = op.spec.choice_noise.map(|n| Self::f32s(n, "gumbel")).transpose()?;
        let mut scores = self.zeros::<f32>(s * e)?;
        let mut experts = self.zeros::<i32>(s * k)?;
        let mut weights = self.zeros::<f32>(s * k)?;
        if s > 0 {
            let f = self.function("route.cu", "route")?;
            // A zeroed status buffer per call (no host write to reset one).
            let mut status = self.zeros::<u32>(ROUTE_STATUS_WORDS)?;
            let p = Param(op.params);
            // SAFETY: matches kernels/route.cu route(logits, bias, noise, scores, experts,
            // weights, status, RouteParams); one warp per token; bias and noise are read
            // only when their flags are set.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(l)
                    .arg(bias.unwrap_or(&self.dummy))
                    .arg(noise.unwrap_or(&self.dummy))
                    .arg(&mut scores)
                    .arg(&mut experts)
                    .arg(&mut weights)
                    .arg(&mut status)
                    .arg(&p)
                    .launch(launch::route(s).config())
            }
            .map_err(derr)?;
            // The inputs stay alive with the check (handles, not copies): read only when a
            // non-finite value was flagged.
            let inputs = [Some(op.logits.clone()), op.spec.bias.cloned(), op.spec.choice_noise.cloned()];
            self.checks.push(PendingRouteCheck { status, inputs, experts: e });
        }
        Ok(RoutesParts {
            experts: Self::out_i32(&[s, k], experts)?,
            weights: Self::out(&[s, k], weights)?,
            scores: Self::out(&[s, e], scores)?,
        })
    }

    pub(crate) fn plan(&self, op: &PlanOp<'_, Self>) -> Result<PlanParts<Self>> {
        let sched = &op.schedule;
        let used = op.spec.used_token.map(|u| Self::f32s(u, "used_token")).transpose()?.unwrap_or(&self.dummy);
        let priority = match &op.spec.keep {
            KeepPolicy::Priority(p) => Self::f32s(p, "priority")?,
            _ => &self.dummy,
        };
        let ex = Self::i32s(&op.routes.experts, "routes.experts")?;
        let rw = Self::f32s(&op.routes.weights, "routes.weights")?;
        let mut scratch = self.zeros::<i32>(sched.scratch_words)?;
        let mut info = self.zeros::<i32>(sched.info_words)?;
        let mut sr = self.zeros::<i32>(sched.slots_rows_words)?;
        let mut pw = self.zeros::<f32>(sched.weights_len)?;
        let p = Param(sched.params);
        for pass in &sched.passes {
            let f = self.function("plan.cu", pass.entry)?;
            // SAFETY: every pass of kernels/plan.cu takes the same arguments
            // (kernel_abi::plan::BINDINGS, then PlanParams); the buffers are sized by the
            // schedule.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(ex)
                    .arg(rw)
                    .arg(used)
                    .arg(priority)
                    .arg(&mut scratch)
                    .arg(&mut info)
                    .arg(&mut sr)
                    .arg(&mut pw)
                    .arg(&p)
                    .launch(launch::plan_pass(pass).config())
            }
            .map_err(derr)?;
        }
        let (s, k, _) = op.dims;
        let weights = Self::out(&[s, k], pw)?;
        PlanParts::from_schedule(sched, weights, |slice: &PlanSlice| {
            let src: &CudaSlice<i32> = match slice.buffer {
                PlanBuffer::Info => &info,
                PlanBuffer::SlotsRows => &sr,
            };
            let mut dst = self.zeros::<i32>(slice.len())?;
            if !slice.is_empty() {
                self.stream
                    .memcpy_dtod(&src.slice(slice.offset..slice.offset + slice.len()), &mut dst)
                    .map_err(derr)?;
            }
            Self::out_i32(&slice.shape, dst)
        })
    }

    pub(crate) fn router_stats(&self, op: &RouterStatsOp<'_, Self>) -> Result<T> {
        let mut out = self.zeros::<f32>(op.experts + 1)?;
        let f = self.function("stats.cu", "router_stats")?;
        let p = Param(op.params);
        // SAFETY: matches kernels/stats.cu router_stats(logits, scores, out, StatsParams).
        unsafe {
            self.stream
                .launch_builder(&f)
                .arg(Self::f32s(op.logits, "logits")?)
                .arg(Self::f32s(op.scores, "scores")?)
                .arg(&mut out)
                .arg(&p)
                .launch(launch::router_stats(op.experts).config())
        }
        .map_err(derr)?;
        Self::out(&[op.experts + 1], out)
    }
}
