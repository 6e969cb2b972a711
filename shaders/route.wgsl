// Routing, one invocation per token: scores (softmax, sigmoid or sqrt-softplus of the f32
// logits), the choice (top-k, DeepSpeed top-2, group-limited top-k, PhiMoE's sparsemixer),
// and the route weights (normalised by Σ, Σ + eps, max(Σ, floor), the p-norm, or not,
// then scaled). Ties go to the lower expert index everywhere: a candidate replaces the
// best only when strictly greater.
//
// Bindings: 0 params, 1 logits [S, E], 2 bias [E], 3 choice noise [S, E], 4 scores
// [S, E], 5 experts [S, k] i32, 6 weights [S, k], 7 status (atomic u32, zeroed: u32 max −
// the flat index of the first non-finite logit, bias value and noise value; see
// moe_engine::ops::route_check).

struct RouteParams {
    s: u32,
    e: u32,
    k: u32,
    score_fn: u32,     // 0 softmax, 1 sigmoid, 2 sqrt(softplus)
    choice: u32,       // 0 top-k, 1 DeepSpeed top-2, 2 group-limited, 3 sparsemixer
    has_bias: u32,
    has_noise: u32,
    normalize: u32,    // 0 none, 1 sum, 2 sum + eps, 3 max(sum, eps), 4 p-norm
    eps: f32,
    scale: f32,
    n_group: u32,
    topk_group: u32,
    group_score: u32,  // 0 max (masked groups read 0), 1 sum of top 2 (masked read -inf)
    p_norm: f32,
    jitter_eps: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: RouteParams;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read> noise: array<f32>;
@group(0) @binding(4) var<storage, read_write> scores: array<f32>;
@group(0) @binding(5) var<storage, read_write> experts: array<i32>;
@group(0) @binding(6) var<storage, read_write> weights: array<f32>;
@group(0) @binding(7) var<storage, read_write> status: array<atomic<u32>>;

const WG: u32 = 64u;
// Up to 1024 experts (bit sets of 32 words) and 64 groups.
const MAX_WORDS: u32 = 32u;
// -inf, built at run time: WGSL constant expressions may not be infinite.
fn neg_inf() -> f32 {
    var bits = 0xff800000u;
    return bitcast<f32>(bits);
}

fn is_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

fn has(bits: ptr<function, array<u32, 32>>, i: u32) -> bool {
    return ((*bits)[i / 32u] & (1u << (i % 32u))) != 0u;
}

fn put(bits: ptr<function, array<u32, 32>>, i: u32) {
    (*bits)[i / 32u] |= 1u << (i % 32u);
}

// ln(1 + y) for y in [0, 1], as 2·atanh(y / (2 + y)) by its series: z ≤ 1/3, so eight
// terms leave a relative error near 1e-9, and no log (whose error near 1 the APIs bound
// only absolutely) is taken.
fn log1p_unit(y: f32) -> f32 {
    let z = y / (2.0 + y);
    let t = z * z;
    let series = 1.0 + t * (1.0 / 3.0 + t * (1.0 / 5.0 + t * (1.0 / 7.0 + t * (1.0 / 9.0
        + t * (1.0 / 11.0 + t * (1.0 / 13.0 + t * (1.0 / 15.0)))))));
    return 2.0 * z * series;
}

// sqrt(softplus(x)) as torch's F.softplus(x).sqrt() (threshold 20: softplus(x) = x past
// it); softplus(x) = max(x, 0) + ln(1 + e^-|x|). Below -20 it is e^x to f32 precision, so
// the score is e^(x/2), a normal number where e^x would be subnormal (see the cpu's
// sqrt_softplus).
fn sqrt_softplus(x: f32) -> f32 {
    if x > 20.0 { return sqrt(x); }
    if x < -20.0 { return exp(0.5 * x); }
    return sqrt(max(x, 0.0) + log1p_unit(exp(-abs(x))));
}

// Sparsemixer's weight for the expert whose logit is m: the softmax of the logits its mask
// keeps, `skip` excluded, at its max, 1 / Σ exp(x - m).
fn mixer_weight(row: u32, m: f32, skip: u32) -> f32 {
    var sum = 0.0;
    for (var i = 0u; i < p.e; i++) {
        let x = logits[row + i];
        if i != skip && mixer_kept(x, m, p.jitter_eps) { sum += exp(x - m); }
    }
    return 1.0 / sum;
}

// The quantity top-k chooses on: scores + bias, or logits + noise when noise is given.
fn key(t: u32, i: u32) -> f32 {
    let at = t * p.e + i;
    if p.choice == 0u && p.has_noise == 1u {
        return logits[at] + noise[at];
    }
    var v = scores[at];
    if p.has_bias == 1u {
        v += bias[i];
    }
    return v;
}

@compute @workgroup_size(64)
fn route(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * WG;
    if t >= p.s { return; }
    let row = t * p.e;
    let NEG_INF = neg_inf();

    // Scores, after checking the logits (and the bias and noise the choice reads).
    var mx = NEG_INF;
    for (var i = 0u; i < p.e; i++) {
        let v = logits[row + i];
        if !is_finite(v) {
            atomicMax(&status[0], 0xffffffffu - (row + i));
        }
        if p.has_bias == 1u && !is_finite(bias[i]) {
            atomicMax(&status[1], 0xffffffffu - i);
        }
        if p.has_noise == 1u && !is_finite(noise[row + i]) {
            atomicMax(&status[2], 0xffffffffu - (row + i));
        }
        mx = max(mx, v);
    }
    if p.score_fn == 0u {
        var sum = 0.0;
        for (var i = 0u; i < p.e; i++) {
            let v = exp(logits[row + i] - mx);
            scores[row + i] = v;
            sum += v;
        }
        for (var i = 0u; i < p.e; i++) {
            scores[row + i] = scores[row + i] / sum;
        }
    } else if p.score_fn == 1u {
        for (var i = 0u; i < p.e; i++) {
            scores[row + i] = 1.0 / (1.0 + exp(-logits[row + i]));
        }
    } else {
        for (var i = 0u; i < p.e; i++) {
            scores[row + i] = sqrt_softplus(logits[row + i]);
        }
    }

    // Experts outside the kept groups (group-limited routing only).
    var masked: array<u32, 32>;
    var chosen: array<u32, 32>;
    for (var w = 0u; w < MAX_WORDS; w++) {
        masked[w] = 0u;
        chosen[w] = 0u;
    }
    var fill = 0.0;
    if p.choice == 2u {
        let per = p.e / p.n_group;
        var gs: array<f32, 64>;
        for (var g = 0u; g < p.n_group; g++) {
            let base = g * per;
            if p.group_score == 0u {
                var m = NEG_INF;
                for (var i = 0u; i < per; i++) {
                    m = max(m, key(t, base + i));
                }
                gs[g] = m;
            } else {
                var a = 0u;
                for (var i = 1u; i < per; i++) {
                    if key(t, base + i) > key(t, base + a) { a = i; }
                }
                var b = select(0u, 1u, a == 0u);
                for (var i = 0u; i < per; i++) {
                    if i != a && key(t, base + i) > key(t, base + b) { b = i; }
                }
                gs[g] = key(t, base + a) + key(t, base + b);
            }
        }
        var kept_groups = array<u32, 2>(0u, 0u);
        for (var j = 0u; j < p.topk_group; j++) {
            var best = 0xffffffffu;
            var bv = NEG_INF;
            for (var g = 0u; g < p.n_group; g++) {
                if (kept_groups[g / 32u] & (1u << (g % 32u))) != 0u { continue; }
                if best == 0xffffffffu || gs[g] > bv {
                    best = g;
                    bv = gs[g];
                }
            }
            kept_groups[best / 32u] |= 1u << (best % 32u);
        }
        for (var i = 0u; i < p.e; i++) {
            let g = i / per;
            if (kept_groups[g / 32u] & (1u << (g % 32u))) == 0u {
                put(&masked, i);
            }
        }
        fill = select(NEG_INF, 0.0, p.group_score == 0u);
    }

    // The choice.
    let out = t * p.k;
    if p.choice == 1u {
        // DeepSpeed top-2: first = argmax(scores); second = argmax(logits [+ noise]) over
        // the others.
        var first = 0u;
        for (var i = 1u; i < p.e; i++) {
            if scores[row + i] > scores[row + first] { first = i; }
        }
        var second = 0xffffffffu;
        var sv = NEG_INF;
        for (var i = 0u; i < p.e; i++) {
            if i == first { continue; }
            var v = logits[row + i];
            if p.has_noise == 1u { v += noise[row + i]; }
            if second == 0xffffffffu || v > sv {
                second = i;
                sv = v;
            }
        }
        experts[out] = i32(first);
        if p.k > 1u { experts[out + 1u] = i32(second); }
        put(&chosen, first);
    } else if p.choice == 3u {
        // Sparsemixer (k = 2): the argmax of the logits, then the argmax of the others.
        var first = 0u;
        for (var i = 1u; i < p.e; i++) {
            if logits[row + i] > logits[row + first] { first = i; }
        }
        var second = select(0u, 1u, first == 0u);
        for (var i = 0u; i < p.e; i++) {
            if i != first && logits[row + i] > logits[row + second] { second = i; }
        }
        experts[out] = i32(first);
        experts[out + 1u] = i32(second);
    } else {
        for (var j = 0u; j < p.k; j++) {
            var best = 0xffffffffu;
            var bv = NEG_INF;
            for (var i = 0u; i < p.e; i++) {
                if has(&chosen, i) { continue; }
                var v = key(t, i);
                if has(&masked, i) { v = fill; }
                if best == 0xffffffffu || v > bv {
                    best = i;
                    bv = v;
                }
            }
            put(&chosen, best);
            experts[out + j] = i32(best);
        }
    }

    // Weights: the chosen scores (0 on a masked expert; sparsemixer's masked softmaxes),
    // normalised, scaled.
    var sum = 0.0;
    var sum_p = 0.0;
    for (var j = 0u; j < p.k; j++) {
        let c = u32(experts[out + j]);
        var v = scores[row + c];
        if has(&masked, c) { v = 0.0; }
        if p.choice == 3u {
            let skip = select(0xffffffffu, u32(experts[out]), j == 1u);
            v = mixer_weight(row, logits[row + c], skip);
        }
        weights[out + j] = v;
        sum += v;
        if p.normalize == 4u { sum_p += pow_p(v, p.p_norm); }
    }
    var denom = 1.0;
    if p.normalize == 1u { denom = sum; }
    if p.normalize == 2u { denom = sum + p.eps; }
    if p.normalize == 3u { denom = max(sum, p.eps); }
    if p.normalize == 4u { denom = root_p(sum_p, p.p_norm); }
    for (var j = 0u; j < p.k; j++) {
        var v = weights[out + j];
        if p.normalize != 0u { v = v / denom; }
        weights[out + j] = v * p.scale;
    }
}
