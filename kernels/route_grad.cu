// The router's backward (backends/cpu/src/grad.rs `route_grad` is the reference), one
// warp per token as route.cu, eight tokens per 256-thread block: from the gradient of
// the plan's combine weights d_w [S, k] (and a router loss on the scores, and the Switch
// z-loss) to the gradient of the logits [S, E].
//
// Per token, in the forward's reverse order:
//   plan:      w = kept ? routes.weights : 0 (kept = plan row >= 0); with renorm_kept the
//              plan divided by dc = max(Σ w, FLT_EPSILON), so g = kept ? d_w / dc − through
//              : 0, through = (Σ d_w · w) / dc² when Σ w >= FLT_EPSILON (else 0);
//   route:     g ·= scale; normalisation by d of w_j = p[e_j] over live routes (weight
//              != 0): Σ w, Σ w + eps, max(Σ w, floor) or (Σ w^p)^(1/p):
//              g = g / d − (Σ g · w) / d² · ∂d/∂w_j (1 for the sums, 1 or 0 as the floored
//              sum is past the floor or not, (w_j / d)^(p−1) for the p-norm);
//   gather:    d_scores[e_j] += g_j for live routes, then + aux_scale · counts[e];
//   scores:    softmax p ⊙ (ds − p · ds), sigmoid ds · p · (1 − p), or sqrt-softplus
//              ds · sigmoid(x) / 2p (1 / 2p past 20, p / 2 below −20);
//   sparsemixer (choice 3, instead of the gather): weight j is q[e_j], q the softmax of
//              the logits its mask keeps around m = x[e_j] (expert 1 excluded for j = 1),
//              so d x_i += g_j · w_j · (δ(i, e_j) − q_i) over the kept;
//   z-loss:    + 2 · z_coef · lse / S · softmax(logits).
// The k-long sums are sequences over j, as the cpu's, computed by every lane alike
// (broadcast loads); no per-route array is kept, so k and E (at most 1024) need no local
// memory. The output row is the scatter's scratch. E-long sums are warp trees.

#define FLT_EPS_F32 1.1920928955078125e-7f

__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// ∂d/∂w of the normaliser d for a live weight w (sum of the live weights `sum`); see the
// cpu's norm_slope: torch's clamp(min=) passes no gradient at sum = floor, and its norm
// backward gives a zero weight 0.
__device__ __forceinline__ float norm_slope(const RouteGradParams& p, float w, float sum, float d) {
    if (p.normalize == 3) return sum > p.eps ? 1.0f : 0.0f;
    if (p.normalize == 4) {
        if (p.p_norm == 1.0f) return 1.0f;
        if (w == 0.0f) return 0.0f;
        if (p.p_norm == 2.0f) return w / d;
        return powf(w / d, p.p_norm - 1.0f);
    }
    return 1.0f;
}

extern "C" __global__ void route_grad(const float* d_weights, const int* experts, const float* route_weights,
                                      const float* scores, const int* rows, const float* logits, const int* counts,
                                      float* out, RouteGradParams p) {
    u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    u32 lane = threadIdx.x & 31;
    if (warp >= p.s) return;  // the whole warp
    u32 k = p.k, e = p.e;
    u64 base = warp * k;
    const float* dw = d_weights + base;
    const int* ex = experts + base;
    const float* rw = route_weights + base;
    const int* kept = rows + base;
    const float* pr = scores + warp * e;
    float* dl = out + warp * e;

    // The plan's renormalisation of the kept weights.
    float dc = 1.0f, through = 0.0f;
    if (p.renorm_kept) {
        float d2 = 0.0f, dot = 0.0f;
        for (u32 j = 0; j < k; j++) d2 += kept[j] >= 0 ? rw[j] : 0.0f;
        for (u32 j = 0; j < k; j++) dot += dw[j] * (kept[j] >= 0 ? rw[j] : 0.0f);
        dc = fmaxf(d2, FLT_EPS_F32);
        through = d2 >= FLT_EPS_F32 ? dot / (dc * dc) : 0.0f;
    }
    // g after the plan and the route scale.
    #define G_SCALED(j) \
        ((kept[j] >= 0 ? (p.renorm_kept ? dw[j] / dc - through : dw[j]) : 0.0f) * p.scale)
    // The route's normalisation over live routes.
    #define LIVE_SCORE(j) (rw[j] != 0.0f ? pr[ex[j]] : 0.0f)
    float denom = 1.0f, dot2 = 0.0f, sum = 0.0f;
    if (p.normalize != 0) {
        float sum_p = 0.0f;
        for (u32 j = 0; j < k; j++) sum += LIVE_SCORE(j);
        for (u32 j = 0; j < k; j++) sum_p += pow_p(LIVE_SCORE(j), p.p_norm);
        denom = sum;
        if (p.normalize == 2) denom = sum + p.eps;
        if (p.normalize == 3) denom = fmaxf(sum, p.eps);
        if (p.normalize == 4) denom = root_p(sum_p, p.p_norm);
        for (u32 j = 0; j < k; j++) dot2 += G_SCALED(j) * LIVE_SCORE(j);
    }

    // d scores: zero the row, scatter the live routes in route order (one lane, so equal
    // experts in one token would add in the cpu's order), then the router loss's term.
    // Sparsemixer's weights are not gathered scores: they go back through their own
    // softmax below.
    for (u32 i = lane; i < e; i += 32) dl[i] = 0.0f;
    __syncwarp();
    if (lane == 0 && p.choice != 3) {
        for (u32 j = 0; j < k; j++) {
            if (rw[j] == 0.0f) continue;
            float g = G_SCALED(j);
            if (p.normalize != 0) g = g / denom - dot2 / (denom * denom) * norm_slope(p, LIVE_SCORE(j), sum, denom);
            dl[ex[j]] += g;
        }
    }
    __syncwarp();
    if (p.has_aux)
        for (u32 i = lane; i < e; i += 32) dl[i] += p.aux_scale * (float)counts[i];

    // Through the score function (each lane reads and writes only its own columns).
    if (p.score_fn == 0) {
        float part = 0.0f;
        for (u32 i = lane; i < e; i += 32) part += pr[i] * dl[i];
        float dot = warp_sum(part);
        for (u32 i = lane; i < e; i += 32) dl[i] = pr[i] * (dl[i] - dot);
    } else if (p.score_fn == 1) {
        for (u32 i = lane; i < e; i += 32) dl[i] = dl[i] * pr[i] * (1.0f - pr[i]);
    } else {
        // sqrt-softplus from the logit and the score (the cpu's sqrt_softplus_grad).
        const float* l = logits + warp * e;
        for (u32 i = lane; i < e; i += 32) dl[i] = dl[i] * sqrt_softplus_grad(l[i], pr[i]);
    }

    // Sparsemixer: each live route through its masked softmax (normalisation is none: the
    // route op refuses any other). Every lane holds the route's g and m alike.
    if (p.choice == 3) {
        const float* l = logits + warp * e;
        for (u32 j = 0; j < k; j++) {
            if (rw[j] == 0.0f) continue;
            float g = G_SCALED(j);
            int c = ex[j];
            int skip = j == 1 ? ex[0] : -1;
            float m = l[c];
            float part = 0.0f;
            for (u32 i = lane; i < e; i += 32)
                if ((int)i != skip && mixer_kept(l[i], m, p.jitter_eps)) part += expf(l[i] - m);
            float msum = warp_sum(part);
            float wj = 1.0f / msum;
            for (u32 i = lane; i < e; i += 32) {
                if ((int)i != skip && mixer_kept(l[i], m, p.jitter_eps)) {
                    float q = expf(l[i] - m) / msum;
                    dl[i] += g * wj * (((int)i == c ? 1.0f : 0.0f) - q);
                }
            }
        }
    }
    #undef G_SCALED
    #undef LIVE_SCORE

    // The Switch z-loss, mean_s lse²: d / d logits = 2 · lse · softmax / S.
    if (p.z_coef != 0.0f) {
        const float* l = logits + warp * e;
        float mx = NEG_INF;
        for (u32 i = lane; i < e; i += 32) mx = fmaxf(mx, l[i]);
        mx = warp_max(mx);
        float part = 0.0f;
        for (u32 i = lane; i < e; i += 32) part += expf(l[i] - mx);
        float sum = warp_sum(part);
        float lse = mx + logf(sum);
        float c = p.z_coef * 2.0f * lse / (float)p.s;
        for (u32 i = lane; i < e; i += 32) dl[i] += c * expf(l[i] - mx) / sum;
    }
}
