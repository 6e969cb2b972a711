//! Routing on the cpu: scores, choice (top-k, DeepSpeed top-2, group-limited, sparsemixer)
//! and weights.
//! This is the reference the GPU route kernels are checked against.

use crate::par::Par;
use crate::{f32s, tf32, ti32, CpuBackend, T};
use moe_engine::ops::{
    route_status, status_word, Choice, GroupScore, Normalize, RouteOp, RouterStatsOp, RoutesParts, ScoreFn,
};
use moe_engine::Result;
use rayon::prelude::*;

/// Index of the largest value, ties to the lower index; `skip` is excluded.
fn argmax(v: impl Iterator<Item = f32>, skip: Option<usize>) -> usize {
    let mut best = usize::MAX;
    let mut best_v = f32::NEG_INFINITY;
    for (i, x) in v.enumerate() {
        if Some(i) == skip {
            continue;
        }
        // Strictly greater keeps the lower index on ties; the first candidate always wins
        // over the sentinel even when it is −inf.
        if best == usize::MAX || x > best_v {
            best = i;
            best_v = x;
        }
    }
    best
}

/// The k largest of `key`, in descending order, ties to the lower index. Entries equal to
/// −inf (masked) are only taken when nothing else is left.
pub(crate) fn top_k(key: &[f32], k: usize, out: &mut Vec<usize>) {
    out.clear();
    let mut idx: Vec<usize> = (0..key.len()).collect();
    // Stable sort by descending key keeps lower indices first among equals. The keys are
    // finite or −inf (masked experts): the route op refuses non-finite inputs, so this is
    // a total order.
    idx.sort_by(|&a, &b| key[b].total_cmp(&key[a]));
    out.extend_from_slice(&idx[..k]);
}

/// torch's softplus threshold: `softplus(x) = x` past it (`F.softplus`, beta 1).
const SOFTPLUS_THRESHOLD: f32 = 20.0;

/// `sqrt(softplus(x))` as torch's `F.softplus(x).sqrt()`: `sqrt(x)` past the threshold,
/// `sqrt(ln(1 + eˣ))` up to it. Below −20, `ln(1 + eˣ) = eˣ` to f32 precision (the next
/// term is eˣ/2 relative), so the score is `e^(x/2)`: the same value, and a normal number
/// down to x ≈ −174 where eˣ is subnormal (which GPUs may flush to 0) from x ≈ −87.
pub(crate) fn sqrt_softplus(x: f32) -> f32 {
    if x > SOFTPLUS_THRESHOLD {
        x.sqrt()
    } else if x < -SOFTPLUS_THRESHOLD {
        (0.5 * x).exp()
    } else {
        x.exp().ln_1p().sqrt()
    }
}

/// d sqrt(softplus(x)) / dx from x and its score s = sqrt(softplus(x)): `sigmoid(x) / 2s`,
/// with torch's threshold (softplus' slope is 1 past 20, so `1 / 2s`); below −20, where
/// sigmoid(x) = softplus(x) = s² to f32 precision, `s / 2`, which needs no division by a
/// score that may be 0.
pub(crate) fn sqrt_softplus_grad(x: f32, s: f32) -> f32 {
    if x > SOFTPLUS_THRESHOLD {
        0.5 / s
    } else if x < -SOFTPLUS_THRESHOLD {
        0.5 * s
    } else {
        1.0 / (1.0 + (-x).exp()) / (2.0 * s)
    }
}

/// Whether PhiMoE's sparsemixer keeps logit `x` around the max `m`: it masks
/// `(m − x) / max(|x|, m) > 2 · jitter_eps`. A zero factor (x = m = 0) gives 0/0 in torch,
/// which compares false: kept.
pub(crate) fn mixer_kept(x: f32, m: f32, jitter_eps: f32) -> bool {
    let f = x.abs().max(m);
    !(f > 0.0 && (m - x) / f > 2.0 * jitter_eps)
}

/// `Σ exp(xᵢ − m)` over the experts sparsemixer keeps around `m`, `skip` excluded: the
/// masked softmax's denominator, whose value at the max (x = m) is its inverse.
pub(crate) fn mixer_sum(row: &[f32], m: f32, skip: Option<usize>, jitter_eps: f32) -> f32 {
    let mut sum = 0f32;
    for (i, &x) in row.iter().enumerate() {
        if Some(i) != skip && mixer_kept(x, m, jitter_eps) {
            sum += (x - m).exp();
        }
    }
    sum
}

/// The p-norm of the chosen weights (all ≥ 0), as `torch.norm(w, p)`: p = 1 and 2 as the
/// sum and the root of the sum of squares (exact where a general power would round), and
/// zero weights add nothing (0ᵖ without the power).
pub(crate) fn p_norm(w: &[f32], p: f32) -> f32 {
    if p == 1.0 {
        w.iter().sum()
    } else if p == 2.0 {
        w.iter().map(|&v| v * v).sum::<f32>().sqrt()
    } else {
        w.iter().map(|&v| if v == 0.0 { 0.0 } else { v.powf(p) }).sum::<f32>().powf(1.0 / p)
    }
}

/// The normaliser of the chosen weights `w` (1 for none).
pub(crate) fn normaliser(normalize: Normalize, w: &[f32]) -> f32 {
    let sum = || w.iter().sum::<f32>();
    match normalize {
        Normalize::None => 1.0,
        Normalize::Sum => sum(),
        Normalize::SumPlus(eps) => sum() + eps,
        Normalize::SumFloor(floor) => sum().max(floor),
        Normalize::PNorm(p) => p_norm(w, p),
    }
}

fn scores_row(row: &[f32], score: ScoreFn, out: &mut [f32]) {
    match score {
        ScoreFn::Softmax => {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &x) in out.iter_mut().zip(row) {
                *o = (x - max).exp();
                sum += *o;
            }
            for o in out.iter_mut() {
                *o /= sum;
            }
        }
        ScoreFn::Sigmoid => {
            for (o, &x) in out.iter_mut().zip(row) {
                *o = 1.0 / (1.0 + (-x).exp());
            }
        }
        ScoreFn::SqrtSoftplus => {
            for (o, &x) in out.iter_mut().zip(row) {
                *o = sqrt_softplus(x);
            }
        }
    }
}

/// The status word of the first non-finite element of `v`, as the route kernels write it.
fn first_bad(v: Option<&[f32]>) -> u32 {
    status_word(v.and_then(|v| v.iter().position(|x| !x.is_finite())))
}

/// The route op: see [`moe_engine::backend::Backend::route`].
pub(crate) fn route(op: &RouteOp<'_, CpuBackend>, par: Par) -> Result<RoutesParts<CpuBackend>> {
    let (s, e, spec) = (op.tokens, op.experts, op.spec);
    let l = f32s(op.logits, "logits")?;
    let k = spec.k;
    let bias = spec.bias.map(|b| f32s(b, "e_score_correction_bias")).transpose()?;
    let noise = spec.choice_noise.map(|n| f32s(n, "choice noise")).transpose()?;
    // The same status words the GPU route kernels write, read the same way.
    let status = [first_bad(Some(l)), first_bad(bias), first_bad(noise)];
    route_status(status, e, |which, i| Ok([Some(l), bias, noise][which].map_or(f32::NAN, |v| v[i])))?;

    let mut scores = vec![0f32; s * e];
    let mut experts = vec![0i32; s * k];
    let mut weights = vec![0f32; s * k];
    // Each token's scratch: the choice keys, the chosen experts and the masked ones.
    let init = || (vec![0f32; e], Vec::with_capacity(e), vec![false; e]);
    type Scratch = (Vec<f32>, Vec<usize>, Vec<bool>);
    // One token's outputs: its index, score row, chosen experts and their weights.
    type TokenRows<'a> = (usize, ((&'a mut [f32], &'a mut [i32]), &'a mut [f32]));
    let body = |(key, chosen, masked_out): &mut Scratch, (t, ((sc, ex), w)): TokenRows<'_>| {
        masked_out.fill(false);
        let row = &l[t * e..(t + 1) * e];
        scores_row(row, spec.score, sc);
        // The quantity the choice is made on.
        for i in 0..e {
            key[i] = sc[i] + bias.map_or(0.0, |b| b[i]);
        }
        match spec.choice {
            Choice::TopK => {
                if let Some(nz) = noise {
                    for i in 0..e {
                        key[i] = row[i] + nz[t * e + i];
                    }
                }
                top_k(key, k, chosen);
            }
            Choice::DeepSpeedTop2 => {
                chosen.clear();
                let first = argmax(sc.iter().copied(), None);
                chosen.push(first);
                if k > 1 {
                    let second = match noise {
                        Some(nz) => argmax((0..e).map(|i| row[i] + nz[t * e + i]), Some(first)),
                        None => argmax(row.iter().copied(), Some(first)),
                    };
                    chosen.push(second);
                }
            }
            Choice::GroupLimited { n_group, topk_group, group_score } => {
                let per = e / n_group;
                let mut gs = vec![0f32; n_group];
                for (g, gsv) in gs.iter_mut().enumerate() {
                    let grp = &key[g * per..(g + 1) * per];
                    *gsv = match group_score {
                        GroupScore::Max => grp.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                        GroupScore::SumTop2 => {
                            let a = argmax(grp.iter().copied(), None);
                            let b = argmax(grp.iter().copied(), Some(a));
                            grp[a] + grp[b]
                        }
                    };
                }
                let mut kept = Vec::with_capacity(topk_group);
                top_k(&gs, topk_group, &mut kept);
                // V2 (Max) fills the other groups with 0 like HF's masked_fill(0.0); V3 with -inf.
                let fill = if group_score == GroupScore::Max { 0.0 } else { f32::NEG_INFINITY };
                let mut masked = vec![fill; e];
                masked_out.fill(true);
                for g in kept {
                    masked[g * per..(g + 1) * per].copy_from_slice(&key[g * per..(g + 1) * per]);
                    masked_out[g * per..(g + 1) * per].fill(false);
                }
                top_k(&masked, k, chosen);
            }
            Choice::SparseMixer { .. } => {
                chosen.clear();
                let first = argmax(row.iter().copied(), None);
                chosen.push(first);
                chosen.push(argmax(row.iter().copied(), Some(first)));
            }
        }
        for (j, &c) in chosen.iter().enumerate() {
            ex[j] = c as i32;
            w[j] = match spec.choice {
                // The masked softmax at its max, expert 1 excluded for the second.
                Choice::SparseMixer { jitter_eps } => {
                    let skip = (j == 1).then_some(chosen[0]);
                    1.0 / mixer_sum(row, row[c], skip, jitter_eps)
                }
                // A route that fell on a masked expert (V2 with k beyond the kept
                // groups) carries the masked score, 0.
                _ if masked_out[c] => 0.0,
                _ => sc[c],
            };
        }
        let denom = normaliser(spec.normalize, w);
        for wj in w.iter_mut() {
            if !matches!(spec.normalize, Normalize::None) {
                *wj /= denom;
            }
            *wj *= spec.scale;
        }
    };
    let (e1, k1) = (e.max(1), k.max(1));
    if par.0 {
        scores
            .par_chunks_mut(e1)
            .zip(experts.par_chunks_mut(k1))
            .zip(weights.par_chunks_mut(k1))
            .enumerate()
            .for_each_init(init, body);
    } else {
        let mut scratch = init();
        scores
            .chunks_mut(e1)
            .zip(experts.chunks_mut(k1))
            .zip(weights.chunks_mut(k1))
            .enumerate()
            .for_each(|item| body(&mut scratch, item));
    }
    Ok(RoutesParts {
        experts: ti32(&[s, k], experts)?,
        weights: tf32(&[s, k], weights)?,
        scores: tf32(&[s, e], scores)?,
    })
}

/// Mean score per expert over tokens, then the mean of logsumexp(logits)².
pub(crate) fn router_stats(op: &RouterStatsOp<'_, CpuBackend>) -> Result<T> {
    let (s, e) = (op.tokens, op.experts);
    let l = f32s(op.logits, "logits")?;
    let sc = f32s(op.scores, "scores")?;
    let mut mean = vec![0f64; e];
    let mut z = 0f64;
    for t in 0..s {
        let row = &l[t * e..(t + 1) * e];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        z += lse * lse;
        for i in 0..e {
            mean[i] += sc[t * e + i] as f64;
        }
    }
    let n = s.max(1) as f64;
    let mut out: Vec<f32> = mean.iter().map(|m| (m / n) as f32).collect();
    out.push((z / n) as f32);
    tf32(&[e + 1], out)
}
