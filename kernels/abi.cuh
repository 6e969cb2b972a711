// The kernel ABI (src/kernel_abi/mod.rs): every family's parameter block, passed to the
// kernels by value. Each struct lists the fields of the Rust struct of the same name, in
// the same order (tests/kernel_abi.rs checks), as the WGSL uniforms of shaders/ do. The
// backend prepends this file, after common.cuh, to every family.

struct RouteParams {
    u32 s, e, k, score_fn, choice, has_bias, has_noise, normalize;
    float eps, scale;
    u32 n_group, topk_group, group_score;
    float p_norm, jitter_eps;
    u32 _pad0;
};

struct PlanParams {
    u32 s, k, e, group, n_groups, cap_rule, cap_value, clamp, keep, has_used, renorm, _pad0;
};

struct MatmulParams {
    u32 rows, n, k, groups, has_bias, max_tiles, y_stride, wdtype, g0, g1, c0, c1, glu, act, keep_pre, clamp;
    float limit, alpha, up_offset;
    u32 _pad0;
};

struct ElementwiseParams {
    u64 n;
    u32 cols, act, gated;
    float alpha;
    u32 clamp;
    float limit, glu_alpha, up_offset;
    u32 _pad0, _pad1;
};

struct PermuteParams {
    u64 n;
    u32 cols, k, t0, from_group, groups, _pad0;
};

struct BucketParams {
    u32 s, k, e, slots, t0, t1, fingerprint, _pad1;
};

struct RegroupParams {
    u64 n;
    u32 cols, blocks;
};

struct NoiseParams {
    u64 n;
    u32 seed_lo, seed_hi, stream, kind;
    float eps;
    u32 _pad0;
};

struct StatsParams {
    u32 s, e, _pad0, _pad1;
};

struct CastParams {
    u64 n;
    u32 cols, bf16;
};

// The backward and optimizer families: grad_matmul.cu, grad.cu, route_grad.cu, optim.cu.
struct GradMatmulParams {
    u32 rows, n, k, groups, grouped, wdtype, bias, accumulate, g0, g1, c0, c1, _pad0, _pad1, _pad2, _pad3;
};

struct GradParams {
    u32 rows, cols, k, t0, t1, act, glu, bound, clamp;
    float limit, alpha, up_offset;
};

struct RouteGradParams {
    u32 s, e, k, score_fn, normalize, renorm_kept, has_aux, choice;
    float eps, scale, aux_scale, z_coef, p_norm, jitter_eps;
    u32 _pad0, _pad1;
};

struct OptimParams {
    u32 n, kind, has_m, nesterov;
    float lr, wd, mu, one_minus_damp, w1, beta2, one_minus_b2, eps, step_size, bc2_sqrt, decay, grad_scale;
};
