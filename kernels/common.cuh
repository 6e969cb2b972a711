// Shared by every kernel family; the backend prepends it to each .cu file before NVRTC
// compiles it (no CUDA headers are needed: NVRTC's wheel ships none). Inline PTX sits in
// `#ifndef MOE_EMULATE` helpers that kernels/emulate.h replaces on the host.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ bool is_finite_f(float v) {
    return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

#ifndef MOE_EMULATE
__device__ __forceinline__ float f16_bits_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#endif

// Weight storage codes: 0 f32, 1 f16, 2 bf16 (halves packed two per u32, even element low).
__device__ __forceinline__ float load_weight(const void* w, u64 i, u32 dtype) {
    if (dtype == 0) return ((const float*)w)[i];
    u16 h = ((const u16*)w)[i];
    if (dtype == 2) return __uint_as_float(((u32)h) << 16);
    return f16_bits_to_float(h);
}

// erfc with fractional error below 1.2e-7 (Numerical Recipes), as shaders/activation.wgsl.
__device__ __forceinline__ float erfc_approx(float x) {
    float z = fabsf(x);
    float t = 1.0f / (1.0f + 0.5f * z);
    float r = t * expf(-z * z - 1.26551223f + t * (1.00002368f + t * (0.37409196f + t * (0.09678418f +
        t * (-0.18628806f + t * (0.27886807f + t * (-1.13520398f + t * (1.48851587f +
        t * (-0.82215223f + t * 0.17087277f)))))))));
    return x >= 0.0f ? r : 2.0f - r;
}

// Activation codes: 0 gelu (erf), 1 gelu_tanh, 2 relu, 3 silu, 4 identity.
__device__ __forceinline__ float act(float x, u32 kind) {
    switch (kind) {
        case 0: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
        case 1: return 0.5f * x * (1.0f + tanhf(0.7978845608f * (x + 0.044715f * x * x * x)));
        case 2: return fmaxf(x, 0.0f);
        case 3: return x / (1.0f + expf(-x));
        default: return x;
    }
}

// Routing helpers of route.cu and its backward route_grad.cu.

// sqrt(softplus(x)) as torch's F.softplus(x).sqrt() (threshold 20: softplus(x) = x past
// it); below -20 softplus(x) = e^x to f32 precision, so e^(x/2), a normal number where e^x
// would be subnormal (the cpu's sqrt_softplus).
__device__ __forceinline__ float sqrt_softplus(float x) {
    if (x > 20.0f) return sqrtf(x);
    if (x < -20.0f) return expf(0.5f * x);
    return sqrtf(log1pf(expf(x)));
}

// d sqrt(softplus(x)) / dx from x and its score s: sigmoid(x) / 2s, 1 / 2s past torch's
// threshold, s / 2 below -20 where sigmoid = softplus = s² to f32 precision (the cpu's
// sqrt_softplus_grad).
__device__ __forceinline__ float sqrt_softplus_grad(float x, float s) {
    if (x > 20.0f) return 0.5f / s;
    if (x < -20.0f) return 0.5f * s;
    return 1.0f / (1.0f + expf(-x)) / (2.0f * s);
}

// Whether sparsemixer keeps logit x around the max m: PhiMoE masks
// (m - x) / max(|x|, m) > 2 jitter_eps; a zero factor (x = m = 0) is 0/0 in torch, which
// compares false: kept.
__device__ __forceinline__ bool mixer_kept(float x, float m, float jitter_eps) {
    float f = fmaxf(fabsf(x), m);
    return !(f > 0.0f && (m - x) / f > 2.0f * jitter_eps);
}

// w^p of a weight (>= 0) for the p-norm: exact for p = 1 and 2, 0 for a zero weight.
__device__ __forceinline__ float pow_p(float w, float p) {
    if (p == 1.0f) return w;
    if (p == 2.0f) return w * w;
    return w == 0.0f ? 0.0f : powf(w, p);
}

// (Σ w^p)^(1/p) from Σ w^p.
__device__ __forceinline__ float root_p(float sp, float p) {
    if (p == 1.0f) return sp;
    if (p == 2.0f) return sqrtf(sp);
    return sp == 0.0f ? 0.0f : powf(sp, 1.0f / p);
}

// The clamped GLU (moe_engine::GluClamp, as shaders/activation.wgsl): g = min(gate, limit),
// u = clamp(up, −limit, limit), act_α(g) · (u + up_offset), silu's act_α(g) = g / (1 +
// exp(−α·g)). Comparisons rather than fminf / fmaxf, which drop a NaN: a NaN passes
// through as it does through torch's clamp.
__device__ __forceinline__ float clamp_gate(float g, float limit) { return g > limit ? limit : g; }

__device__ __forceinline__ float clamp_up(float u, float limit) {
    return u > limit ? limit : (u < -limit ? -limit : u);
}

__device__ __forceinline__ float act_scaled(float x, u32 kind, float alpha) {
    return kind == 3 ? x / (1.0f + expf(-alpha * x)) : act(x, kind);
}

__device__ __forceinline__ float glu_clamped(float gate, float up, u32 kind, float limit, float alpha,
                                             float up_offset) {
    return act_scaled(clamp_gate(gate, limit), kind, alpha) * (clamp_up(up, limit) + up_offset);
}

__device__ __forceinline__ u64 global_id() {
    return (u64)blockIdx.x * blockDim.x + threadIdx.x + (u64)blockIdx.y * gridDim.x * blockDim.x;
}
