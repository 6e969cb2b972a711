// The backward's row ops. Every output element is written by exactly one invocation,
// and every sum runs in a fixed order (no atomics: a backward is bitwise repeatable).
//   act_grad             one invocation per element of the pre-activation [rows, N]
//   combine_grad_rows    one per (route, column): d_yp[rows[t, j]] = w[t, j] · dy[t − t0]
//   combine_grad_weights one per route: d_w[t, j] = dy[t − t0] · yp[rows[t, j]]
//   mix_grad             one per row: DeepSpeed's residual mix backward
//   gated_add_grad       one per row: the gated shared-expert add backward
// Bindings: 0 params, 1..4 the f32 inputs a b c d, 5 route rows i32, 6..8 outputs.

struct GradParams {
    rows: u32,
    cols: u32,
    k: u32,
    t0: u32,
    t1: u32,
    act: u32,
    glu: u32,
    bound: u32,
    clamp: u32,     // act_grad of a GLU: 1 for a clamped one (limit, alpha, up_offset)
    limit: f32,
    alpha: f32,
    up_offset: f32,
}

@group(0) @binding(0) var<uniform> p: GradParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read> d: array<f32>;
@group(0) @binding(5) var<storage, read> rows: array<i32>;
@group(0) @binding(6) var<storage, read_write> out0: array<f32>;
@group(0) @binding(7) var<storage, read_write> out1: array<f32>;
@group(0) @binding(8) var<storage, read_write> out2: array<f32>;

const WG: u32 = 256u;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

// a = d(output) [rows, I], b = pre-activation [rows, N]; out0 = d(pre) [rows, N]. A
// clamped GLU (`clamp` = 1): d_gate = dy · (u + off) · act_α'(g) where gate < limit (0
// beyond), d_up = dy · act_α(g) where −limit < up < limit, g and u the clamped values.
@compute @workgroup_size(256)
fn act_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    let n = select(p.cols, 2u * p.cols, p.glu == 1u);
    if i >= p.rows * n { return; }
    if p.glu == 0u {
        out0[i] = a[i] * act_deriv(b[i], p.act);
        return;
    }
    let r = i / n;
    let col = i % n;
    let inner = col % p.cols;
    let gate = b[r * n + inner];
    let up = b[r * n + p.cols + inner];
    let g = a[r * p.cols + inner];
    if p.clamp == 1u {
        // The clamps pass the gradient strictly inside their bounds, as torch's clamp.
        let gc = clamp_gate(gate, p.limit);
        if col < p.cols {
            let d = g * (clamp_up(up, p.limit) + p.up_offset) * act_scaled_deriv(gc, p.act, p.alpha);
            out0[i] = select(0.0, d, gate < p.limit);
        } else {
            let d = g * act_scaled(gc, p.act, p.alpha);
            out0[i] = select(0.0, d, up > -p.limit && up < p.limit);
        }
        return;
    }
    out0[i] = select(g * act(gate, p.act), g * up * act_deriv(gate, p.act), col < p.cols);
}

// a = dy [t1 − t0, M], c = combine weights [S, k]; out0 = d_yp [bound, M], zero where no
// route of the range names the row (the buffer starts zeroed).
@compute @workgroup_size(256)
fn combine_grad_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= (p.t1 - p.t0) * p.k * p.cols { return; }
    let route = p.t0 * p.k + i / p.cols;
    let col = i % p.cols;
    let row = rows[route];
    if row < 0 { return; }
    let t = route / p.k;
    out0[u32(row) * p.cols + col] = c[route] * a[(t - p.t0) * p.cols + col];
}

// a = dy, b = yp [bound, M]; out1 = d_w [S, k] (0 outside the range and where dropped).
@compute @workgroup_size(256)
fn combine_grad_weights(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let route = index(gid, nwg);
    if route >= p.rows * p.k { return; }
    let t = route / p.k;
    let row = rows[route];
    if row < 0 || t < p.t0 || t >= p.t1 { out1[route] = 0.0; return; }
    var acc = 0.0;
    for (var col = 0u; col < p.cols; col++) {
        acc += a[(t - p.t0) * p.cols + col] * b[u32(row) * p.cols + col];
    }
    out1[route] = acc;
}

// a = dy, b = moe, c = mlp [rows, M], d = coefficient logits [rows, 2];
// out0 = d_moe, out1 = d_mlp, out2 = d_coef [rows, 2].
@compute @workgroup_size(256)
fn mix_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = index(gid, nwg);
    if r >= p.rows { return; }
    let l0 = d[2u * r];
    let l1 = d[2u * r + 1u];
    let mx = max(l0, l1);
    let e0 = exp(l0 - mx);
    let e1 = exp(l1 - mx);
    let c0 = e0 / (e0 + e1);
    let c1 = e1 / (e0 + e1);
    var a0 = 0.0;
    var a1 = 0.0;
    for (var col = 0u; col < p.cols; col++) {
        let i = r * p.cols + col;
        out0[i] = a[i] * c0;
        out1[i] = a[i] * c1;
        a0 += a[i] * b[i];
        a1 += a[i] * c[i];
    }
    let dot = c0 * a0 + c1 * a1;
    out2[2u * r] = c0 * (a0 - dot);
    out2[2u * r + 1u] = c1 * (a1 - dot);
}

// a = dy, b = shared output [rows, M], c = gate logits [rows, 1];
// out0 = d_shared [rows, M], out1 = d_gate [rows, 1].
@compute @workgroup_size(256)
fn gated_add_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = index(gid, nwg);
    if r >= p.rows { return; }
    let s = 1.0 / (1.0 + exp(-c[r]));
    var acc = 0.0;
    for (var col = 0u; col < p.cols; col++) {
        let i = r * p.cols + col;
        out0[i] = a[i] * s;
        acc += a[i] * b[i];
    }
    out1[r] = s * (1.0 - s) * acc;
}
