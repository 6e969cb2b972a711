//! Backward ops on the cpu: the reference the GPU backward kernels are checked against.
//! Products go through gemm (one single-threaded gemm per output block, so the sum over
//! rows keeps one order and a backward is bitwise repeatable); the rest are row loops.

use crate::matmul::{gemm_raw, offsets, tiles, SharedOut, COL_BLOCK, SERIAL_WORK};
use crate::par::share;
use crate::route::{mixer_kept, mixer_sum, normaliser, sqrt_softplus_grad};
use crate::weights::{weight_data, widen_block, Stored};
use crate::{f32s, i32s, tf32, CpuBackend, T};
use moe_engine::ops::{
    ActGradKind, ActGradOp, Choice, CombineGrad, CombineGradOp, GatedAddGrad, GatedAddGradOp, LinearDxOp, MixGrad,
    MixGradOp, Normalize, RouteGradOp, ScoreFn, SumRowsOp, WeightGrad, WeightGradOp,
};
use moe_engine::{Activation, Result};
use rayon::prelude::*;

/// Group offsets of an op's `groups` expert groups (a tail of weightless groups past them,
/// `Offsets::with_tail`, is left out: its rows take no gradient), or the one group of all
/// rows.
fn groups_of(o: Option<&moe_engine::ops::Offsets<CpuBackend>>, groups: usize, rows: usize) -> Result<Vec<i32>> {
    match o {
        Some(o) => Ok(offsets(o, rows)?[..=groups].to_vec()),
        None => Ok(vec![0, rows as i32]),
    }
}

/// `dx [R, K] = dy [R, N] · w[g] [N, K]` per group.
pub(crate) fn linear_dx(op: &LinearDxOp<'_, CpuBackend>, threads: usize) -> Result<T> {
    let (r, n, kk) = (op.rows, op.n, op.k);
    let off = groups_of(op.offsets, op.params.groups as usize, r)?;
    let dy = f32s(op.dy, "output gradient")?;
    let w = weight_data(op.w, "weight", n, kk)?;
    let mut out = vec![0f32; r * kk];
    let dst = SharedOut(out.as_mut_ptr());
    let tiles = tiles(&off, kk, |_| COL_BLOCK);
    let run = |scratch: &mut Vec<f32>, t: &crate::matmul::Tile| {
        // rhs = w[g] as [N (inner), K (columns)]: row-major [N, K], or stored [K, N]
        // (half weights: their stored rows c0..c1 widened into the scratch).
        let base = t.e * n * kk;
        let (rhs, cs, rs) = match w {
            Stored::F32T(ws) => (ws[base + t.c0 * n..].as_ptr(), n as isize, 1),
            Stored::Rows(ws) => (ws[base + t.c0..].as_ptr(), 1, kk as isize),
            Stored::HalfT(ws, half) => {
                widen_block(ws, half, base + t.c0 * n, n, (t.c1 - t.c0, n), scratch);
                (scratch.as_ptr(), n as isize, 1)
            }
            Stored::Tiles(ws, layout) => {
                layout.widen_rows(ws, t.e, (t.c0, t.c1 - t.c0), scratch);
                (scratch.as_ptr(), n as isize, 1)
            }
        };
        // SAFETY: tiles are disjoint and inside `out` ([r, kk]); dy rows r0..r1 and the
        // weight block of group e, columns c0..c1, are inside their buffers.
        unsafe {
            gemm_raw(
                (dst.get().add(t.r0 * kk + t.c0), kk as isize),
                (dy[t.r0 * n..].as_ptr(), n as isize),
                (rhs, cs, rs),
                (t.r1 - t.r0, t.c1 - t.c0, n),
                false,
            );
        }
    };
    if threads > 1 && off[off.len() - 1] as usize * n * kk >= SERIAL_WORK && tiles.len() > 1 {
        share(&tiles, Vec::new, run);
    } else {
        let mut scratch = Vec::new();
        tiles.iter().for_each(|t| run(&mut scratch, t));
    }
    tf32(&[r, kk], out)
}

/// Output rows of dw per task: each task is one gemm over all of a group's rows, so the
/// sum over rows has one order whatever the thread count.
const DW_ROWS: usize = 64;

/// `dw[g] = dyᵀ · x` over the rows of group g, and `db[g] = Σ dy` in row order.
pub(crate) fn weight_grad(op: &WeightGradOp<'_, CpuBackend>, threads: usize) -> Result<WeightGrad<CpuBackend>> {
    let (r, n, kk, g) = (op.rows, op.n, op.k, op.groups);
    let off = groups_of(op.offsets, g, r)?;
    let dy = f32s(op.dy, "output gradient")?;
    let x = f32s(op.x, "forward input")?;
    let mut dw = vec![0f32; g * n * kk];
    let dst = SharedOut(dw.as_mut_ptr());
    let tasks: Vec<(usize, usize, usize)> =
        (0..g).flat_map(|e| (0..n).step_by(DW_ROWS).map(move |n0| (e, n0, (n0 + DW_ROWS).min(n)))).collect();
    let run = |&(e, n0, n1): &(usize, usize, usize)| {
        let (r0, r1) = (off[e] as usize, off[e + 1] as usize);
        // SAFETY: each task writes rows n0..n1 of group e's matrix, disjoint from every
        // other task; lhs = dyᵀ (rows n0..n1, columns r0..r1: column stride n) and rhs =
        // x rows r0..r1 are inside their buffers. An empty group writes zeros (k = 0).
        unsafe {
            let d = dst.get().add(e * n * kk + n0 * kk);
            if r1 == r0 {
                return;
            }
            gemm::gemm(
                n1 - n0,
                kk,
                r1 - r0,
                d,
                1,
                kk as isize,
                false,
                dy[r0 * n + n0..].as_ptr(),
                n as isize,
                1,
                x[r0 * kk..].as_ptr(),
                1,
                kk as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    if threads > 1 && r * n * kk >= SERIAL_WORK && tasks.len() > 1 {
        share(&tasks, || (), |_, t| run(t));
    } else {
        tasks.iter().for_each(run);
    }
    let db = op.bias.then(|| {
        let mut db = vec![0f32; g * n];
        for e in 0..g {
            let acc = &mut db[e * n..(e + 1) * n];
            for row in off[e] as usize..off[e + 1] as usize {
                acc.iter_mut().zip(&dy[row * n..(row + 1) * n]).for_each(|(a, &d)| *a += d);
            }
        }
        db
    });
    Ok(WeightGrad { dw: tf32(&op.w_shape, dw)?, db: db.map(|v| tf32(&op.b_shape, v)).transpose()? })
}

/// `act'(x)`, in f32 as PyTorch's activation backward computes it.
#[inline]
pub(crate) fn act_deriv(x: f32, a: Activation) -> f32 {
    match a {
        Activation::Gelu => {
            // torch GeluBackward: cdf + x · pdf.
            let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x * x).exp() * (std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2 * 0.5);
            cdf + x * pdf
        }
        Activation::GeluTanh => {
            const BETA: f32 = std::f32::consts::SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5;
            const KAPPA: f32 = 0.044_715;
            let x_sq = x * x;
            let inner = BETA * (x + KAPPA * x_sq * x);
            let t = inner.tanh();
            let left = 0.5 * x;
            let right = 1.0 + t;
            0.5 * right + left * (1.0 - t * t) * (BETA * (1.0 + 3.0 * KAPPA * x_sq))
        }
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            s * (1.0 + x * (1.0 - s))
        }
        Activation::Identity => 1.0,
    }
}

/// The gradient through an activation or GLU.
pub(crate) fn act_grad(op: &ActGradOp<'_, CpuBackend>) -> Result<T> {
    let dy = f32s(op.dy, "activation output gradient")?;
    let pre = f32s(op.pre, "pre-activation")?;
    let [r, n] = op.out_shape;
    let mut out = vec![0f32; r * n];
    match op.kind {
        ActGradKind::Activation(a) => {
            out.par_iter_mut().zip(dy).zip(pre).for_each(|((o, &d), &x)| *o = d * act_deriv(x, a));
        }
        ActGradKind::Glu(a) => {
            let i = n / 2;
            out.par_chunks_mut(n.max(1)).enumerate().for_each(|(row, o)| {
                let (g, u) = pre[row * n..(row + 1) * n].split_at(i);
                let d = &dy[row * i..(row + 1) * i];
                for c in 0..i {
                    o[c] = d[c] * u[c] * act_deriv(g[c], a);
                    o[i + c] = d[c] * crate::elementwise::act(g[c], a);
                }
            });
        }
        ActGradKind::GluClamped(a, cl) => {
            use crate::elementwise::{act_scaled, clamp_gate, clamp_up};
            let i = n / 2;
            out.par_chunks_mut(n.max(1)).enumerate().for_each(|(row, o)| {
                let (g, u) = pre[row * n..(row + 1) * n].split_at(i);
                let d = &dy[row * i..(row + 1) * i];
                for c in 0..i {
                    let (gc, uc) = (clamp_gate(g[c], cl.limit), clamp_up(u[c], cl.limit));
                    // torch's clamp passes the gradient only strictly inside its bounds.
                    let gate_in = g[c] < cl.limit;
                    let up_in = u[c] > -cl.limit && u[c] < cl.limit;
                    o[c] = if gate_in { d[c] * (uc + cl.up_offset) * act_scaled_deriv(gc, a, cl.alpha) } else { 0.0 };
                    o[i + c] = if up_in { d[c] * act_scaled(gc, a, cl.alpha) } else { 0.0 };
                }
            });
        }
    }
    tf32(&[r, n], out)
}

/// act_α'(x) for the clamped GLU: silu with its sigmoid scaled by α, `s · (1 + α·x · (1 −
/// s))` with `s = σ(α·x)` (α = 1 is [`act_deriv`]'s silu exactly); others as [`act_deriv`].
#[inline]
pub(crate) fn act_scaled_deriv(x: f32, a: Activation, alpha: f32) -> f32 {
    match a {
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-alpha * x).exp());
            s * (1.0 + alpha * x * (1.0 - s))
        }
        _ => act_deriv(x, a),
    }
}

/// The column sum of `dy [S, M]`, rows in order (as `weight_grad`'s bias gradient).
pub(crate) fn sum_rows(op: &SumRowsOp<'_, CpuBackend>) -> Result<T> {
    let dy = f32s(op.dy, "row sum input")?;
    let m = op.cols;
    let mut acc = vec![0f32; m];
    for row in 0..op.rows {
        acc.iter_mut().zip(&dy[row * m..(row + 1) * m]).for_each(|(a, &d)| *a += d);
    }
    tf32(&[m], acc)
}

/// The gradient of combine: scattered weighted rows and per-route dot products.
pub(crate) fn combine_grad(op: &CombineGradOp<'_, CpuBackend>) -> Result<CombineGrad<CpuBackend>> {
    let dy = f32s(op.dy, "combined output gradient")?;
    let yp = f32s(op.yp, "expert output")?;
    let rows = i32s(op.rows.tensor(), "route rows")?;
    let w = f32s(op.weights, "combine weights")?;
    let (s, k, m) = (op.rows.tokens(), op.rows.k(), op.yp.shape()[1]);
    let mut d_yp = vec![0f32; op.rows.bound() * m];
    let mut d_w = vec![0f32; s * k];
    for t in op.tokens.clone() {
        let g = &dy[(t - op.tokens.start) * m..(t - op.tokens.start + 1) * m];
        for j in 0..k {
            let Ok(row) = usize::try_from(rows[t * k + j]) else { continue };
            let (wt, out) = (w[t * k + j], &mut d_yp[row * m..(row + 1) * m]);
            out.iter_mut().zip(g).for_each(|(o, &d)| *o = wt * d);
            d_w[t * k + j] = g.iter().zip(&yp[row * m..(row + 1) * m]).map(|(a, b)| a * b).sum();
        }
    }
    Ok(CombineGrad { d_yp: tf32(op.yp.shape(), d_yp)?, d_weights: tf32(&[s, k], d_w)? })
}

/// The router's backward, token by token in f32.
pub(crate) fn route_grad(op: &RouteGradOp<'_, CpuBackend>) -> Result<T> {
    let (s, k, e, spec) = (op.tokens, op.k, op.experts, op.spec);
    let dw = f32s(op.d_weights, "combine weight gradient")?;
    let experts = i32s(&op.routes.experts, "routes.experts")?;
    let rw = f32s(&op.routes.weights, "routes.weights")?;
    let sc = f32s(&op.routes.scores, "routes.scores")?;
    let rows = i32s(&op.plan.rows, "plan.rows")?;
    let logits = f32s(op.logits, "router logits")?;
    let aux = match &op.aux {
        Some(a) => Some((i32s(a.counts, "router loss counts")?, a.scale)),
        None => None,
    };
    let mut out = vec![0f32; s * e];
    out.par_chunks_mut(e).enumerate().for_each_init(
        || (vec![0f32; e], vec![0f32; k], vec![0f32; k]),
        |(dsc, w1, g), (t, dl)| {
            let base = t * k;
            let p = &sc[t * e..(t + 1) * e];
            dsc.fill(0.0);
            let kept = |j: usize| rows[base + j] >= 0;
            // Plan: kept weights, renormalised by max(Σ, eps) (DeepSpeed top-2 / top-k).
            for j in 0..k {
                w1[j] = if kept(j) { rw[base + j] } else { 0.0 };
            }
            if spec.renormalize_kept {
                let d2: f32 = w1.iter().sum();
                let dc = d2.max(f32::EPSILON);
                let dot: f32 = (0..k).map(|i| dw[base + i] * w1[i]).sum();
                let through = if d2 >= f32::EPSILON { dot / (dc * dc) } else { 0.0 };
                for j in 0..k {
                    g[j] = if kept(j) { dw[base + j] / dc - through } else { 0.0 };
                }
            } else {
                for j in 0..k {
                    g[j] = if kept(j) { dw[base + j] } else { 0.0 };
                }
            }
            // Route: scale, then the normalisation over the live routes (weight 0 is a
            // masked route, which takes no gradient).
            for j in 0..k {
                g[j] *= spec.scale;
                w1[j] = if rw[base + j] != 0.0 { p[experts[base + j] as usize] } else { 0.0 };
            }
            // w / d(w): dL/dwⱼ = gⱼ / d − (Σ gᵢ wᵢ) / d² · ∂d/∂wⱼ.
            if spec.normalize != Normalize::None {
                let d = normaliser(spec.normalize, w1);
                let dot: f32 = (0..k).map(|i| g[i] * w1[i]).sum();
                let sum: f32 = w1.iter().sum();
                for (gj, &wj) in g.iter_mut().zip(w1.iter()) {
                    *gj = *gj / d - dot / (d * d) * norm_slope(spec.normalize, wj, sum, d);
                }
            }
            // Sparsemixer's weights are not gathered scores: they go back through their
            // own softmax below.
            let mixer = match spec.choice {
                Choice::SparseMixer { jitter_eps } => Some(jitter_eps),
                _ => None,
            };
            if mixer.is_none() {
                for j in 0..k {
                    if rw[base + j] != 0.0 {
                        dsc[experts[base + j] as usize] += g[j];
                    }
                }
            }
            if let Some((counts, scale)) = aux {
                for i in 0..e {
                    dsc[i] += scale * counts[i] as f32;
                }
            }
            match spec.score {
                ScoreFn::Softmax => {
                    let dot: f32 = (0..e).map(|i| p[i] * dsc[i]).sum();
                    for i in 0..e {
                        dl[i] = p[i] * (dsc[i] - dot);
                    }
                }
                ScoreFn::Sigmoid => {
                    for i in 0..e {
                        dl[i] = dsc[i] * p[i] * (1.0 - p[i]);
                    }
                }
                ScoreFn::SqrtSoftplus => {
                    let l = &logits[t * e..(t + 1) * e];
                    for i in 0..e {
                        dl[i] = dsc[i] * sqrt_softplus_grad(l[i], p[i]);
                    }
                }
            }
            if let Some(jitter_eps) = mixer {
                // Weight j is qⱼ[eⱼ], q the softmax of the logits its mask keeps around
                // m = x[eⱼ] (expert 1 excluded for the second); the masks are constant
                // under a small change, so d x_i += gⱼ · wⱼ · (δᵢ,ₑⱼ − qᵢ) over the kept.
                let l = &logits[t * e..(t + 1) * e];
                for j in 0..k {
                    if rw[base + j] == 0.0 {
                        continue;
                    }
                    let c = experts[base + j] as usize;
                    let skip = (j == 1).then_some(experts[base] as usize);
                    let m = l[c];
                    let sum = mixer_sum(l, m, skip, jitter_eps);
                    let wj = 1.0 / sum;
                    for i in 0..e {
                        if Some(i) != skip && mixer_kept(l[i], m, jitter_eps) {
                            let q = (l[i] - m).exp() / sum;
                            dl[i] += g[j] * wj * (if i == c { 1.0 } else { 0.0 } - q);
                        }
                    }
                }
            }
            if op.z_coef != 0.0 {
                // z = mean_s lse², so d z / d logits = 2 · lse · softmax / S.
                let l = &logits[t * e..(t + 1) * e];
                let mx = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = l.iter().map(|&v| (v - mx).exp()).sum();
                let lse = mx + sum.ln();
                let c = op.z_coef * 2.0 * lse / s as f32;
                for i in 0..e {
                    dl[i] += c * (l[i] - mx).exp() / sum;
                }
            }
        },
    );
    tf32(&[s, e], out)
}

/// ∂d/∂wⱼ of the normaliser d of the live weights (sum `sum`, d itself `d`): 1 for the
/// sums; for the floored sum 1 where the sum is past the floor and 0 where the floor is
/// the divisor, a constant (at sum = floor too: torch's `clamp(min=)` passes no gradient
/// there); for the p-norm `(wⱼ / d)^(p−1)`, 0 for a zero weight (as torch's norm
/// backward masks it).
fn norm_slope(normalize: Normalize, wj: f32, sum: f32, d: f32) -> f32 {
    match normalize {
        Normalize::None => 0.0,
        Normalize::Sum | Normalize::SumPlus(_) => 1.0,
        Normalize::SumFloor(floor) => {
            if sum > floor {
                1.0
            } else {
                0.0
            }
        }
        Normalize::PNorm(p) => {
            if p == 1.0 {
                1.0
            } else if wj == 0.0 {
                0.0
            } else if p == 2.0 {
                wj / d
            } else {
                (wj / d).powf(p - 1.0)
            }
        }
    }
}

/// The gradient of the residual mix.
pub(crate) fn mix_grad(op: &MixGradOp<'_, CpuBackend>) -> Result<MixGrad<CpuBackend>> {
    let dy = f32s(op.dy, "mix output gradient")?;
    let moe = f32s(op.moe, "moe output")?;
    let mlp = f32s(op.mlp, "residual mlp output")?;
    let coef = f32s(op.coef, "coefficient logits")?;
    let m = op.dy.shape()[1];
    let r = op.dy.shape()[0];
    let mut d_moe = vec![0f32; r * m];
    let mut d_mlp = vec![0f32; r * m];
    let mut d_coef = vec![0f32; r * 2];
    for row in 0..r {
        let (l0, l1) = (coef[row * 2], coef[row * 2 + 1]);
        let mx = l0.max(l1);
        let (e0, e1) = ((l0 - mx).exp(), (l1 - mx).exp());
        let (c0, c1) = (e0 / (e0 + e1), e1 / (e0 + e1));
        let span = row * m..(row + 1) * m;
        let (mut a0, mut a1) = (0f32, 0f32);
        for i in span {
            d_moe[i] = dy[i] * c0;
            d_mlp[i] = dy[i] * c1;
            a0 += dy[i] * moe[i];
            a1 += dy[i] * mlp[i];
        }
        let dot = c0 * a0 + c1 * a1;
        d_coef[row * 2] = c0 * (a0 - dot);
        d_coef[row * 2 + 1] = c1 * (a1 - dot);
    }
    Ok(MixGrad { d_moe: tf32(&[r, m], d_moe)?, d_mlp: tf32(&[r, m], d_mlp)?, d_coef: tf32(&[r, 2], d_coef)? })
}

/// The gradient of the gated shared-expert add.
pub(crate) fn gated_add_grad(op: &GatedAddGradOp<'_, CpuBackend>) -> Result<GatedAddGrad<CpuBackend>> {
    let dy = f32s(op.dy, "sum gradient")?;
    let sh = f32s(op.shared, "shared expert output")?;
    let gate = f32s(op.gate, "shared_expert_gate logits")?;
    let (r, m) = (op.dy.shape()[0], op.dy.shape()[1]);
    let mut d_sh = vec![0f32; r * m];
    let mut d_g = vec![0f32; r];
    for row in 0..r {
        let s = 1.0 / (1.0 + (-gate[row]).exp());
        let mut a = 0f32;
        for i in row * m..(row + 1) * m {
            d_sh[i] = dy[i] * s;
            a += dy[i] * sh[i];
        }
        d_g[row] = s * (1.0 - s) * a;
    }
    Ok(GatedAddGrad { d_shared: tf32(&[r, m], d_sh)?, d_gate: tf32(&[r, 1], d_g)? })
}
