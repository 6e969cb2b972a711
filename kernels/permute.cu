// Rows between token order and a grouped layout (as shaders/permute.wgsl). Every output
// element has one writer: no atomics, bitwise reproducible. Both entry points take the
// shader's bindings: source rows, route rows, combine weights, output.

// One thread per (route, column): out[rows[route]] = src[token].
extern "C" __global__ void permute(const float* src, const int* rows, const float* weights, float* out,
                                   PermuteParams p) {
    u64 i = global_id();
    if (i >= p.n) return;
    u64 route = i / p.cols, col = i % p.cols;
    int row = rows[route];
    if (row < 0) return;
    out[(u64)row * p.cols + col] = src[(route / p.k) * p.cols + col];
}

// One thread per (token of [t0, t0 + n / cols), column): y = Σ_j w[t, j] · src[rows[t, j]]
// in route order, f32.
extern "C" __global__ void combine(const float* src, const int* rows, const float* weights, float* out,
                                   PermuteParams p) {
    u64 i = global_id();
    if (i >= p.n) return;
    u64 t = p.t0 + i / p.cols, col = i % p.cols;
    float acc = 0.0f;
    for (u32 j = 0; j < p.k; j++) {
        int row = rows[t * p.k + j];
        if (row >= 0) acc += weights[t * p.k + j] * src[(u64)row * p.cols + col];
    }
    out[i] = acc;
}
