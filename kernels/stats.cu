// Router reductions (as shaders/stats.wgsl): out [E + 1] = mean score per expert, then
// the mean of logsumexp(logits)²; one thread per output, f64 sums as the cpu reference.

extern "C" __global__ void router_stats(const float* logits, const float* scores, float* out, StatsParams p) {
    u32 s = p.s, e = p.e;
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i > e) return;
    double sum = 0.0;
    for (u32 t = 0; t < s; t++) {
        if (i < e) {
            sum += (double)scores[(u64)t * e + i];
        } else {
            const float* row = logits + (u64)t * e;
            float mx = row[0];
            for (u32 j = 1; j < e; j++) mx = fmaxf(mx, row[j]);
            double acc = 0.0;
            for (u32 j = 0; j < e; j++) acc += exp((double)row[j] - (double)mx);
            double lse = (double)mx + log(acc);
            sum += lse * lse;
        }
    }
    out[i] = (float)(sum / (double)(s > 0 ? s : 1));
}
