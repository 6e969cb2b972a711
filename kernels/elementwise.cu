// Elementwise ops (as shaders/elementwise.wgsl): one thread per output element.

extern "C" __global__ void activation(const float* x, float* out, u64 n, u32 kind) {
    u64 i = global_id();
    if (i < n) out[i] = act(x[i], kind);
}

// x [rows, 2·cols] (gate columns, then up) → out [rows, cols] = act(gate) · up.
extern "C" __global__ void glu(const float* x, float* out, u64 n, u32 cols, u32 kind) {
    u64 i = global_id();
    if (i >= n) return;
    u64 row = i / cols, col = i % cols;
    const float* r = x + row * 2 * cols;
    out[i] = act(r[col], kind) * r[cols + col];
}

extern "C" __global__ void mul(const float* a, const float* b, float* out, u64 n) {
    u64 i = global_id();
    if (i < n) out[i] = a[i] * b[i];
}

// out = a + s · b, s = sigmoid(gate[row]) when gated, else 1.
extern "C" __global__ void add_gated(const float* a, const float* b, const float* gate, float* out, u64 n, u32 cols,
                                     u32 gated) {
    u64 i = global_id();
    if (i >= n) return;
    float s = gated ? 1.0f / (1.0f + expf(-gate[i / cols])) : 1.0f;
    out[i] = a[i] + s * b[i];
}

// DeepSpeed residual MoE: out = a · c0 + b · c1, (c0, c1) = softmax(coef[row, 0..2]).
extern "C" __global__ void residual_mix(const float* a, const float* b, const float* coef, float* out, u64 n,
                                        u32 cols) {
    u64 i = global_id();
    if (i >= n) return;
    u64 row = i / cols;
    float l0 = coef[2 * row], l1 = coef[2 * row + 1], mx = fmaxf(l0, l1);
    float e0 = expf(l0 - mx), e1 = expf(l1 - mx);
    out[i] = a[i] * (e0 / (e0 + e1)) + b[i] * (e1 / (e0 + e1));
}
