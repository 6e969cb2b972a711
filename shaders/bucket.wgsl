// Expert parallelism's bucketing by destination (the passes of kernel_abi::bucket, in
// order): the physical slot and send row of every kept route of this rank's tokens, and
// the routes per slot. Bindings: 0 params, 1 plan.rows [S·k], 2 plan.offsets [E + 1],
// 3 replica offsets [E + 1], 4 replica slots [P], 5 scratch (inverse [S·k] | position
// [S·k] | slot [S·k] | base [P + 1]), 6 counts [P + 2] (routes per slot, then S and the
// placement's fingerprint), 7 send rows [S·k]. One workgroup per logical expert walks
// that expert's compact rows in order: no atomics, bitwise reproducible.

struct BucketParams {
    s: u32,
    k: u32,
    e: u32,
    slots: u32,
    t0: u32,
    t1: u32,
    fingerprint: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: BucketParams;
@group(0) @binding(1) var<storage, read> rows: array<i32>;
@group(0) @binding(2) var<storage, read> offsets: array<i32>;
@group(0) @binding(3) var<storage, read> rep_off: array<i32>;
@group(0) @binding(4) var<storage, read> rep_slots: array<i32>;
@group(0) @binding(5) var<storage, read_write> scratch: array<i32>;
@group(0) @binding(6) var<storage, read_write> counts: array<i32>;
@group(0) @binding(7) var<storage, read_write> send: array<i32>;

const WG: u32 = 64u;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

fn routes() -> u32 {
    return p.s * p.k;
}

// A route this rank sends: kept, and of a token in [t0, t1).
fn sent(r: u32) -> bool {
    let t = r / p.k;
    return rows[r] >= 0 && t >= p.t0 && t < p.t1;
}

@compute @workgroup_size(64)
fn bucket_clear(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i < routes() { scratch[i] = -1; }
    if i < p.slots { counts[i] = 0; }
}

// inverse[compact row] = route, for the routes sent.
@compute @workgroup_size(64)
fn bucket_invert(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = index(gid, nwg);
    if r >= routes() || !sent(r) { return; }
    scratch[u32(rows[r])] = i32(r);
}

// One workgroup per logical expert walks its compact rows in chunks of 64, in order, each
// row to replica token % replicas: a row's position in its slot is the slot's count before
// the chunk plus the rows of the chunk before it with the same slot; the last of them
// then writes the new count.
var<workgroup> chunk_slot: array<i32, 64>;
var<workgroup> rows_of_expert: vec2<u32>;

@compute @workgroup_size(64)
fn bucket_rank(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let e = wid.x + wid.y * nwg.x;
    let l = lid.x;
    if l == 0u {
        rows_of_expert = vec2<u32>(0u, 0u);
        if e < p.e { rows_of_expert = vec2<u32>(u32(offsets[e]), u32(offsets[e + 1u])); }
    }
    // Uniform across the workgroup, so the barriers below are in uniform control flow.
    let span = workgroupUniformLoad(&rows_of_expert);
    let sk = routes();
    for (var q0 = span.x; q0 < span.y; q0 += WG) {
        let q = q0 + l;
        var slot = -1;
        var r = -1;
        if q < span.y {
            r = scratch[q];
            if r >= 0 {
                let first = u32(rep_off[e]);
                let reps = u32(rep_off[e + 1u]) - first;
                slot = rep_slots[first + (u32(r) / p.k) % reps];
            }
        }
        chunk_slot[l] = slot;
        workgroupBarrier();
        var pos = 0;
        var last = true;
        if slot >= 0 {
            var before = 0;
            for (var i = 0u; i < WG; i++) {
                if chunk_slot[i] == slot {
                    if i < l { before += 1; } else if i > l { last = false; }
                }
            }
            pos = counts[slot] + before;
            scratch[sk + u32(r)] = pos;
            scratch[2u * sk + u32(r)] = slot;
        }
        storageBarrier();
        workgroupBarrier();
        if slot >= 0 && last { counts[slot] = pos + 1; }
        storageBarrier();
        workgroupBarrier();
    }
}

// Exclusive prefix of the counts: where each slot's rows start in the send buffer.
@compute @workgroup_size(64)
fn bucket_offsets(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    if index(gid, nwg) != 0u { return; }
    let base = 3u * routes();
    var acc = 0;
    for (var s = 0u; s < p.slots; s++) {
        scratch[base + s] = acc;
        acc += counts[s];
    }
    scratch[base + p.slots] = acc;
    counts[p.slots] = i32(p.s);
    counts[p.slots + 1u] = i32(p.fingerprint);
}

@compute @workgroup_size(64)
fn bucket_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = index(gid, nwg);
    let sk = routes();
    if r >= sk { return; }
    if sent(r) {
        let slot = u32(scratch[2u * sk + r]);
        send[r] = scratch[3u * sk + slot] + scratch[sk + r];
    } else {
        send[r] = -1;
    }
}
