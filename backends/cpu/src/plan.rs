//! The dispatch plan on the cpu: counts, capacity, slots in token order (or by priority),
//! compact expert-major rows and the final combine weights. Never builds an [S, E, C] mask.

use crate::{f32s, i32s, tf32, ti32, CpuBackend};
use moe_engine::ops::{KeepPolicy, PlanOp, PlanParts};
use moe_engine::Result;

/// A priority as the plan compares it: NaN ranks lowest (as −inf), the same rule as
/// kernels/plan.cu and shaders/plan.wgsl, so a NaN priority neither panics the sort nor
/// makes the backends disagree.
fn priority_key(p: f32) -> f32 {
    if p.is_nan() {
        f32::NEG_INFINITY
    } else {
        p
    }
}

/// The plan op: see [`moe_engine::backend::Backend::plan`].
pub(crate) fn plan(op: &PlanOp<'_, CpuBackend>) -> Result<PlanParts<CpuBackend>> {
    let (s, k, e) = op.dims;
    let spec = op.spec;
    // Expert ids are in 0..E: `Routes` are only made by the route op or checked host data.
    let ex = i32s(&op.routes.experts, "routes.experts")?;
    let rw = f32s(&op.routes.weights, "routes.weights")?;
    let used = spec.used_token.map(|u| f32s(u, "used_token")).transpose()?;
    let valid = |t: usize| used.is_none_or(|u| u[t] != 0.0);
    let (group, n_groups) = (op.group, op.n_groups);

    let mut counts = vec![0i32; e];
    let mut first_counts = vec![0i32; e];
    let mut masked = 0i32;
    for t in 0..s {
        for j in 0..k {
            if valid(t) {
                counts[ex[t * k + j] as usize] += 1;
                if j == 0 {
                    first_counts[ex[t * k] as usize] += 1;
                }
            } else {
                masked += 1;
            }
        }
    }
    let max_count = *counts.iter().max().unwrap_or(&0) as usize;
    // The capacity the kernels take (the params' rule and value, as on the GPUs).
    let p = &op.schedule.params;
    let capacity: Option<usize> = match p.cap_rule {
        1 => Some(p.cap_value as usize),
        2 => Some(if p.clamp == 1 { max_count.min(s) } else { max_count }),
        _ => None,
    };
    let priority = match &spec.keep {
        KeepPolicy::Priority(p) => Some(f32s(p, "priority")?),
        _ => None,
    };

    let mut slots = vec![-1i32; s * k];
    // Per group and expert, the routes in slot order (route index t·k + j).
    let mut kept_in_order: Vec<Vec<Vec<usize>>> = vec![vec![Vec::new(); e]; n_groups];
    let mut cand: Vec<Vec<usize>> = vec![Vec::new(); e];
    for (g, kept_g) in kept_in_order.iter_mut().enumerate() {
        for c in cand.iter_mut() {
            c.clear();
        }
        let tokens = g * group..(g + 1) * group;
        // Candidates of each expert in slot order.
        match spec.keep {
            KeepPolicy::RankMajor => {
                for j in 0..k {
                    for t in tokens.clone() {
                        if valid(t) {
                            cand[ex[t * k + j] as usize].push(t * k + j);
                        }
                    }
                }
            }
            _ => {
                for t in tokens.clone() {
                    for j in 0..k {
                        if valid(t) {
                            cand[ex[t * k + j] as usize].push(t * k + j);
                        }
                    }
                }
            }
        }
        for (x, c) in cand.iter().enumerate() {
            let keep: Vec<usize> = match (capacity, priority) {
                (Some(cap), Some(p)) if c.len() > cap => {
                    // Highest priority first (ties to the earlier token); kept routes then
                    // take slots in token order.
                    let mut by_p = c.clone();
                    by_p.sort_by(|&a, &b| {
                        let (pa, pb) = (priority_key(p[(a / k) * e + x]), priority_key(p[(b / k) * e + x]));
                        // No NaN is left, so only ±0 compare equal: IEEE order, as the kernels.
                        pb.partial_cmp(&pa).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b))
                    });
                    by_p.truncate(cap);
                    by_p.sort_unstable();
                    by_p
                }
                (Some(cap), _) => c.iter().copied().take(cap).collect(),
                (None, _) => c.clone(),
            };
            for (slot, &r) in keep.iter().enumerate() {
                slots[r] = slot as i32;
            }
            kept_g[x] = keep;
        }
    }

    let mut kept_counts = vec![0i32; e];
    for kept_g in &kept_in_order {
        for (x, v) in kept_g.iter().enumerate() {
            kept_counts[x] += v.len() as i32;
        }
    }
    let mut offsets = vec![0i32; e + 1];
    for x in 0..e {
        offsets[x + 1] = offsets[x] + kept_counts[x];
    }
    let mut rows = vec![-1i32; s * k];
    let mut next = offsets[..e].to_vec();
    for kept_g in &kept_in_order {
        for (x, v) in kept_g.iter().enumerate() {
            for &r in v {
                rows[r] = next[x];
                next[x] += 1;
            }
        }
    }

    let mut weights = vec![0f32; s * k];
    let mut dropped_routes = 0i32;
    let mut dropped_tokens = 0i32;
    for t in 0..s {
        let w = &mut weights[t * k..(t + 1) * k];
        let mut any = false;
        for j in 0..k {
            if rows[t * k + j] >= 0 {
                w[j] = rw[t * k + j];
                any = true;
            } else if valid(t) {
                dropped_routes += 1;
            }
        }
        if valid(t) && !any {
            dropped_tokens += 1;
        }
        if spec.renormalize_kept {
            // DeepSpeed: divide by the kept sum clamped at f32 eps, so a lone survivor gets
            // 1.0 and a token whose routes were all dropped keeps 0.
            let denom = w.iter().sum::<f32>().max(f32::EPSILON);
            for v in w.iter_mut() {
                *v /= denom;
            }
        }
    }
    let cap_report = capacity.unwrap_or(max_count) as i32;
    Ok(PlanParts {
        counts: ti32(&[e], counts)?,
        first_counts: ti32(&[e], first_counts)?,
        kept_counts: ti32(&[e], kept_counts)?,
        offsets: ti32(&[e + 1], offsets)?,
        slots: ti32(&[s, k], slots)?,
        rows: ti32(&[s, k], rows)?,
        weights: tf32(&[s, k], weights)?,
        stats: ti32(&[4], vec![cap_report, dropped_routes, masked, dropped_tokens])?,
    })
}
