// Elementwise ops: activations, GLU, products and the residual / shared-expert mixes.
// `act` comes from activation.wgsl, which the backend prepends to this file.
// Bindings (shared by every entry point of this family): 0 params, 1-3 inputs, 4 output.
// One invocation per output element; dispatches are 2-D when one dimension would exceed
// the 65535-workgroup limit.

struct ElementwiseParams {
    n: vec2<u32>, // output elements (u64 in the ABI; the high word is 0 on wgpu)
    cols: u32,    // row length of the output
    act: u32,     // 0 gelu, 1 gelu_tanh, 2 relu, 3 silu, 4 identity
    gated: u32,   // add_gated: 1 when a gate column is bound
    alpha: f32,   // scale: the factor
    clamp: u32,   // glu: 1 for a clamped GLU (limit, glu_alpha, up_offset)
    limit: f32,
    glu_alpha: f32,
    up_offset: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: ElementwiseParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

@compute @workgroup_size(256)
fn activation(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if i >= p.n.x { return; }
    out[i] = act(a[i], p.act);
}

// a [rows, 2·cols] (gate columns, then up) → out [rows, cols] = act(gate) · up, or with
// the clamp (activation.wgsl `glu_clamped`) act_α(min(gate, l)) · (clamp(up, −l, l) + off).
@compute @workgroup_size(256)
fn glu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if i >= p.n.x { return; }
    let row = i / p.cols;
    let col = i % p.cols;
    let base = row * 2u * p.cols;
    let gate = a[base + col];
    let up = a[base + p.cols + col];
    if p.clamp == 1u {
        out[i] = glu_clamped(gate, up, p.act, p.limit, p.glu_alpha, p.up_offset);
    } else {
        out[i] = act(gate, p.act) * up;
    }
}

// a [rows, cols] + b [cols] on every row (JetMoE's output bias).
@compute @workgroup_size(256)
fn add_bias(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if i >= p.n.x { return; }
    out[i] = a[i] + b[i % p.cols];
}

@compute @workgroup_size(256)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if i >= p.n.x { return; }
    out[i] = p.alpha * a[i];
}

@compute @workgroup_size(256)
fn mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if i >= p.n.x { return; }
    out[i] = a[i] * b[i];
}

// out = a + s · b, s = sigmoid(c[row]) when gated (Qwen2-MoE shared expert), else 1.
@compute @workgroup_size(256)
fn add_gated(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if i >= p.n.x { return; }
    var s = 1.0;
    if p.gated == 1u {
        s = 1.0 / (1.0 + exp(-c[i / p.cols]));
    }
    out[i] = a[i] + s * b[i];
}

// DeepSpeed residual MoE: out = a · c0 + b · c1 with (c0, c1) = softmax(c[row, 0..2]).
@compute @workgroup_size(256)
fn residual_mix(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if i >= p.n.x { return; }
    let row = i / p.cols;
    let l0 = c[2u * row];
    let l1 = c[2u * row + 1u];
    let mx = max(l0, l1);
    let e0 = exp(l0 - mx);
    let e1 = exp(l1 - mx);
    out[i] = a[i] * (e0 / (e0 + e1)) + b[i] * (e1 / (e0 + e1));
}
