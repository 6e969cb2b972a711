// The router's backward in f32, one invocation per token: from the gradient of the
// plan's combine weights to the gradient of the logits. Kept routes (plan row >= 0) go
// back through DeepSpeed's renormalisation by max(Σ kept, f32 eps), the route scale, the
// route normalisation by d (none, Σ, Σ + eps, max(Σ, floor), the p-norm) over the live
// routes (nonzero route weight; a masked route takes no gradient): g / d − (Σ g·w) / d² ·
// ∂d/∂w, the top-k gather, a router loss (aux_scale · counts[e] on every score), and the
// softmax, sigmoid or sqrt-softplus; sparsemixer's weights (choice 3) go back through
// their own masked softmax of the logits instead of the gather; the Switch z-loss adds
// 2 · z_coef · lse / S · softmax. The output row doubles as the score gradient's scratch.
// backends/cpu/src/grad.rs `route_grad` is the reference.
// Bindings: 0 params, 1 d_weights [S, k], 2 experts [S, k] i32, 3 route weights [S, k],
// 4 scores [S, E], 5 plan rows [S, k] i32, 6 logits [S, E], 7 counts [E] i32, 8 out.

struct RouteGradParams {
    s: u32,
    e: u32,
    k: u32,
    score_fn: u32,    // 0 softmax, 1 sigmoid, 2 sqrt(softplus)
    normalize: u32,   // 0 none, 1 sum, 2 sum + eps, 3 max(sum, eps), 4 p-norm
    renorm_kept: u32,
    has_aux: u32,
    choice: u32,      // the forward's; 3 sparsemixer
    eps: f32,
    scale: f32,
    aux_scale: f32,
    z_coef: f32,
    p_norm: f32,
    jitter_eps: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: RouteGradParams;
@group(0) @binding(1) var<storage, read> dw: array<f32>;
@group(0) @binding(2) var<storage, read> experts: array<i32>;
@group(0) @binding(3) var<storage, read> rw: array<f32>;
@group(0) @binding(4) var<storage, read> scores: array<f32>;
@group(0) @binding(5) var<storage, read> rows: array<i32>;
@group(0) @binding(6) var<storage, read> logits: array<f32>;
@group(0) @binding(7) var<storage, read> counts: array<i32>;
@group(0) @binding(8) var<storage, read_write> out: array<f32>;

const WG: u32 = 64u;
const F32_EPS: f32 = 1.1920929e-7;

// The gradient of route j's weight before the plan: through the kept renormalisation.
fn g_plan(t: u32, j: u32, dc: f32, through: f32) -> f32 {
    let r = t * p.k + j;
    if rows[r] < 0 { return 0.0; }
    let g = select(dw[r], dw[r] / dc - through, p.renorm_kept == 1u);
    return g * p.scale;
}

// The raw (pre-normalisation) weight of route j: its score, or 0 when masked.
fn w_raw(t: u32, j: u32) -> f32 {
    let r = t * p.k + j;
    return select(0.0, scores[t * p.e + u32(experts[r])], rw[r] != 0.0);
}

// ∂d/∂w of the normaliser d for a live weight w (sum of the live weights `sum`): 1 for the
// sums; for the floored sum 1 where the sum is past the floor and 0 where the floor
// divides (at sum = floor too: torch's clamp(min=) passes no gradient there); for the
// p-norm (w / d)^(p-1), 0 for a zero weight as torch's norm backward.
fn norm_slope(w: f32, sum: f32, d: f32) -> f32 {
    if p.normalize == 3u { return select(0.0, 1.0, sum > p.eps); }
    if p.normalize == 4u {
        if p.p_norm == 1.0 { return 1.0; }
        if w == 0.0 { return 0.0; }
        if p.p_norm == 2.0 { return w / d; }
        return pow(w / d, p.p_norm - 1.0);
    }
    return 1.0;
}

// d sqrt(softplus(x)) / dx from x and its score s: sigmoid(x) / 2s, 1 / 2s past torch's
// threshold 20, s / 2 below -20 (where sigmoid = softplus = s² to f32 precision).
fn sqrt_softplus_grad(x: f32, s: f32) -> f32 {
    if x > 20.0 { return 0.5 / s; }
    if x < -20.0 { return 0.5 * s; }
    return 1.0 / (1.0 + exp(-x)) / (2.0 * s);
}

@compute @workgroup_size(64)
fn route_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * WG;
    if t >= p.s { return; }
    let base = t * p.k;
    let row0 = t * p.e;
    // The plan's renormalisation over kept routes.
    var d2 = 0.0;
    var dotw = 0.0;
    for (var j = 0u; j < p.k; j++) {
        if rows[base + j] >= 0 {
            d2 += rw[base + j];
            dotw += dw[base + j] * rw[base + j];
        }
    }
    let dc = max(d2, F32_EPS);
    let through = select(0.0, dotw / (dc * dc), d2 >= F32_EPS);
    // The route normalisation over live routes.
    var denom = 1.0;
    var dot2 = 0.0;
    var sum = 0.0;
    if p.normalize != 0u {
        var sum_p = 0.0;
        for (var j = 0u; j < p.k; j++) {
            sum += w_raw(t, j);
            sum_p += pow_p(w_raw(t, j), p.p_norm);
            dot2 += g_plan(t, j, dc, through) * w_raw(t, j);
        }
        denom = sum;
        if p.normalize == 2u { denom = sum + p.eps; }
        if p.normalize == 3u { denom = max(sum, p.eps); }
        if p.normalize == 4u { denom = root_p(sum_p, p.p_norm); }
    }
    // Score gradient: the router loss first, then the routes (sparsemixer's weights are
    // not gathered scores: they go back through their own softmax below).
    for (var i = 0u; i < p.e; i++) {
        out[row0 + i] = select(0.0, p.aux_scale * f32(counts[i]), p.has_aux == 1u);
    }
    for (var j = 0u; j < p.k; j++) {
        if rw[base + j] == 0.0 || p.choice == 3u { continue; }
        var g = g_plan(t, j, dc, through);
        if p.normalize != 0u {
            g = g / denom - dot2 / (denom * denom) * norm_slope(w_raw(t, j), sum, denom);
        }
        let e = u32(experts[base + j]);
        out[row0 + e] += g;
    }
    // Through the score function.
    if p.score_fn == 0u {
        var dot = 0.0;
        for (var i = 0u; i < p.e; i++) {
            dot += scores[row0 + i] * out[row0 + i];
        }
        for (var i = 0u; i < p.e; i++) {
            out[row0 + i] = scores[row0 + i] * (out[row0 + i] - dot);
        }
    } else if p.score_fn == 1u {
        for (var i = 0u; i < p.e; i++) {
            let s = scores[row0 + i];
            out[row0 + i] = out[row0 + i] * s * (1.0 - s);
        }
    } else {
        for (var i = 0u; i < p.e; i++) {
            out[row0 + i] = out[row0 + i] * sqrt_softplus_grad(logits[row0 + i], scores[row0 + i]);
        }
    }
    // Sparsemixer: weight j is q[e_j], q the softmax of the logits its mask keeps around
    // m = x[e_j] (expert 1 excluded for the second); the masks are constant under a small
    // change, so d x_i += g_j · w_j · (δ(i, e_j) − q_i) over the kept (normalisation is
    // none: the route op refuses any other).
    if p.choice == 3u {
        for (var j = 0u; j < p.k; j++) {
            if rw[base + j] == 0.0 { continue; }
            let g = g_plan(t, j, dc, through);
            let c = u32(experts[base + j]);
            let skip = select(0xffffffffu, u32(experts[base]), j == 1u);
            let m = logits[row0 + c];
            var msum = 0.0;
            for (var i = 0u; i < p.e; i++) {
                let x = logits[row0 + i];
                if i != skip && mixer_kept(x, m, p.jitter_eps) { msum += exp(x - m); }
            }
            let wj = 1.0 / msum;
            for (var i = 0u; i < p.e; i++) {
                let x = logits[row0 + i];
                if i != skip && mixer_kept(x, m, p.jitter_eps) {
                    let q = exp(x - m) / msum;
                    out[row0 + i] += g * wj * (select(0.0, 1.0, i == c) - q);
                }
            }
        }
    }
    if p.z_coef != 0.0 {
        var mx = logits[row0];
        for (var i = 1u; i < p.e; i++) { mx = max(mx, logits[row0 + i]); }
        var sum = 0.0;
        for (var i = 0u; i < p.e; i++) { sum += exp(logits[row0 + i] - mx); }
        let lse = mx + log(sum);
        let c = p.z_coef * 2.0 * lse / f32(p.s);
        for (var i = 0u; i < p.e; i++) {
            out[row0 + i] += c * exp(logits[row0 + i] - mx) / sum;
        }
    }
}
