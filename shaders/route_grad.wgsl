// The router's backward in f32, one invocation per token: from the gradient of the
// plan's combine weights to the gradient of the logits. Kept routes (plan row >= 0) go
// back through DeepSpeed's renormalisation by max(Σ kept, f32 eps), the route scale, the
// route normalisation (none, Σ, Σ + eps) over the live routes (nonzero route weight; a
// masked route takes no gradient), the top-k gather, a router loss (aux_scale ·
// counts[e] on every score), and the softmax or sigmoid; the Switch z-loss adds
// 2 · z_coef · lse / S · softmax. The output row doubles as the score gradient's scratch.
// Bindings: 0 params, 1 d_weights [S, k], 2 experts [S, k] i32, 3 route weights [S, k],
// 4 scores [S, E], 5 plan rows [S, k] i32, 6 logits [S, E], 7 counts [E] i32, 8 out.

struct RouteGradParams {
    s: u32,
    e: u32,
    k: u32,
    score_fn: u32,    // 0 softmax, 1 sigmoid
    normalize: u32,   // 0 none, 1 sum, 2 sum + eps
    renorm_kept: u32,
    has_aux: u32,
    _pad0: u32,
    eps: f32,
    scale: f32,
    aux_scale: f32,
    z_coef: f32,
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
    if p.normalize != 0u {
        var sum = 0.0;
        for (var j = 0u; j < p.k; j++) {
            sum += w_raw(t, j);
            dot2 += g_plan(t, j, dc, through) * w_raw(t, j);
        }
        denom = select(sum, sum + p.eps, p.normalize == 2u);
    }
    // Score gradient: the router loss first, then the routes.
    for (var i = 0u; i < p.e; i++) {
        out[row0 + i] = select(0.0, p.aux_scale * f32(counts[i]), p.has_aux == 1u);
    }
    for (var j = 0u; j < p.k; j++) {
        if rw[base + j] == 0.0 { continue; }
        var g = g_plan(t, j, dc, through);
        if p.normalize != 0u {
            g = g / denom - dot2 / (denom * denom);
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
    } else {
        for (var i = 0u; i < p.e; i++) {
            let s = scores[row0 + i];
            out[row0 + i] = out[row0 + i] * s * (1.0 - s);
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
