// Helpers the route and route_grad shaders share (prepended to both by the wgpu backend,
// as kernels/common.cuh is included by route.cu and route_grad.cu).

// w^p of a weight (>= 0) for the p-norm: exact for p = 1 and 2, and 0 for 0 (pow of 0 is
// not defined in WGSL).
fn pow_p(w: f32, pn: f32) -> f32 {
    if pn == 1.0 { return w; }
    if pn == 2.0 { return w * w; }
    if w == 0.0 { return 0.0; }
    return pow(w, pn);
}

// (Σ w^p)^(1/p) from Σ w^p.
fn root_p(sp: f32, pn: f32) -> f32 {
    if pn == 1.0 { return sp; }
    if pn == 2.0 { return sqrt(sp); }
    if sp == 0.0 { return 0.0; }
    return pow(sp, 1.0 / pn);
}

// Whether sparsemixer keeps logit x around the max m: PhiMoE masks
// (m - x) / max(|x|, m) > 2 jitter_eps; a zero factor (x = m = 0) is 0/0 in torch, which
// compares false: kept.
fn mixer_kept(x: f32, m: f32, jitter_eps: f32) -> bool {
    let f = max(abs(x), m);
    return !(f > 0.0 && (m - x) / f > 2.0 * jitter_eps);
}

