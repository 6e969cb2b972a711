// Row movement between token order and a grouped layout (the plan's compact
// expert-major rows, or an expert-parallel send buffer).
// Bindings: 0 params, 1 source rows, 2 route rows [S, k] i32, 3 combine weights [S, k],
// 4 output (pass_rows binds x, the group offsets and y there instead). Every output
// element is written by exactly one invocation, in a fixed order: no atomics, so results
// are bitwise reproducible.

struct PermuteParams {
    n: vec2<u32>, // invocations (u64 in the ABI; the high word is 0 on wgpu)
    cols: u32,    // M, the row length
    k: u32,       // routes per token
    t0: u32,      // combine: first token of the range (output row 0)
    from_group: u32, // pass_rows: the first group passed through
    groups: u32,  // pass_rows: groups G of the offsets
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: PermuteParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> rows: array<i32>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

// One invocation per (route, column): out[rows[route]] = x[token]. Routes with row -1
// write nothing; rows no route names stay zero.
@compute @workgroup_size(256)
fn permute(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n.x { return; }
    let route = i / p.cols;
    let col = i % p.cols;
    let row = rows[route];
    if row < 0 { return; }
    out[u32(row) * p.cols + col] = src[(route / p.k) * p.cols + col];
}

// permute with each route's row scaled by its weight (Llama 4 weights the expert input):
// out[rows[route]] = weights[route] · x[token].
@compute @workgroup_size(256)
fn permute_scaled(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n.x { return; }
    let route = i / p.cols;
    let col = i % p.cols;
    let row = rows[route];
    if row < 0 { return; }
    out[u32(row) * p.cols + col] = weights[route] * src[(route / p.k) * p.cols + col];
}

// pass_rows, one invocation per element of [R, M]: rows [offsets[from_group],
// offsets[groups]) take x (`src`), the others y (bound as `weights`); the offsets are bound
// as `rows`. The offsets are non-decreasing and end within R (Offsets checks them), so
// the range is inside the rows.
@compute @workgroup_size(256)
fn pass_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n.x { return; }
    let r = i32(i / p.cols);
    let inside = r >= rows[p.from_group] && r < rows[p.groups];
    out[i] = select(weights[i], src[i], inside);
}

// One invocation per (token of [t0, t0 + n / cols), column): y = Σ_j w[t, j] ·
// yp[rows[t, j]], in route order, accumulated in f32.
@compute @workgroup_size(256)
fn combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n.x { return; }
    let t = p.t0 + i / p.cols;
    let col = i % p.cols;
    var acc = 0.0;
    for (var j = 0u; j < p.k; j++) {
        let row = rows[t * p.k + j];
        if row >= 0 {
            acc += weights[t * p.k + j] * src[u32(row) * p.cols + col];
        }
    }
    out[i] = acc;
}
