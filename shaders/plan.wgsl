// The dispatch plan: counts, capacity, slots, compact expert-major rows and combine
// weights, with no [S, E, C] tensor and no atomics (every value has one writer, so the
// plan is deterministic). Seven passes, each a separate dispatch, in the order and with
// the invocation counts of `moe_engine::kernel_abi::plan::PlanSchedule`:
//
//   plan_count     one invocation per (token group g, expert x): candidates, first choices
//   plan_capacity  one invocation: totals over groups, the largest count, capacity C, masked
//   plan_rank      one invocation per route (priority policies only): keep = rank < C
//   plan_slots     one invocation per (g, x): walk the candidates in slot order, number the kept
//   plan_offsets   one invocation: kept totals, exclusive prefix sum, per-group row bases
//   plan_finish    one invocation per token: rows, weights (renormalised over kept routes),
//                  dropped routes and whether the token lost every route
//   plan_stats     one invocation: sums of the per-token drop counts
//
// Bindings: 0 params, 1 experts [S, k] i32, 2 route weights [S, k], 3 used_token [S],
// 4 priority [S, E], 5 scratch i32, 6 info i32, 7 slots and rows i32 [2, S, k],
// 8 plan weights [S, k].
//
// scratch: cnt [G·E] | first [G·E] | kept [G·E] | base [G·E] | keep [S·k] | drop [S] | dead [S]
// info:    counts [E] | first_counts [E] | kept_counts [E] | offsets [E + 1] |
//          stats [4] (capacity, dropped routes, masked routes, dropped tokens) | C

struct PlanParams {
    s: u32,
    k: u32,
    e: u32,
    group: u32,      // tokens per group
    n_groups: u32,
    cap_rule: u32,   // 0 unlimited, 1 static (cap_value), 2 dropless
    cap_value: u32,
    clamp: u32,      // dropless: clamp C to S
    keep: u32,       // 0 token order, 1 rank-major, 2 priority
    has_used: u32,
    renorm: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: PlanParams;
@group(0) @binding(1) var<storage, read> experts: array<i32>;
@group(0) @binding(2) var<storage, read> rweights: array<f32>;
@group(0) @binding(3) var<storage, read> used: array<f32>;
@group(0) @binding(4) var<storage, read> priority: array<f32>;
@group(0) @binding(5) var<storage, read_write> scratch: array<i32>;
@group(0) @binding(6) var<storage, read_write> info: array<i32>;
@group(0) @binding(7) var<storage, read_write> sr: array<i32>;
@group(0) @binding(8) var<storage, read_write> pw: array<f32>;

const WG: u32 = 64u;
const UNLIMITED: i32 = 0x7fffffff;

fn gid1(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

// A priority as the plan compares it: NaN ranks lowest, as −inf (the cpu's rule too).
fn priority_key(v: f32) -> f32 {
    let bits = bitcast<u32>(v);
    if (bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0u {
        return bitcast<f32>(0xff800000u);
    }
    return v;
}

fn valid(t: u32) -> bool {
    return p.has_used == 0u || used[t] != 0.0;
}

fn ge() -> u32 { return p.n_groups * p.e; }
fn cnt_at(i: u32) -> u32 { return i; }
fn first_at(i: u32) -> u32 { return ge() + i; }
fn kept_at(i: u32) -> u32 { return 2u * ge() + i; }
fn base_at(i: u32) -> u32 { return 3u * ge() + i; }
fn keep_at(r: u32) -> u32 { return 4u * ge() + r; }
fn drop_at(t: u32) -> u32 { return 4u * ge() + p.s * p.k + t; }
fn dead_at(t: u32) -> u32 { return 4u * ge() + p.s * p.k + p.s + t; }
fn stats_at() -> u32 { return 4u * p.e + 1u; }
fn cap_at() -> u32 { return 4u * p.e + 5u; }

@compute @workgroup_size(64)
fn plan_count(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid1(gid, nwg);
    if i >= ge() { return; }
    let g = i / p.e;
    let x = i32(i % p.e);
    var c = 0;
    var f = 0;
    for (var t = g * p.group; t < (g + 1u) * p.group; t++) {
        if !valid(t) { continue; }
        for (var j = 0u; j < p.k; j++) {
            if experts[t * p.k + j] == x {
                c++;
                if j == 0u { f++; }
            }
        }
    }
    scratch[cnt_at(i)] = c;
    scratch[first_at(i)] = f;
}

@compute @workgroup_size(1)
fn plan_capacity() {
    var max_count = 0;
    for (var x = 0u; x < p.e; x++) {
        var c = 0;
        var f = 0;
        for (var g = 0u; g < p.n_groups; g++) {
            c += scratch[cnt_at(g * p.e + x)];
            f += scratch[first_at(g * p.e + x)];
        }
        info[x] = c;
        info[p.e + x] = f;
        max_count = max(max_count, c);
    }
    var cap = UNLIMITED;
    var report = max_count;
    if p.cap_rule == 1u {
        cap = i32(p.cap_value);
        report = cap;
    } else if p.cap_rule == 2u {
        cap = max_count;
        if p.clamp == 1u { cap = min(cap, i32(p.s)); }
        report = cap;
    }
    var masked = 0;
    for (var t = 0u; t < p.s; t++) {
        if !valid(t) { masked += i32(p.k); }
    }
    info[stats_at()] = report;
    info[stats_at() + 2u] = masked;
    info[cap_at()] = cap;
}

@compute @workgroup_size(64)
fn plan_rank(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid1(gid, nwg);
    if r >= p.s * p.k { return; }
    let t = r / p.k;
    if !valid(t) { return; }
    let x = experts[r];
    let pr = priority_key(priority[t * p.e + u32(x)]);
    let g = t / p.group;
    // Routes of the same expert and group ahead of this one: higher priority, or equal
    // priority and earlier.
    var ahead = 0;
    for (var t2 = g * p.group; t2 < (g + 1u) * p.group; t2++) {
        if !valid(t2) { continue; }
        let p2 = priority_key(priority[t2 * p.e + u32(x)]);
        for (var j = 0u; j < p.k; j++) {
            let r2 = t2 * p.k + j;
            if experts[r2] == x && (p2 > pr || (p2 == pr && r2 < r)) {
                ahead++;
            }
        }
    }
    scratch[keep_at(r)] = select(0, 1, ahead < info[cap_at()]);
}

@compute @workgroup_size(64)
fn plan_slots(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid1(gid, nwg);
    if i >= ge() { return; }
    let g = i / p.e;
    let x = i32(i % p.e);
    let cap = info[cap_at()];
    let t0 = g * p.group;
    let n = p.group * p.k;
    var seen = 0;
    var kept = 0;
    // Candidates in slot order: token-major (t, j), or rank-major (j, t) for DeepSpeed
    // top-2, where every first choice of an expert comes before any second choice.
    for (var q = 0u; q < n; q++) {
        var t = t0 + q / p.k;
        var j = q % p.k;
        if p.keep == 1u {
            t = t0 + q % p.group;
            j = q / p.group;
        }
        let r = t * p.k + j;
        if !valid(t) || experts[r] != x { continue; }
        var keep = seen < cap;
        if p.keep == 2u { keep = scratch[keep_at(r)] == 1; }
        seen++;
        if keep {
            sr[r] = kept;
            kept++;
        } else {
            sr[r] = -1;
        }
    }
    scratch[kept_at(i)] = kept;
}

@compute @workgroup_size(1)
fn plan_offsets() {
    var off = 0;
    for (var x = 0u; x < p.e; x++) {
        info[3u * p.e + x] = off;
        var kept = 0;
        for (var g = 0u; g < p.n_groups; g++) {
            scratch[base_at(g * p.e + x)] = off + kept;
            kept += scratch[kept_at(g * p.e + x)];
        }
        info[2u * p.e + x] = kept;
        off += kept;
    }
    info[4u * p.e] = off;
}

@compute @workgroup_size(64)
fn plan_finish(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid1(gid, nwg);
    if t >= p.s { return; }
    let g = t / p.group;
    let ok = valid(t);
    let sk = p.s * p.k;
    var drop = 0;
    var any = false;
    var sum = 0.0;
    for (var j = 0u; j < p.k; j++) {
        let r = t * p.k + j;
        var slot = -1;
        if ok { slot = sr[r]; }
        var row = -1;
        var w = 0.0;
        if slot >= 0 {
            row = scratch[base_at(g * p.e + u32(experts[r]))] + slot;
            w = rweights[r];
            any = true;
        } else if ok {
            drop++;
        }
        sr[r] = slot;
        sr[sk + r] = row;
        pw[r] = w;
        sum += w;
    }
    if p.renorm == 1u {
        // DeepSpeed: divide by the kept sum clamped at f32 eps, so a lone survivor gets 1
        // and a token that lost every route keeps 0.
        let denom = max(sum, 1.1920929e-7);
        for (var j = 0u; j < p.k; j++) {
            pw[t * p.k + j] = pw[t * p.k + j] / denom;
        }
    }
    scratch[drop_at(t)] = drop;
    scratch[dead_at(t)] = select(0, 1, ok && !any);
}

@compute @workgroup_size(1)
fn plan_stats() {
    var dropped = 0;
    var dead = 0;
    for (var t = 0u; t < p.s; t++) {
        dropped += scratch[drop_at(t)];
        dead += scratch[dead_at(t)];
    }
    info[stats_at() + 1u] = dropped;
    info[stats_at() + 3u] = dead;
}
