// The router's backward (backends/cpu/src/grad.rs `route_grad` is the reference), one
// warp per token as route.cu, eight tokens per 256-thread block: from the gradient of
// the plan's combine weights d_w [S, k] (and a router loss on the scores, and the Switch
// z-loss) to the gradient of the logits [S, E].
//
// Per token, in the forward's reverse order:
//   plan:      w = kept ? routes.weights : 0 (kept = plan row >= 0); with renorm_kept the
//              plan divided by dc = max(Σ w, FLT_EPSILON), so g = kept ? d_w / dc − through
//              : 0, through = (Σ d_w · w) / dc² when Σ w >= FLT_EPSILON (else 0);
//   route:     g ·= scale; normalisation by d = Σ p[e_j] over live routes (weight != 0),
//              + eps for sum+eps: g = g / d − (Σ g · p[e_j]) / d²;
//   gather:    d_scores[e_j] += g_j for live routes, then + aux_scale · counts[e];
//   scores:    softmax p ⊙ (ds − p · ds), or sigmoid ds · p · (1 − p);
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
    float denom = 1.0f, dot2 = 0.0f;
    if (p.normalize != 0) {
        float sum = 0.0f;
        for (u32 j = 0; j < k; j++) sum += LIVE_SCORE(j);
        denom = p.normalize == 2 ? sum + p.eps : sum;
        for (u32 j = 0; j < k; j++) dot2 += G_SCALED(j) * LIVE_SCORE(j);
    }

    // d scores: zero the row, scatter the live routes in route order (one lane, so equal
    // experts in one token would add in the cpu's order), then the router loss's term.
    for (u32 i = lane; i < e; i += 32) dl[i] = 0.0f;
    __syncwarp();
    if (lane == 0) {
        for (u32 j = 0; j < k; j++) {
            if (rw[j] == 0.0f) continue;
            float g = G_SCALED(j);
            if (p.normalize != 0) g = g / denom - dot2 / (denom * denom);
            dl[ex[j]] += g;
        }
    }
    #undef G_SCALED
    #undef LIVE_SCORE
    __syncwarp();
    if (p.has_aux)
        for (u32 i = lane; i < e; i += 32) dl[i] += p.aux_scale * (float)counts[i];

    // Through the score function (each lane reads and writes only its own columns).
    if (p.score_fn == 0) {
        float part = 0.0f;
        for (u32 i = lane; i < e; i += 32) part += pr[i] * dl[i];
        float dot = warp_sum(part);
        for (u32 i = lane; i < e; i += 32) dl[i] = pr[i] * (dl[i] - dot);
    } else {
        for (u32 i = lane; i < e; i += 32) dl[i] = dl[i] * pr[i] * (1.0f - pr[i]);
    }

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
