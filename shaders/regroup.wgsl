// Block regrouping of rows: output rows out_start[j]..out_start[j + 1] are input rows
// from in_start[j]. Bindings: 0 params, 1 input rows, 2 the block table [2B + 1] i32
// (out_start[0..=B], then in_start[0..B]), 3 output. One invocation per output element,
// each written once.

struct RegroupParams {
    n: vec2<u32>, // output elements (u64 in the ABI; the high word is 0 on wgpu)
    cols: u32,
    blocks: u32,
}

@group(0) @binding(0) var<uniform> p: RegroupParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<i32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn regroup(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n.x { return; }
    let q = i / p.cols;
    let col = i % p.cols;
    // The last block starting at or before row q (table[0] = 0 <= q).
    var lo = 0u;
    var hi = p.blocks;
    while hi - lo > 1u {
        let mid = (lo + hi) / 2u;
        if u32(table[mid]) <= q { lo = mid; } else { hi = mid; }
    }
    let row = u32(table[p.blocks + 1u + lo]) + q - u32(table[lo]);
    out[i] = src[row * p.cols + col];
}
