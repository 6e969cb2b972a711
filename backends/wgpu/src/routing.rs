//! Launchers of `shaders/route.wgsl`, `shaders/plan.wgsl` and `shaders/stats.wgsl`:
//! routing, the dispatch plan and the router reductions, all on the device. Everything
//! that follows from shapes and configuration (argument errors, DeepSpeed's static
//! capacity) is settled here on the host before anything is recorded.

use crate::kernels::{grid_1d, PLAN, ROUTE, STATS};
use crate::{PendingCheck, WgpuBackend, T};
use moe_engine::backend::{Choice, GroupScore, KeepPolicy, Normalize, Plan, PlanSpec, RouteSpec, Routes, ScoreFn};
use moe_engine::{DType, Error, Result, Tensor};

/// Experts the route shader's bit sets hold, and groups its group table holds.
const MAX_EXPERTS: usize = 1024;
const MAX_GROUPS: usize = 64;

pub(crate) fn route(b: &WgpuBackend, logits: &T, spec: &RouteSpec<'_, WgpuBackend>) -> Result<Routes<WgpuBackend>> {
    let (s, e) = logits.dims2("logits")?;
    let k = spec.k;
    spec.validate(e)?;
    if e > MAX_EXPERTS {
        return Err(Error::Unsupported {
            backend: "wgpu".into(),
            what: format!("{e} experts (the route shader takes up to {MAX_EXPERTS})"),
        });
    }
    let (choice, n_group, topk_group, group_score) = match spec.choice {
        Choice::TopK => (0, 0, 0, 0),
        Choice::DeepSpeedTop2 => (1, 0, 0, 0),
        Choice::GroupLimited { n_group, topk_group, group_score } => {
            if n_group > MAX_GROUPS {
                return Err(Error::Unsupported {
                    backend: "wgpu".into(),
                    what: format!("{n_group} expert groups (the route shader takes up to {MAX_GROUPS})"),
                });
            }
            (2, n_group as u32, topk_group as u32, if group_score == GroupScore::Max { 0 } else { 1 })
        }
    };
    let bias = match spec.bias {
        Some(t) => {
            if t.shape() != [e] {
                return Err(Error::shape("e_score_correction_bias", format!("[{e}]"), t.shape()));
            }
            Some(WgpuBackend::buf(t, "e_score_correction_bias", DType::F32)?)
        }
        None => None,
    };
    let noise = match spec.choice_noise {
        Some(t) => {
            if t.shape() != [s, e] {
                return Err(Error::shape("choice noise (gumbel)", format!("[{s}, {e}]"), t.shape()));
            }
            Some(WgpuBackend::buf(t, "gumbel", DType::F32)?)
        }
        None => None,
    };
    let (normalize, eps) = match spec.normalize {
        Normalize::None => (0, 0.0f32),
        Normalize::Sum => (1, 0.0),
        Normalize::SumPlus(eps) => (2, eps),
    };
    let lb = WgpuBackend::buf(logits, "logits", DType::F32)?;
    let scores = b.tensor(&[s, e], DType::F32, "scores")?;
    let experts = b.tensor(&[s, k], DType::I32, "routes.experts")?;
    let weights = b.tensor(&[s, k], DType::F32, "routes.weights")?;
    if s > 0 {
        let params = [
            s as u32,
            e as u32,
            k as u32,
            if spec.score == ScoreFn::Softmax { 0 } else { 1 },
            choice,
            bias.is_some() as u32,
            noise.is_some() as u32,
            normalize,
            eps.to_bits(),
            spec.scale.to_bits(),
            n_group,
            topk_group,
            group_score,
        ];
        b.dispatch(
            &ROUTE,
            "route",
            &params,
            &[
                lb,
                bias.unwrap_or(&b.dummy),
                noise.unwrap_or(&b.dummy),
                &scores.buffer().buf,
                &experts.buffer().buf,
                &weights.buffer().buf,
                &b.status,
            ],
            grid_1d(s, 64),
        )?;
        *b.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(PendingCheck { logits: lb.clone(), experts: e });
    }
    Ok(Routes { experts, weights, scores })
}

pub(crate) fn plan(
    b: &WgpuBackend,
    routes: &Routes<WgpuBackend>,
    spec: &PlanSpec<'_, WgpuBackend>,
) -> Result<Plan<WgpuBackend>> {
    let (s, k) = routes.experts.dims2("routes.experts")?;
    let e = spec.num_experts;
    let params = spec.kernel_params(s, k, routes.weights.shape())?;
    let (n_groups, keep) = (params[4] as usize, params[8]);
    let used = spec.used_token.map(|u| WgpuBackend::buf(u, "used_token", DType::F32)).transpose()?;
    let priority = match &spec.keep {
        KeepPolicy::Priority(p) => Some(WgpuBackend::buf(p, "priority", DType::F32)?),
        _ => None,
    };
    let sk = s * k;
    let ge = n_groups * e;
    let scratch = b.alloc(4 * (4 * ge + sk + 2 * s) as u64, "plan scratch")?;
    let info = b.alloc(4 * (4 * e + 6) as u64, "plan info")?;
    let sr = b.alloc(4 * (2 * sk) as u64, "plan slots and rows")?;
    let weights = b.tensor(&[s, k], DType::F32, "plan.weights")?;
    let bufs = [
        WgpuBackend::buf(&routes.experts, "routes.experts", DType::I32)?,
        WgpuBackend::buf(&routes.weights, "routes.weights", DType::F32)?,
        used.unwrap_or(&b.dummy),
        priority.unwrap_or(&b.dummy),
        &scratch.buf,
        &info.buf,
        &sr.buf,
        &weights.buffer().buf,
    ];
    b.dispatch(&PLAN, "count", &params, &bufs, grid_1d(ge, 64))?;
    b.dispatch(&PLAN, "capacity", &params, &bufs, [1, 1, 1])?;
    if keep == 2 {
        b.dispatch(&PLAN, "rank", &params, &bufs, grid_1d(sk, 64))?;
    }
    b.dispatch(&PLAN, "slots", &params, &bufs, grid_1d(ge, 64))?;
    b.dispatch(&PLAN, "offsets", &params, &bufs, [1, 1, 1])?;
    b.dispatch(&PLAN, "finish", &params, &bufs, grid_1d(s, 64))?;
    b.dispatch(&PLAN, "stats", &params, &bufs, [1, 1, 1])?;
    // Split the packed results into the plan's tensors.
    let part = |from: &wgpu::Buffer, at: usize, shape: &[usize], dtype: DType, name: &str| -> Result<T> {
        let t: Tensor<WgpuBackend> = b.tensor(shape, dtype, name)?;
        b.copy(from, 4 * at as u64, &t.buffer().buf, 0, 4 * t.numel() as u64);
        Ok(t)
    };
    Ok(Plan {
        counts: part(&info.buf, 0, &[e], DType::I32, "plan.counts")?,
        first_counts: part(&info.buf, e, &[e], DType::I32, "plan.first_counts")?,
        kept_counts: part(&info.buf, 2 * e, &[e], DType::I32, "plan.kept_counts")?,
        offsets: part(&info.buf, 3 * e, &[e + 1], DType::I32, "plan.offsets")?,
        stats: part(&info.buf, 4 * e + 1, &[4], DType::I32, "plan.stats")?,
        slots: part(&sr.buf, 0, &[s, k], DType::I32, "plan.slots")?,
        rows: part(&sr.buf, sk, &[s, k], DType::I32, "plan.rows")?,
        weights,
    })
}

pub(crate) fn router_stats(b: &WgpuBackend, logits: &T, scores: &T) -> Result<T> {
    let (s, e) = logits.dims2("logits")?;
    if scores.shape() != [s, e] {
        return Err(Error::shape("scores", format!("[{s}, {e}]"), scores.shape()));
    }
    let out = b.tensor(&[e + 1], DType::F32, "router stats")?;
    b.dispatch(
        &STATS,
        "router_stats",
        &[s as u32, e as u32],
        &[
            WgpuBackend::buf(logits, "logits", DType::F32)?,
            WgpuBackend::buf(scores, "scores", DType::F32)?,
            &out.buffer().buf,
        ],
        grid_1d(e + 1, 64),
    )?;
    Ok(out)
}
