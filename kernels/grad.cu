// The backward's row ops (backends/cpu/src/grad.rs is the reference): the gradient
// through an activation or GLU, of combine (expert outputs and weights), of DeepSpeed's
// residual mix and of the gated shared-expert add. No atomics: every output element has
// one writer, and the row reductions of mix_grad / gated_add_grad run one block per row
// over a fixed tree, so a backward is bitwise repeatable.

// Threads per block of the row reductions (launch.rs `grad_rows`).
#define ROW_WG 256

// act'(x) for activation code `kind`, with torch's backward formulas (cpu `act_deriv`).
__device__ __forceinline__ float act_deriv(float x, u32 kind) {
    switch (kind) {
        case 0: {
            // GeluBackward: cdf + x · pdf.
            float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
            float pdf = expf(-0.5f * x * x) * (1.12837916709551257f * 0.70710678118654752f * 0.5f);
            return cdf + x * pdf;
        }
        case 1: {
            // GeluBackward with approximate = 'tanh'.
            const float beta = 1.41421356237309505f * 1.12837916709551257f * 0.5f;
            const float kappa = 0.044715f;
            float x_sq = x * x;
            float inner = beta * (x + kappa * x_sq * x);
            float t = tanhf(inner);
            float left = 0.5f * x;
            float right = 1.0f + t;
            return 0.5f * right + left * (1.0f - t * t) * (beta * (1.0f + 3.0f * kappa * x_sq));
        }
        case 2: return x > 0.0f ? 1.0f : 0.0f;
        case 3: {
            float s = 1.0f / (1.0f + expf(-x));
            return s * (1.0f + x * (1.0f - s));
        }
        default: return 1.0f;
    }
}

// act_α'(x) = s · (1 + α·x · (1 − s)), s = σ(α·x), for silu; the others as act_deriv.
__device__ __forceinline__ float act_scaled_deriv(float x, u32 kind, float alpha) {
    if (kind != 3) return act_deriv(x, kind);
    float s = 1.0f / (1.0f + expf(-alpha * x));
    return s * (1.0f + alpha * x * (1.0f - s));
}

// One thread per element of the pre-activation gradient [rows, N]: N = cols, or 2·cols
// for GLU, whose pre-activation is [gate | up] and whose output act(gate) · up gives
// d_gate = dy · up · act'(gate), d_up = dy · act(gate). A clamped GLU (`clamp`): d_gate =
// dy · (u + off) · act_α'(g) where gate < limit, d_up = dy · act_α(g) where −limit < up <
// limit (g, u the clamped values; torch's clamp passes no gradient at or past a bound).
extern "C" __global__ void act_grad(const float* dy, const float* pre, float* out, GradParams p) {
    u64 i = global_id();
    u64 cols = p.cols;
    if (!p.glu) {
        if (i < (u64)p.rows * cols) out[i] = dy[i] * act_deriv(pre[i], p.act);
        return;
    }
    u64 width = 2 * cols;
    if (i >= (u64)p.rows * width) return;
    u64 row = i / width, c = i % width;
    const float* r = pre + row * width;
    if (p.clamp) {
        u64 j = c < cols ? c : c - cols;
        float gate = r[j], up = r[cols + j], d = dy[row * cols + j];
        float g = clamp_gate(gate, p.limit);
        if (c < cols) {
            out[i] = gate < p.limit ? d * (clamp_up(up, p.limit) + p.up_offset) * act_scaled_deriv(g, p.act, p.alpha)
                                    : 0.0f;
        } else {
            out[i] = (up > -p.limit && up < p.limit) ? d * act_scaled(g, p.act, p.alpha) : 0.0f;
        }
        return;
    }
    if (c < cols) {
        out[i] = dy[row * cols + c] * r[cols + c] * act_deriv(r[c], p.act);
    } else {
        c -= cols;
        out[i] = dy[row * cols + c] * act(r[c], p.act);
    }
}

// d_yp[rows[t, j]] = weights[t, j] · dy[t − t0]: one thread per (route of a token in
// [t0, t1), column). Route rows are distinct, so every element has one writer; rows no
// route of the range names keep the zeros the backend allocated.
extern "C" __global__ void combine_grad_rows(const float* dy, const int* rows, const float* weights, float* d_yp,
                                             GradParams p) {
    u64 i = global_id();
    u64 cols = p.cols;
    if (i >= (u64)(p.t1 - p.t0) * p.k * cols) return;
    u64 local = i / cols, col = i % cols;
    u64 route = (u64)p.t0 * p.k + local;  // t · k + j with t = t0 + local / k
    int row = rows[route];
    if (row < 0) return;
    d_yp[(u64)row * cols + col] = weights[route] * dy[(local / p.k) * cols + col];
}

// d_w[t, j] = dy[t − t0] · yp[rows[t, j]], summed in column order by one thread per
// route of all S tokens: 0 for dropped routes and tokens outside [t0, t1), so every
// element is written.
extern "C" __global__ void combine_grad_weights(const float* dy, const float* yp, const int* rows, float* d_w,
                                                GradParams p) {
    u64 i = global_id();
    if (i >= (u64)p.rows * p.k) return;
    u64 t = i / p.k, cols = p.cols;
    int row = rows[i];
    float acc = 0.0f;
    if (t >= p.t0 && t < p.t1 && row >= 0) {
        const float* g = dy + (t - p.t0) * cols;
        const float* y = yp + (u64)row * cols;
        for (u64 c = 0; c < cols; c++) acc += g[c] * y[c];
    }
    d_w[i] = acc;
}

// The row a block reduces: blocks fold into y past 65535 (launch.rs `grad_rows`).
__device__ __forceinline__ u64 block_row() { return (u64)blockIdx.x + (u64)blockIdx.y * gridDim.x; }

// Σ of every thread's v over a fixed tree (same pairs whatever the timing), returned to
// every thread; `red` is the block's ROW_WG-float shared scratch.
__device__ __forceinline__ float block_sum(float v, float* red) {
    u32 tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (u32 s = ROW_WG / 2; s > 0; s >>= 1) {
        if (tid < s) red[tid] += red[tid + s];
        __syncthreads();
    }
    float total = red[0];
    __syncthreads();  // before the scratch is reused
    return total;
}

// y = moe · c₀ + mlp · c₁ with c = softmax(coef [R, 2]): d_moe = dy · c₀, d_mlp = dy · c₁,
// d_coef = c ⊙ (a − c · a) with aᵢ = Σ_m dy · (moe, mlp)ᵢ. One block per row.
extern "C" __global__ void __launch_bounds__(ROW_WG) mix_grad(const float* dy, const float* moe, const float* mlp,
                                                              const float* coef, float* d_moe, float* d_mlp,
                                                              float* d_coef, GradParams p) {
    __shared__ float red[ROW_WG];
    u64 row = block_row();
    if (row >= p.rows) return;  // the whole block
    float l0 = coef[2 * row], l1 = coef[2 * row + 1], mx = fmaxf(l0, l1);
    float e0 = expf(l0 - mx), e1 = expf(l1 - mx);
    float c0 = e0 / (e0 + e1), c1 = e1 / (e0 + e1);
    float a0 = 0.0f, a1 = 0.0f;
    u64 base = row * p.cols;
    for (u32 c = threadIdx.x; c < p.cols; c += ROW_WG) {
        float d = dy[base + c];
        d_moe[base + c] = d * c0;
        d_mlp[base + c] = d * c1;
        a0 += d * moe[base + c];
        a1 += d * mlp[base + c];
    }
    a0 = block_sum(a0, red);
    a1 = block_sum(a1, red);
    if (threadIdx.x == 0) {
        float dot = c0 * a0 + c1 * a1;
        d_coef[2 * row] = c0 * (a0 - dot);
        d_coef[2 * row + 1] = c1 * (a1 - dot);
    }
}

// y = a + sigmoid(g) · s: d_shared = dy · sigmoid(g), d_gate = sigmoid'(g) · Σ_m dy · s.
// One block per row.
extern "C" __global__ void __launch_bounds__(ROW_WG) gated_add_grad(const float* dy, const float* shared,
                                                                    const float* gate, float* d_shared,
                                                                    float* d_gate, GradParams p) {
    __shared__ float red[ROW_WG];
    u64 row = block_row();
    if (row >= p.rows) return;  // the whole block
    float s = 1.0f / (1.0f + expf(-gate[row]));
    float a = 0.0f;
    u64 base = row * p.cols;
    for (u32 c = threadIdx.x; c < p.cols; c += ROW_WG) {
        float d = dy[base + c];
        d_shared[base + c] = d * s;
        a += d * shared[base + c];
    }
    a = block_sum(a, red);
    if (threadIdx.x == 0) d_gate[row] = s * (1.0f - s) * a;
}
