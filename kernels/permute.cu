// Rows between token order and a grouped layout (as shaders/permute.wgsl). Every output
// element has one writer: no atomics, bitwise reproducible. Every entry point takes the
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

// permute with each route's row scaled by its weight (Llama 4 weights the expert input):
// out[rows[route]] = weights[route] · src[token].
extern "C" __global__ void permute_scaled(const float* src, const int* rows, const float* weights, float* out,
                                          PermuteParams p) {
    u64 i = global_id();
    if (i >= p.n) return;
    u64 route = i / p.cols, col = i % p.cols;
    int row = rows[route];
    if (row < 0) return;
    out[(u64)row * p.cols + col] = weights[route] * src[(route / p.k) * p.cols + col];
}

// pass_rows, one thread per element of [R, M]: rows [offsets[from_group], offsets[groups])
// take x (`src`), the others y (passed as `weights`); the offsets come as `rows`. They are
// non-decreasing and end within R (Offsets checks them), so the range is inside the rows.
extern "C" __global__ void pass_rows(const float* src, const int* rows, const float* weights, float* out,
                                     PermuteParams p) {
    u64 i = global_id();
    if (i >= p.n) return;
    long long r = (long long)(i / p.cols);
    bool inside = r >= rows[p.from_group] && r < rows[p.groups];
    out[i] = inside ? src[i] : weights[i];
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
