// Router reductions for the losses: out [E + 1] = the mean score of each expert over
// tokens, then the mean of logsumexp(logits)² (Switch z-loss). One invocation per output,
// each summing over tokens in token order with Kahan compensation (WGSL has no f64; the
// cpu reference sums in f64).
//
// Bindings: 0 params, 1 logits [S, E], 2 scores [S, E], 3 out [E + 1].

struct StatsParams {
    s: u32,
    e: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: StatsParams;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> scores: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn term(t: u32, i: u32) -> f32 {
    if i < p.e {
        return scores[t * p.e + i];
    }
    let row = t * p.e;
    var mx = logits[row];
    for (var j = 1u; j < p.e; j++) {
        mx = max(mx, logits[row + j]);
    }
    var sum = 0.0;
    for (var j = 0u; j < p.e; j++) {
        sum += exp(logits[row + j] - mx);
    }
    let lse = mx + log(sum);
    return lse * lse;
}

@compute @workgroup_size(64)
fn router_stats(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if i > p.e { return; }
    var sum = 0.0;
    var comp = 0.0;
    for (var t = 0u; t < p.s; t++) {
        let y = term(t, i) - comp;
        let next = sum + y;
        comp = (next - sum) - y;
        sum = next;
    }
    out[i] = sum / f32(max(p.s, 1u));
}
