//! Launchers of `shaders/route.wgsl`, `shaders/plan.wgsl` and `shaders/stats.wgsl`:
//! routing, the dispatch plan and the router reductions, all on the device. Operands and
//! parameter blocks arrive checked and encoded by the front doors; the plan runs the
//! schedule `kernel_abi::plan` describes.

use crate::kernels::{PLAN, ROUTE, STATS};
use crate::{WgpuBackend, T};
use moe_engine::kernel_abi::plan::{PlanBuffer, PlanSlice};
use moe_engine::kernel_abi::{grid_1d, WG_PLAN};
use moe_engine::ops::{KeepPolicy, PendingRouteCheck, PlanOp, PlanParts, RouteOp, RouterStatsOp, RoutesParts};
use moe_engine::{DType, Result};

/// Invocations per workgroup of `route.wgsl` (one per token).
const ROUTE_WG: u32 = 64;

pub(crate) fn route(b: &WgpuBackend, op: &RouteOp<'_, WgpuBackend>) -> Result<RoutesParts<WgpuBackend>> {
    let (s, e, k) = (op.tokens, op.experts, op.spec.k);
    let bias = op.spec.bias.map(|t| WgpuBackend::buf(t, "e_score_correction_bias", DType::F32)).transpose()?;
    let noise = op.spec.choice_noise.map(|t| WgpuBackend::buf(t, "gumbel", DType::F32)).transpose()?;
    let lb = WgpuBackend::buf(op.logits, "logits", DType::F32)?;
    let scores = b.tensor(&[s, e], DType::F32, "scores")?;
    let experts = b.tensor(&[s, k], DType::I32, "routes.experts")?;
    let weights = b.tensor(&[s, k], DType::F32, "routes.weights")?;
    if s > 0 {
        let status = b.route_status_buffer();
        b.dispatch(
            &ROUTE,
            "route",
            &op.params,
            &[
                lb,
                bias.unwrap_or(&b.dummy),
                noise.unwrap_or(&b.dummy),
                &scores.buffer().buf,
                &experts.buffer().buf,
                &weights.buffer().buf,
                &status,
            ],
            grid_1d(s, ROUTE_WG),
        )?;
        let inputs = [Some(lb.clone()), bias.cloned(), noise.cloned()];
        b.checks.push(PendingRouteCheck { status, inputs, experts: e });
    }
    Ok(RoutesParts { experts, weights, scores })
}

pub(crate) fn plan(b: &WgpuBackend, op: &PlanOp<'_, WgpuBackend>) -> Result<PlanParts<WgpuBackend>> {
    let sched = &op.schedule;
    let used = op.spec.used_token.map(|u| WgpuBackend::buf(u, "used_token", DType::F32)).transpose()?;
    let priority = match &op.spec.keep {
        KeepPolicy::Priority(p) => Some(WgpuBackend::buf(p, "priority", DType::F32)?),
        _ => None,
    };
    let scratch = b.alloc(4 * sched.scratch_words as u64, "plan scratch")?;
    let info = b.alloc(4 * sched.info_words as u64, "plan info")?;
    let sr = b.alloc(4 * sched.slots_rows_words as u64, "plan slots and rows")?;
    let (s, k, _) = op.dims;
    let weights = b.tensor(&[s, k], DType::F32, "plan.weights")?;
    let bufs = [
        WgpuBackend::buf(&op.routes.experts, "routes.experts", DType::I32)?,
        WgpuBackend::buf(&op.routes.weights, "routes.weights", DType::F32)?,
        used.unwrap_or(&b.dummy),
        priority.unwrap_or(&b.dummy),
        &scratch.buf,
        &info.buf,
        &sr.buf,
        &weights.buffer().buf,
    ];
    for pass in &sched.passes {
        b.dispatch(&PLAN, pass.entry, &sched.params, &bufs, grid_1d(pass.invocations, WG_PLAN))?;
    }
    // Cut the plan's tensors out of the buffers the passes wrote.
    PlanParts::from_schedule(sched, weights, |slice: &PlanSlice| {
        let t = b.tensor(&slice.shape, DType::I32, "plan output")?;
        let from = match slice.buffer {
            PlanBuffer::Info => &info.buf,
            PlanBuffer::SlotsRows => &sr.buf,
        };
        b.copy(from, 4 * slice.offset as u64, &t.buffer().buf, 0, 4 * slice.len() as u64);
        Ok(t)
    })
}

pub(crate) fn router_stats(b: &WgpuBackend, op: &RouterStatsOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&[op.experts + 1], DType::F32, "router stats")?;
    b.dispatch(
        &STATS,
        "router_stats",
        &op.params,
        &[
            WgpuBackend::buf(op.logits, "logits", DType::F32)?,
            WgpuBackend::buf(op.scores, "scores", DType::F32)?,
            &out.buffer().buf,
        ],
        grid_1d(op.experts + 1, 64),
    )?;
    Ok(out)
}
