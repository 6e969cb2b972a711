// Grouped expert products for variable group sizes: out [R, N] = x [R, K] · w[g] [N, K]ᵀ
// (+ bias[g]) over compact expert-major rows, with weights stored f32, f16 or bf16 and
// f32 accumulation (the exact-parity path; cuBLAS carries the dense products). 64 × 64
// output tiles, 16-deep K steps through shared memory, 4 × 4 outputs per thread. A tile
// list (expert, first row, end row) built on the device from the offsets means no tile
// spans two experts and no padding to capacity; spare blocks exit at once.

#define BM 64
#define BN 64
#define BK 16

// The tile list. Group bounds are clamped into [previous end, rows], so no tile leaves the
// input whatever the offsets hold (the host checks them; this is the device's own guard).
extern "C" __global__ void tile_map(const int* offsets, int* tiles, MatmulParams p) {
    if (global_id() != 0) return;
    int count = 0, prev = 0, rows = (int)p.rows;
    for (u32 g = 0; g < p.groups; g++) {
        int start = min(max(offsets[g], prev), rows);
        int end = min(max(offsets[g + 1], start), rows);
        prev = end;
        for (int r0 = start; r0 < end; r0 += BM) {
            tiles[1 + 3 * count] = g;
            tiles[2 + 3 * count] = r0;
            tiles[3 + 3 * count] = min(r0 + BM, end);
            count++;
        }
    }
    tiles[0] = count;
}

// glu: 0 plain product; 1 GLU experts (w rows [gate F | up F]), writing act(gate) · up
// [R, F] (with `clamp`, common.cuh `glu_clamped`) and, when `pre` is given, the
// pre-activation [R, 2F], unclamped.
extern "C" __global__ void __launch_bounds__(256) grouped(const float* x, const void* w, const float* bias,
                                                          const int* tiles, float* out, float* pre, MatmulParams p) {
    __shared__ float xs[BK][BM];
    __shared__ float gs[BK][BN];
    __shared__ float us[BK][BN];
    u32 n = p.n, k = p.k, wdtype = p.wdtype, glu = p.glu, act_kind = p.act;
    u32 t = blockIdx.y + blockIdx.z * p.y_stride;
    if ((int)t >= tiles[0]) return;
    u32 g = tiles[1 + 3 * t], r0 = tiles[2 + 3 * t], r1 = tiles[3 + 3 * t];
    u32 f = glu ? n / 2 : n;  // output columns
    u32 c0 = blockIdx.x * BN;
    u32 tx = threadIdx.x % 16, ty = threadIdx.x / 16, tid = threadIdx.x;
    float acc[4][4] = {}, accu[4][4] = {};
    u64 wbase = (u64)g * n;
    for (u32 k0 = 0; k0 < k; k0 += BK) {
        #pragma unroll
        for (u32 l = 0; l < 4; l++) {
            u32 idx = tid + l * 256, rr = idx / BK, kk = idx % BK;
            u32 row = r0 + rr, kx = k0 + kk, col = c0 + rr;
            xs[kk][rr] = (row < r1 && kx < k) ? x[(u64)row * k + kx] : 0.0f;
            bool ok = col < f && kx < k;
            gs[kk][rr] = ok ? load_weight(w, (wbase + col) * k + kx, wdtype) : 0.0f;
            if (glu) us[kk][rr] = ok ? load_weight(w, (wbase + f + col) * k + kx, wdtype) : 0.0f;
        }
        __syncthreads();
        #pragma unroll
        for (u32 kk = 0; kk < BK; kk++) {
            float a[4], b[4], c[4];
            #pragma unroll
            for (int i = 0; i < 4; i++) { a[i] = xs[kk][ty * 4 + i]; b[i] = gs[kk][tx * 4 + i]; c[i] = glu ? us[kk][tx * 4 + i] : 0.0f; }
            #pragma unroll
            for (int i = 0; i < 4; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++) { acc[i][j] += a[i] * b[j]; if (glu) accu[i][j] += a[i] * c[j]; }
        }
        __syncthreads();
    }
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        u32 row = r0 + ty * 4 + i;
        if (row >= r1) continue;
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            u32 col = c0 + tx * 4 + j;
            if (col >= f) continue;
            float v = acc[i][j] + (p.has_bias ? bias[wbase + col] : 0.0f);
            if (!glu) { out[(u64)row * n + col] = v; continue; }
            float u = accu[i][j] + (p.has_bias ? bias[wbase + f + col] : 0.0f);
            if (p.keep_pre) { pre[(u64)row * n + col] = v; pre[(u64)row * n + f + col] = u; }
            out[(u64)row * f + col] =
                p.clamp ? glu_clamped(v, u, act_kind, p.limit, p.alpha, p.up_offset) : act(v, act_kind) * u;
        }
    }
}
