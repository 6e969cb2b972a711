// Rows between token order and the compact expert-major layout (as shaders/permute.wgsl).
// Every output element has one writer: no atomics, bitwise reproducible.

// One thread per (route, column): out[rows[route]] = x[token].
extern "C" __global__ void permute(const float* x, const int* rows, float* out, u64 n, u32 cols, u32 k) {
    u64 i = global_id();
    if (i >= n) return;
    u64 route = i / cols, col = i % cols;
    int row = rows[route];
    if (row < 0) return;
    out[(u64)row * cols + col] = x[(route / k) * cols + col];
}

// One thread per (token, column): y = Σ_j w[t, j] · yp[rows[t, j]] in route order, f32.
extern "C" __global__ void combine(const float* yp, const int* rows, const float* w, float* out, u64 n, u32 cols,
                                   u32 k) {
    u64 i = global_id();
    if (i >= n) return;
    u64 t = i / cols, col = i % cols;
    float acc = 0.0f;
    for (u32 j = 0; j < k; j++) {
        int row = rows[t * k + j];
        if (row >= 0) acc += w[t * k + j] * yp[(u64)row * cols + col];
    }
    out[i] = acc;
}
