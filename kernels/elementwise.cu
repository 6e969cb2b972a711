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

// a [rows, 2·cols] (gate columns, then up) → out [rows, cols] = act(gate) · up.
extern "C" __global__ void glu(const float* a, const float* b, const float* c, float* out, ElementwiseParams p) {
    u64 i = global_id();
    if (i >= p.n) return;
    u64 row = i / p.cols, col = i % p.cols;
    const float* r = a + row * 2 * p.cols;
    out[i] = act(r[col], p.act) * r[p.cols + col];
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
