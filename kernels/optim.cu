// Optimizer steps and the sum of squares (backends/cpu/src/optim.rs is the reference).
//
// `optim_step`: one thread per element, SGD (momentum, dampening, Nesterov, L2 weight
// decay), Adam and AdamW in the order of operations of torch.optim's single-tensor
// implementations, with the host's scalars (moe_engine::ops::StepRule::scalars). Every
// product and sum is a `__fmul_rn` / `__fadd_rn`, which the compiler may not contract into
// an fma, and divisions and square roots are IEEE-rounded (NVRTC's default
// --prec-div/--prec-sqrt), so a step is the cpu's bit for bit.
//
// `sum_squares`: Σ x² in two passes with no atomics: SS_PARTIALS block sums over a
// grid-strided loop and a fixed tree, then one block adds them up in a fixed tree, so
// the result depends only on x (and its length, which sets the first pass's grid).

// Threads per block of both sum_squares passes (launch.rs `sum_squares_*`).
#define SS_WG 256
// Partial sums between the passes (launch.rs `SUM_SQUARES_PARTIALS`).
#define SS_PARTIALS 1024

__device__ __forceinline__ float fsub_rn(float a, float b) { return __fadd_rn(a, -b); }

// torch's lerp: a + w·(b − a) for |w| < 0.5, else b − (b − a)·(1 − w).
__device__ __forceinline__ float lerp_torch(float a, float b, float w) {
    float diff = fsub_rn(b, a);
    return fabsf(w) < 0.5f ? __fadd_rn(a, __fmul_rn(w, diff)) : fsub_rn(b, __fmul_rn(diff, fsub_rn(1.0f, w)));
}

// Writes the new parameter to p_out and the new state to m_out (SGD with momentum, Adam)
// and v_out (Adam); m and v are read only where the rule keeps them (m: not on SGD's first
// step, `has_m` = 0, where the buffer starts as the gradient). Absent buffers may be null.
extern "C" __global__ void optim_step(const float* param, const float* grad, const float* m, const float* v,
                                      float* p_out, float* m_out, float* v_out, OptimParams p) {
    u64 i = global_id();
    if (i >= p.n) return;
    // × 1 is exact, so the cpu's `scale == 1` shortcut needs no branch here.
    float d = __fmul_rn(grad[i], p.grad_scale);
    float x = param[i];
    if (p.kind == 0) {
        if (p.wd != 0.0f) d = __fadd_rn(d, __fmul_rn(p.wd, x));
        if (p.mu != 0.0f) {
            float buf = p.has_m ? __fadd_rn(__fmul_rn(m[i], p.mu), __fmul_rn(p.one_minus_damp, d)) : d;
            m_out[i] = buf;
            d = p.nesterov ? __fadd_rn(d, __fmul_rn(p.mu, buf)) : buf;
        }
        p_out[i] = __fadd_rn(x, __fmul_rn(-p.lr, d));
        return;
    }
    if (p.kind == 2) {
        x = __fmul_rn(x, p.decay);  // AdamW: decoupled decay first
    } else if (p.wd != 0.0f) {
        d = __fadd_rn(d, __fmul_rn(p.wd, x));
    }
    float mi = lerp_torch(m[i], d, p.w1);
    float vi = __fadd_rn(__fmul_rn(v[i], p.beta2), __fmul_rn(__fmul_rn(p.one_minus_b2, d), d));
    float denom = __fadd_rn(sqrtf(vi) / p.bc2_sqrt, p.eps);
    m_out[i] = mi;
    v_out[i] = vi;
    p_out[i] = __fadd_rn(x, __fmul_rn(-p.step_size, mi) / denom);
}

// Σ over the block's SS_WG threads in a fixed tree; thread 0 gets it.
__device__ __forceinline__ float ss_tree(float v, float* red) {
    u32 tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (u32 s = SS_WG / 2; s > 0; s >>= 1) {
        if (tid < s) red[tid] += red[tid + s];
        __syncthreads();
    }
    return red[0];
}

// Pass 1: partials[b] = Σ x² over elements b·SS_WG + tid + j·gridDim·SS_WG; block 0 also
// zeroes the partials past the grid, so pass 2 reads only values written here.
extern "C" __global__ void __launch_bounds__(SS_WG) sum_squares_partial(const float* x, float* partials,
                                                                        OptimParams p) {
    __shared__ float red[SS_WG];
    float acc = 0.0f;
    u64 stride = (u64)gridDim.x * SS_WG;
    for (u64 i = (u64)blockIdx.x * SS_WG + threadIdx.x; i < p.n; i += stride) acc += x[i] * x[i];
    float total = ss_tree(acc, red);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
    if (blockIdx.x == 0)
        for (u32 b = gridDim.x + threadIdx.x; b < SS_PARTIALS; b += SS_WG) partials[b] = 0.0f;
}

// Pass 2, one block: out[0] = Σ partials (each thread adds its SS_PARTIALS / SS_WG in
// order, then the tree).
extern "C" __global__ void __launch_bounds__(SS_WG) sum_squares_final(const float* partials, float* out,
                                                                      OptimParams p) {
    __shared__ float red[SS_WG];
    float acc = 0.0f;
    for (u32 b = threadIdx.x; b < SS_PARTIALS; b += SS_WG) acc += partials[b];
    float total = ss_tree(acc, red);
    if (threadIdx.x == 0) out[0] = total;
}
