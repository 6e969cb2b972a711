// Elementwise ops (as shaders/elementwise.wgsl): one thread per output element. Every
// entry point takes the same arguments, as the shader's bindings: inputs a, b, c (unused
// ones may be any pointer), the output, and the parameter block.

extern "C" __global__ void activation(const float* a, const float* b, const float* c, float* out,
                                      ElementwiseParams p) {
    u64 i = global_id();
    if (i < p.n) out[i] = act(a[i], p.act);
}

extern "C" __global__ void scale(const float* a, const float* b, const float* c, float* out, ElementwiseParams p) {
    u64 i = global_id();
    if (i < p.n) out[i] = p.alpha * a[i];
}

// a [rows, 2·cols] (gate columns, then up) → out [rows, cols] = act(gate) · up, or with
// the clamp (common.cuh `glu_clamped`) act_α(min(gate, l)) · (clamp(up, −l, l) + off).
extern "C" __global__ void glu(const float* a, const float* b, const float* c, float* out, ElementwiseParams p) {
    u64 i = global_id();
    if (i >= p.n) return;
    u64 row = i / p.cols, col = i % p.cols;
    const float* r = a + row * 2 * p.cols;
    float gate = r[col], up = r[p.cols + col];
    out[i] = p.clamp ? glu_clamped(gate, up, p.act, p.limit, p.glu_alpha, p.up_offset) : act(gate, p.act) * up;
}

// a [rows, cols] + b [cols] on every row (JetMoE's output bias).
extern "C" __global__ void add_bias(const float* a, const float* b, const float* c, float* out, ElementwiseParams p) {
    u64 i = global_id();
    if (i < p.n) out[i] = a[i] + b[i % p.cols];
}

extern "C" __global__ void mul(const float* a, const float* b, const float* c, float* out, ElementwiseParams p) {
    u64 i = global_id();
    if (i < p.n) out[i] = a[i] * b[i];
}

// out = a + s · b, s = sigmoid(c[row]) when gated, else 1.
extern "C" __global__ void add_gated(const float* a, const float* b, const float* c, float* out,
                                     ElementwiseParams p) {
    u64 i = global_id();
    if (i >= p.n) return;
    float s = p.gated ? 1.0f / (1.0f + expf(-c[i / p.cols])) : 1.0f;
    out[i] = a[i] + s * b[i];
}

// DeepSpeed residual MoE: out = a · c0 + b · c1, (c0, c1) = softmax(c[row, 0..2]).
extern "C" __global__ void residual_mix(const float* a, const float* b, const float* c, float* out,
                                        ElementwiseParams p) {
    u64 i = global_id();
    if (i >= p.n) return;
    u64 row = i / p.cols;
    float l0 = c[2 * row], l1 = c[2 * row + 1], mx = fmaxf(l0, l1);
    float e0 = expf(l0 - mx), e1 = expf(l1 - mx);
    out[i] = a[i] * (e0 / (e0 + e1)) + b[i] * (e1 / (e0 + e1));
}
