// Optimizer steps, one invocation per element, in the order of operations of
// torch.optim's single-tensor SGD / Adam / AdamW (so the f32 roundings match the cpu
// reference's), and the sum of squares that clipping by global norm reduces: one
// workgroup, each invocation a strided sum, then a fixed tree (no atomics).
// Bindings: 0 params, 1 param, 2 grad, 3 m, 4 v, 5 param out, 6 m out, 7 v out.

struct OptimParams {
    n: u32,
    kind: u32,       // 0 SGD, 1 Adam, 2 AdamW
    has_m: u32,      // 0: SGD's first step (the buffer starts as the gradient)
    nesterov: u32,
    lr: f32,
    wd: f32,
    mu: f32,
    one_minus_damp: f32,
    w1: f32,         // 1 − β₁, Adam's lerp weight
    beta2: f32,
    one_minus_b2: f32,
    eps: f32,
    step_size: f32,  // lr / (1 − β₁ᵗ)
    bc2_sqrt: f32,   // √(1 − β₂ᵗ)
    decay: f32,      // AdamW: 1 − lr · wd
    grad_scale: f32,
}

@group(0) @binding(0) var<uniform> p: OptimParams;
@group(0) @binding(1) var<storage, read> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read> m_in: array<f32>;
@group(0) @binding(4) var<storage, read> v_in: array<f32>;
@group(0) @binding(5) var<storage, read_write> p_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> m_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> v_out: array<f32>;

const WG: u32 = 256u;

// torch's lerp: a + w·(b − a) for |w| < 0.5, else b − (b − a)·(1 − w).
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if abs(w) < 0.5 { return a + w * (b - a); }
    return b - (b - a) * (1.0 - w);
}

@compute @workgroup_size(256)
fn optim_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n { return; }
    var d = select(grad[i] * p.grad_scale, grad[i], p.grad_scale == 1.0);
    var x = param[i];
    if p.kind == 0u {
        if p.wd != 0.0 { d += p.wd * x; }
        if p.mu != 0.0 {
            var buf = d;
            if p.has_m == 1u { buf = m_in[i] * p.mu + p.one_minus_damp * d; }
            m_out[i] = buf;
            d = select(buf, d + p.mu * buf, p.nesterov == 1u);
        }
        p_out[i] = x + -p.lr * d;
        return;
    }
    if p.kind == 2u {
        x = x * p.decay;
    } else if p.wd != 0.0 {
        d += p.wd * x;
    }
    let m = lerp(m_in[i], d, p.w1);
    let v = v_in[i] * p.beta2 + p.one_minus_b2 * d * d;
    m_out[i] = m;
    v_out[i] = v;
    let denom = sqrt(v) / p.bc2_sqrt + p.eps;
    p_out[i] = x + (-p.step_size * m) / denom;
}

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn sum_squares(@builtin(local_invocation_id) lid: vec3<u32>) {
    var acc = 0.0;
    for (var i = lid.x; i < p.n; i += WG) {
        acc += param[i] * param[i];
    }
    partial[lid.x] = acc;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if lid.x < stride { partial[lid.x] += partial[lid.x + stride]; }
        workgroupBarrier();
    }
    if lid.x == 0u { p_out[0] = partial[0]; }
}
