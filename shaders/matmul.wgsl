// Matrix products out [R, N] = x [R, K] · w[g] [N, K]ᵀ (+ bias[g]), tiled 64 × 64 with
// 16-deep K steps through workgroup memory; each of the 16 × 16 invocations owns a 4 × 4
// block of outputs and accumulates in f32 in K order.
//
// Grouped products read the group offsets on the device: `tile_map` cuts every group's
// rows into 64-row tiles (a tile never spans two groups, so the compact expert-major
// layout needs no padding), and `grouped` runs one workgroup per (tile, column block).
// The dispatch is sized for the most tiles possible, ceil(R / 64) + G; spare workgroups
// exit at once.
//
// Weights may be stored as f32, f16 or bf16 (two halves per u32 word, the even element in
// the low half), and a weight stack larger than the adapter's largest storage binding is
// split into parts: whole experts [g0, g1), or for one expert a range of output columns
// [c0, c1). One dispatch per part; a workgroup whose tile or columns lie outside its part
// exits at once. Accumulation is f32 throughout.
//
// `grouped_glu` is the first product of GLU experts with the activation fused in: each
// workgroup accumulates a gate tile and the matching up tile (weight rows c and F + c of
// w_in [G, 2F, K]) and writes h = act(gate + b) · (up + b) [R, F], plus the
// pre-activation [R, 2F] when asked, so the intermediate never makes a round trip
// through memory; a clamped GLU (`clamp` = 1) writes activation.wgsl's `glu_clamped`
// instead, the pre-activation still unclamped. It needs each part to hold whole experts
// (gate and up rows together).
//
// Bindings: 0 params, 1 x, 2 w (this part, as u32 words), 3 bias, 4 offsets [G + 1] i32,
// 5 tiles (1 + 3·max) i32, 6 out, 7 pre-activation (grouped_glu with keep_pre).

struct MatmulParams {
    rows: u32,       // R
    n: u32,          // N
    k: u32,          // K
    groups: u32,     // G
    has_bias: u32,
    max_tiles: u32,
    y_stride: u32,   // workgroups per row of the dispatch grid in y (65535 limit)
    wdtype: u32,     // weight storage: 0 f32, 1 f16, 2 bf16
    g0: u32,         // this weight part: experts [g0, g1), output columns [c0, c1)
    g1: u32,
    c0: u32,
    c1: u32,
    glu: u32,        // 1 for grouped_glu (GLU experts); the entry point decides here
    act: u32,        // grouped_glu: 0 gelu, 1 gelu_tanh, 2 relu, 3 silu, 4 identity
    keep_pre: u32,   // grouped_glu: write the pre-activation too
    clamp: u32,      // grouped_glu: 1 for a clamped GLU (limit, alpha, up_offset)
    limit: f32,
    alpha: f32,
    up_offset: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> offsets: array<i32>;
@group(0) @binding(5) var<storage, read_write> tiles: array<i32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<storage, read_write> pre: array<f32>;

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;

var<workgroup> xs: array<array<f32, 64>, 16>;   // [BK][BM]
var<workgroup> ws: array<array<f32, 64>, 16>;   // [BK][BN]
var<workgroup> us: array<array<f32, 64>, 16>;   // [BK][BN], up rows (grouped_glu)
var<workgroup> tile_info: vec4<u32>;            // (group, first row, end row, valid)

// One invocation: the tile list for `grouped`. Group bounds are clamped into
// [previous end, rows], so no tile leaves the input whatever the offsets hold.
@compute @workgroup_size(1)
fn tile_map() {
    var count = 0u;
    var prev = 0u;
    for (var g = 0u; g < p.groups; g++) {
        let start = clamp(u32(max(offsets[g], 0)), prev, p.rows);
        let end = clamp(u32(max(offsets[g + 1u], 0)), start, p.rows);
        prev = end;
        for (var r0 = start; r0 < end; r0 += BM) {
            tiles[1u + 3u * count] = i32(g);
            tiles[2u + 3u * count] = i32(r0);
            tiles[3u + 3u * count] = i32(min(r0 + BM, end));
            count++;
        }
    }
    tiles[0] = i32(count);
}

// Weight row `col` (an output column), element `kx`, of expert `g`, from this part.
fn wload(g: u32, col: u32, kx: u32) -> f32 {
    let i = ((g - p.g0) * (p.c1 - p.c0) + (col - p.c0)) * p.k + kx;
    if p.wdtype == 0u {
        return bitcast<f32>(w[i]);
    }
    let word = w[i / 2u];
    if p.wdtype == 1u {
        return unpack2x16float(word)[i % 2u];
    }
    // bf16 is the upper half of an f32.
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, i % 2u == 1u));
}

fn product_tile(g: u32, r0: u32, r1: u32, c0: u32, lid: vec3<u32>) {
    let tid = lid.y * 16u + lid.x;
    var acc: array<array<f32, 4>, 4>;
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            acc[i][j] = 0.0;
        }
    }
    let wbase = g * p.n;
    let cend = min(p.c1, p.n);
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var l = 0u; l < 4u; l++) {
            let idx = tid + l * 256u;
            let rr = idx / BK;
            let kk = idx % BK;
            let row = r0 + rr;
            let kx = k0 + kk;
            var xv = 0.0;
            if row < r1 && kx < p.k {
                xv = x[row * p.k + kx];
            }
            xs[kk][rr] = xv;
            let col = c0 + rr;
            var wv = 0.0;
            if col < cend && kx < p.k {
                wv = wload(g, col, kx);
            }
            ws[kk][rr] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                av[i] = xs[kk][lid.y * 4u + i];
                bv[i] = ws[kk][lid.x * 4u + i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i][j] += av[i] * bv[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let row = r0 + lid.y * 4u + i;
        if row >= r1 { continue; }
        for (var j = 0u; j < 4u; j++) {
            let col = c0 + lid.x * 4u + j;
            if col >= cend { continue; }
            var v = acc[i][j];
            if p.has_bias == 1u {
                v += bias[wbase + col];
            }
            out[row * p.n + col] = v;
        }
    }
}

// Plain product: one 64-row block per workgroup row of the grid.
@compute @workgroup_size(16, 16)
fn linear(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r0 = (wg.y + wg.z * p.y_stride) * BM;
    if r0 >= p.rows { return; }
    product_tile(0u, r0, min(r0 + BM, p.rows), p.c0 + wg.x * BN, lid);
}

// This workgroup's tile (group, first row, end row, 1), or w = 0 when it has none or
// its group is outside this weight part. Loaded through workgroupUniformLoad, so the
// early exit that follows is uniform for the barriers.
fn this_tile(wg: vec3<u32>, lid: vec3<u32>) -> vec4<u32> {
    let t = wg.y + wg.z * p.y_stride;
    if lid.x == 0u && lid.y == 0u {
        var info = vec4<u32>(0u, 0u, 0u, 0u);
        if t < u32(tiles[0]) {
            let g = u32(tiles[1u + 3u * t]);
            if g >= p.g0 && g < p.g1 {
                info = vec4<u32>(g, u32(tiles[2u + 3u * t]), u32(tiles[3u + 3u * t]), 1u);
            }
        }
        tile_info = info;
    }
    return workgroupUniformLoad(&tile_info);
}

@compute @workgroup_size(16, 16)
fn grouped(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let info = this_tile(wg, lid);
    if info.w == 0u { return; }
    product_tile(info.x, info.y, info.z, p.c0 + wg.x * BN, lid);
}

// GLU tile: columns c0.. of h [R, F] for rows r0..r1 of expert g (F = n / 2).
fn glu_tile(g: u32, r0: u32, r1: u32, c0: u32, lid: vec3<u32>) {
    let tid = lid.y * 16u + lid.x;
    let f = p.n / 2u;
    var acc_g: array<array<f32, 4>, 4>;
    var acc_u: array<array<f32, 4>, 4>;
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            acc_g[i][j] = 0.0;
            acc_u[i][j] = 0.0;
        }
    }
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var l = 0u; l < 4u; l++) {
            let idx = tid + l * 256u;
            let rr = idx / BK;
            let kk = idx % BK;
            let row = r0 + rr;
            let kx = k0 + kk;
            var xv = 0.0;
            if row < r1 && kx < p.k {
                xv = x[row * p.k + kx];
            }
            xs[kk][rr] = xv;
            let col = c0 + rr;
            var gv = 0.0;
            var uv = 0.0;
            if col < f && kx < p.k {
                gv = wload(g, col, kx);
                uv = wload(g, f + col, kx);
            }
            ws[kk][rr] = gv;
            us[kk][rr] = uv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var av: array<f32, 4>;
            var gv: array<f32, 4>;
            var uv: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                av[i] = xs[kk][lid.y * 4u + i];
                gv[i] = ws[kk][lid.x * 4u + i];
                uv[i] = us[kk][lid.x * 4u + i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc_g[i][j] += av[i] * gv[j];
                    acc_u[i][j] += av[i] * uv[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let row = r0 + lid.y * 4u + i;
        if row >= r1 { continue; }
        for (var j = 0u; j < 4u; j++) {
            let col = c0 + lid.x * 4u + j;
            if col >= f { continue; }
            var gv = acc_g[i][j];
            var uv = acc_u[i][j];
            if p.has_bias == 1u {
                gv += bias[g * p.n + col];
                uv += bias[g * p.n + f + col];
            }
            if p.keep_pre == 1u {
                pre[row * p.n + col] = gv;
                pre[row * p.n + f + col] = uv;
            }
            if p.clamp == 1u {
                out[row * f + col] = glu_clamped(gv, uv, p.act, p.limit, p.alpha, p.up_offset);
            } else {
                out[row * f + col] = act(gv, p.act) * uv;
            }
        }
    }
}

@compute @workgroup_size(16, 16)
fn grouped_glu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let info = this_tile(wg, lid);
    if info.w == 0u { return; }
    glu_tile(info.x, info.y, info.z, wg.x * BN, lid);
}
