// Fused gating, one warp per token (as shaders/route.wgsl, which runs one invocation per
// token): scores (softmax, sigmoid or sqrt-softplus of the f32 logits), correction bias,
// group-limited top-k, the choice (top-k, DeepSpeed top-2, group-limited, PhiMoE's
// sparsemixer), normalisation (Σ, Σ + eps, max(Σ, floor), p-norm) and route scale. Every
// selection is a warp argmax that prefers the larger value and, on equal values, the
// lower index, so ties go to the lower expert index as on every backend. Up to 1024
// experts and 64 groups. backends/cpu/src/route.rs is the reference.

// Reduces (value, index) across the warp: larger value wins, then lower index.
__device__ __forceinline__ void warp_best(float& v, int& idx) {
    for (int off = 16; off > 0; off >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, off);
        int oi = __shfl_xor_sync(0xffffffffu, idx, off);
        bool take = oi >= 0 && (idx < 0 || ov > v || (ov == v && oi < idx));
        if (take) { v = ov; idx = oi; }
    }
}

__device__ __forceinline__ bool bit(const u32* set, u32 i) { return (set[i >> 5] >> (i & 31)) & 1u; }

extern "C" __global__ void route(const float* logits, const float* bias, const float* noise, float* scores,
                                 int* experts, float* weights, u32* status, RouteParams p) {
    u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    u32 lane = threadIdx.x & 31;
    if (warp >= p.s) return;
    u32 t = warp;
    const float* l = logits + (u64)t * p.e;
    float* sc = scores + (u64)t * p.e;
    const float* nz = noise + (u64)t * p.e;

    // Non-finite inputs: u32 max − the lowest flat index of each, in a zeroed buffer, for
    // the error the host raises (status words: logits, bias, noise; moe_engine::ops::route_check).
    for (u32 i = lane; i < p.e; i += 32) {
        if (!is_finite_f(l[i])) atomicMax(&status[0], 0xffffffffu - (t * p.e + i));
        if (p.has_bias && !is_finite_f(bias[i])) atomicMax(&status[1], 0xffffffffu - i);
        if (p.has_noise && !is_finite_f(nz[i])) atomicMax(&status[2], 0xffffffffu - (t * p.e + i));
    }

    float mx = NEG_INF;
    for (u32 i = lane; i < p.e; i += 32) mx = fmaxf(mx, l[i]);
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (p.score_fn == 0) {
        float sum = 0.0f;
        for (u32 i = lane; i < p.e; i += 32) { float v = expf(l[i] - mx); sc[i] = v; sum += v; }
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        for (u32 i = lane; i < p.e; i += 32) sc[i] = sc[i] / sum;
    } else if (p.score_fn == 1) {
        for (u32 i = lane; i < p.e; i += 32) sc[i] = 1.0f / (1.0f + expf(-l[i]));
    } else {
        for (u32 i = lane; i < p.e; i += 32) sc[i] = sqrt_softplus(l[i]);
    }
    __syncwarp();

    // key(i): what top-k chooses on.
    #define KEY(i) ((p.choice == 0 && p.has_noise) ? l[i] + nz[i] : sc[i] + (p.has_bias ? bias[i] : 0.0f))

    u32 masked[32];
    u32 chosen[32];
    for (int w = 0; w < 32; w++) { masked[w] = 0; chosen[w] = 0; }
    float fill = 0.0f;
    if (p.choice == 2) {
        u32 per = p.e / p.n_group;
        u32 kept_groups[2] = {0, 0};
        float gs_lane[2] = {NEG_INF, NEG_INF};  // group scores, lane g holds group g (and g + 32)
        for (u32 g = 0; g < p.n_group; g++) {
            float v;
            if (p.group_score == 0) {
                float m = NEG_INF;
                for (u32 i = lane; i < per; i += 32) m = fmaxf(m, KEY(g * per + i));
                for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
                v = m;
            } else {
                float a = NEG_INF; int ai = -1;
                for (u32 i = lane; i < per; i += 32) { float kv = KEY(g * per + i); if (ai < 0 || kv > a) { a = kv; ai = (int)i; } }
                warp_best(a, ai);
                float b = NEG_INF; int bi = -1;
                for (u32 i = lane; i < per; i += 32) {
                    if ((int)i == ai) continue;
                    float kv = KEY(g * per + i);
                    if (bi < 0 || kv > b) { b = kv; bi = (int)i; }
                }
                warp_best(b, bi);
                v = a + b;
            }
            if ((g & 31) == lane) gs_lane[g >> 5] = v;
        }
        for (u32 j = 0; j < p.topk_group; j++) {
            float bv = NEG_INF; int bi = -1;
            for (u32 h = 0; h < 2; h++) {
                u32 g = h * 32 + lane;
                if (g < p.n_group && !bit(kept_groups, g) && (bi < 0 || gs_lane[h] > bv)) { bv = gs_lane[h]; bi = (int)g; }
            }
            warp_best(bv, bi);
            kept_groups[bi >> 5] |= 1u << (bi & 31);
        }
        for (u32 i = 0; i < p.e; i++)
            if (!bit(kept_groups, i / per)) masked[i >> 5] |= 1u << (i & 31);
        fill = p.group_score == 0 ? 0.0f : NEG_INF;
    }

    int* ex = experts + (u64)t * p.k;
    if (p.choice == 1) {
        // DeepSpeed top-2: first = argmax(scores); second = argmax(logits [+ noise]) of the rest.
        float fv = NEG_INF; int fi = -1;
        for (u32 i = lane; i < p.e; i += 32) if (fi < 0 || sc[i] > fv) { fv = sc[i]; fi = (int)i; }
        warp_best(fv, fi);
        float sv = NEG_INF; int si = -1;
        for (u32 i = lane; i < p.e; i += 32) {
            if ((int)i == fi) continue;
            float v = l[i] + (p.has_noise ? nz[i] : 0.0f);
            if (si < 0 || v > sv) { sv = v; si = (int)i; }
        }
        warp_best(sv, si);
        if (lane == 0) { ex[0] = fi; if (p.k > 1) ex[1] = si; }
        chosen[fi >> 5] |= 1u << (fi & 31);
    } else if (p.choice == 3) {
        // Sparsemixer (k = 2): the argmax of the logits, then the argmax of the others;
        // each weight is the softmax of the logits its mask keeps around its max, at the
        // max: 1 / Σ exp(x − m) (expert 1 excluded for the second).
        float fv = NEG_INF; int fi = -1;
        for (u32 i = lane; i < p.e; i += 32) if (fi < 0 || l[i] > fv) { fv = l[i]; fi = (int)i; }
        warp_best(fv, fi);
        float sv = NEG_INF; int si = -1;
        for (u32 i = lane; i < p.e; i += 32) {
            if ((int)i == fi) continue;
            if (si < 0 || l[i] > sv) { sv = l[i]; si = (int)i; }
        }
        warp_best(sv, si);
        float s1 = 0.0f, s2 = 0.0f;
        for (u32 i = lane; i < p.e; i += 32) {
            if (mixer_kept(l[i], fv, p.jitter_eps)) s1 += expf(l[i] - fv);
            if ((int)i != fi && mixer_kept(l[i], sv, p.jitter_eps)) s2 += expf(l[i] - sv);
        }
        for (int off = 16; off > 0; off >>= 1) {
            s1 += __shfl_xor_sync(0xffffffffu, s1, off);
            s2 += __shfl_xor_sync(0xffffffffu, s2, off);
        }
        if (lane == 0) {
            ex[0] = fi;
            ex[1] = si;
            // The weights' pass below reads these for choice 3.
            float* w = weights + (u64)t * p.k;
            w[0] = 1.0f / s1;
            w[1] = 1.0f / s2;
        }
    } else {
        for (u32 j = 0; j < p.k; j++) {
            float bv = NEG_INF; int bi = -1;
            for (u32 i = lane; i < p.e; i += 32) {
                if (bit(chosen, i)) continue;
                float v = bit(masked, i) ? fill : KEY(i);
                if (bi < 0 || v > bv) { bv = v; bi = (int)i; }
            }
            warp_best(bv, bi);
            chosen[bi >> 5] |= 1u << (bi & 31);
            if (lane == 0) ex[j] = bi;
        }
    }
    #undef KEY
    __syncwarp();
    if (lane == 0) {
        float* w = weights + (u64)t * p.k;
        float sum = 0.0f, sum_p = 0.0f;
        for (u32 j = 0; j < p.k; j++) {
            u32 c = (u32)ex[j];
            float v = p.choice == 3 ? w[j] : (bit(masked, c) ? 0.0f : sc[c]);
            w[j] = v;
            sum += v;
            if (p.normalize == 4) sum_p += pow_p(v, p.p_norm);
        }
        float denom = 1.0f;
        if (p.normalize == 1) denom = sum;
        if (p.normalize == 2) denom = sum + p.eps;
        if (p.normalize == 3) denom = fmaxf(sum, p.eps);
        if (p.normalize == 4) denom = root_p(sum_p, p.p_norm);
        for (u32 j = 0; j < p.k; j++) {
            float v = w[j];
            if (p.normalize != 0) v = v / denom;
            w[j] = v * p.scale;
        }
    }
}
