// The dispatch plan (as shaders/plan.wgsl, whose comments give the layout): counts,
// capacity, priority ranks, slots, offsets, rows and weights, then drop statistics. No
// atomics: every value has one writer, so the plan is deterministic. Every pass takes the
// same arguments (kernel_abi::plan::BINDINGS, the shader's bindings), and the passes run in
// the order and over the thread counts of kernel_abi::plan::PlanSchedule.
//
// scratch: cnt [G·E] | first [G·E] | kept [G·E] | base [G·E] | keep [S·k] | drop [S] | dead [S]
// info:    counts [E] | first_counts [E] | kept_counts [E] | offsets [E + 1] |
//          stats [4] (capacity, dropped routes, masked routes, dropped tokens) | C
// sr:      slots [S·k] | rows [S·k]

#define UNLIMITED 0x7fffffff
#define GE (p.n_groups * p.e)
#define CNT(i) (i)
#define FIRST(i) (GE + (i))
#define KEPT(i) (2 * GE + (i))
#define BASE(i) (3 * GE + (i))
#define KEEP(r) (4 * GE + (r))
#define DROP(t) (4 * GE + p.s * p.k + (t))
#define DEAD(t) (4 * GE + p.s * p.k + p.s + (t))
#define STATS (4 * p.e + 1)
#define CAP (4 * p.e + 5)

// The arguments of every pass.
#define PLAN_ARGS const int* ex, const float* rw, const float* used, const float* priority, int* scratch, int* info, \
    int* sr, float* pw, PlanParams p

// A priority as the plan compares it: NaN ranks lowest, as −inf (the cpu's rule too).
__device__ __forceinline__ float priority_key(float v) {
    return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u ? NEG_INF : v;
}

__device__ __forceinline__ bool valid(const float* used, const PlanParams& p, u32 t) {
    return !p.has_used || used[t] != 0.0f;
}

extern "C" __global__ void plan_count(PLAN_ARGS) {
    u64 i = global_id();
    if (i >= GE) return;
    u32 g = i / p.e;
    int x = i % p.e;
    int c = 0, f = 0;
    for (u32 t = g * p.group; t < (g + 1) * p.group; t++) {
        if (!valid(used, p, t)) continue;
        for (u32 j = 0; j < p.k; j++)
            if (ex[t * p.k + j] == x) { c++; if (j == 0) f++; }
    }
    scratch[CNT(i)] = c;
    scratch[FIRST(i)] = f;
}

extern "C" __global__ void plan_capacity(PLAN_ARGS) {
    if (global_id() != 0) return;
    int max_count = 0;
    for (u32 x = 0; x < p.e; x++) {
        int c = 0, f = 0;
        for (u32 g = 0; g < p.n_groups; g++) { c += scratch[CNT(g * p.e + x)]; f += scratch[FIRST(g * p.e + x)]; }
        info[x] = c;
        info[p.e + x] = f;
        max_count = max(max_count, c);
    }
    int cap = UNLIMITED, report = max_count;
    if (p.cap_rule == 1) { cap = (int)p.cap_value; report = cap; }
    else if (p.cap_rule == 2) { cap = max_count; if (p.clamp) cap = min(cap, (int)p.s); report = cap; }
    int masked = 0;
    for (u32 t = 0; t < p.s; t++) if (!valid(used, p, t)) masked += p.k;
    info[STATS] = report;
    info[STATS + 2] = masked;
    info[CAP] = cap;
}

extern "C" __global__ void plan_rank(PLAN_ARGS) {
    u64 r = global_id();
    if (r >= (u64)p.s * p.k) return;
    u32 t = r / p.k;
    if (!valid(used, p, t)) return;
    int x = ex[r];
    float pr = priority_key(priority[(u64)t * p.e + x]);
    u32 g = t / p.group;
    int ahead = 0;
    for (u32 t2 = g * p.group; t2 < (g + 1) * p.group; t2++) {
        if (!valid(used, p, t2)) continue;
        float p2 = priority_key(priority[(u64)t2 * p.e + x]);
        for (u32 j = 0; j < p.k; j++) {
            u64 r2 = (u64)t2 * p.k + j;
            if (ex[r2] == x && (p2 > pr || (p2 == pr && r2 < r))) ahead++;
        }
    }
    scratch[KEEP(r)] = ahead < info[CAP] ? 1 : 0;
}

extern "C" __global__ void plan_slots(PLAN_ARGS) {
    u64 i = global_id();
    if (i >= GE) return;
    u32 g = i / p.e;
    int x = i % p.e;
    int cap = info[CAP];
    u32 t0 = g * p.group, n = p.group * p.k;
    int seen = 0, kept = 0;
    for (u32 q = 0; q < n; q++) {
        u32 t = t0 + q / p.k, j = q % p.k;
        if (p.keep == 1) { t = t0 + q % p.group; j = q / p.group; }
        u64 r = (u64)t * p.k + j;
        if (!valid(used, p, t) || ex[r] != x) continue;
        bool keep = p.keep == 2 ? scratch[KEEP(r)] == 1 : seen < cap;
        seen++;
        sr[r] = keep ? kept++ : -1;
    }
    scratch[KEPT(i)] = kept;
}

extern "C" __global__ void plan_offsets(PLAN_ARGS) {
    if (global_id() != 0) return;
    int off = 0;
    for (u32 x = 0; x < p.e; x++) {
        info[3 * p.e + x] = off;
        int kept = 0;
        for (u32 g = 0; g < p.n_groups; g++) {
            scratch[BASE(g * p.e + x)] = off + kept;
            kept += scratch[KEPT(g * p.e + x)];
        }
        info[2 * p.e + x] = kept;
        off += kept;
    }
    info[4 * p.e] = off;
}

extern "C" __global__ void plan_finish(PLAN_ARGS) {
    u64 t = global_id();
    if (t >= p.s) return;
    u32 g = t / p.group;
    bool ok = valid(used, p, t);
    u64 sk = (u64)p.s * p.k;
    int drop = 0;
    bool any = false;
    float sum = 0.0f;
    for (u32 j = 0; j < p.k; j++) {
        u64 r = t * p.k + j;
        int x = ex[r];
        int slot = (ok && x >= 0 && (u32)x < p.e) ? sr[r] : -1;
        int row = -1;
        float w = 0.0f;
        if (slot >= 0) { row = scratch[BASE(g * p.e + x)] + slot; w = rw[r]; any = true; }
        else if (ok) drop++;
        sr[r] = slot;
        sr[sk + r] = row;
        pw[r] = w;
        sum += w;
    }
    if (p.renorm) {
        // DeepSpeed: the kept sum clamped at f32 eps.
        float denom = fmaxf(sum, 1.1920929e-7f);
        for (u32 j = 0; j < p.k; j++) pw[t * p.k + j] = pw[t * p.k + j] / denom;
    }
    scratch[DROP(t)] = drop;
    scratch[DEAD(t)] = (ok && !any) ? 1 : 0;
}

extern "C" __global__ void plan_stats(PLAN_ARGS) {
    if (global_id() != 0) return;
    int dropped = 0, dead = 0;
    for (u32 t = 0; t < p.s; t++) { dropped += scratch[DROP(t)]; dead += scratch[DEAD(t)]; }
    info[STATS + 1] = dropped;
    info[STATS + 3] = dead;
}
