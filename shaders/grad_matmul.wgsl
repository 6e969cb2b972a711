// The backward's products, one invocation per output element, each summing in a fixed
// order (no atomics: a backward is bitwise repeatable).
//   linear_dx:   dx [rows, k] = dy [rows, n] · w[g] [n, k] for the rows of group g (rows
//                past the last group are 0); weights f32, f16 or bf16 as matmul.wgsl
//                stores them, and like there possibly split into parts (groups [g0, g1),
//                matrix rows [c0, c1)): one dispatch per part, the later ones adding
//                their partial sums (`accumulate`) to what the earlier ones wrote.
//   weight_grad: dw[g] [n, k] = Σ_{r ∈ g} dy[r, n] · x[r, k] (an empty group gives 0).
//   bias_grad:   db[g] [n]    = Σ_{r ∈ g} dy[r, n].
// Dense products (grouped = 0) are one group of all rows.
// Bindings: 0 params, 1 dy, 2 x or w (u32 words), 3 offsets [G + 1] i32, 4 out, 5 db.

struct GradMatmulParams {
    rows: u32,
    n: u32,
    k: u32,
    groups: u32,
    grouped: u32,
    wdtype: u32,   // linear_dx: 0 f32, 1 f16, 2 bf16
    bias: u32,
    accumulate: u32,
    g0: u32,
    g1: u32,
    c0: u32,
    c1: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
}

@group(0) @binding(0) var<uniform> p: GradMatmulParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<u32>;
@group(0) @binding(3) var<storage, read> offsets: array<i32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> db: array<f32>;

const WG: u32 = 256u;

fn group_start(g: u32) -> u32 {
    if p.grouped == 0u { return select(p.rows, 0u, g == 0u); }
    return u32(max(offsets[g], 0));
}

fn group_end(g: u32) -> u32 {
    if p.grouped == 0u { return p.rows; }
    return min(u32(max(offsets[g + 1u], 0)), p.rows);
}

// The group of row r: the last g with offsets[g] <= r, or `groups` past the last group.
fn group_of(r: u32) -> u32 {
    if p.grouped == 0u { return 0u; }
    var lo = 0u;
    var hi = p.groups;
    while lo < hi {
        let mid = (lo + hi + 1u) / 2u;
        if u32(max(offsets[mid], 0)) <= r { lo = mid; } else { hi = mid - 1u; }
    }
    return lo;
}

fn wload(i: u32) -> f32 {
    if p.wdtype == 0u { return bitcast<f32>(src[i]); }
    let word = src[i / 2u];
    if p.wdtype == 1u { return unpack2x16float(word)[i % 2u]; }
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, i % 2u == 1u));
}

@compute @workgroup_size(256)
fn linear_dx(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.rows * p.k { return; }
    let r = i / p.k;
    let c = i % p.k;
    let g = group_of(r);
    let base = select(0.0, out[i], p.accumulate == 1u);
    if g >= p.groups || g < p.g0 || g >= p.g1 { out[i] = base; return; }
    var acc = 0.0;
    // This part holds rows c0..c1 of groups g0..g1, each matrix (c1 − c0) × k.
    let w0 = (g - p.g0) * (p.c1 - p.c0) * p.k;
    for (var j = p.c0; j < p.c1; j++) {
        acc += dy[r * p.n + j] * wload(w0 + (j - p.c0) * p.k + c);
    }
    out[i] = base + acc;
}

@compute @workgroup_size(256)
fn weight_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.groups * p.n * p.k { return; }
    let g = i / (p.n * p.k);
    let j = (i / p.k) % p.n;
    let c = i % p.k;
    var acc = 0.0;
    for (var r = group_start(g); r < group_end(g); r++) {
        acc += dy[r * p.n + j] * bitcast<f32>(src[r * p.k + c]);
    }
    out[i] = acc;
}

@compute @workgroup_size(256)
fn bias_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.groups * p.n { return; }
    let g = i / p.n;
    let j = i % p.n;
    var acc = 0.0;
    for (var r = group_start(g); r < group_end(g); r++) {
        acc += dy[r * p.n + j];
    }
    db[i] = acc;
}
