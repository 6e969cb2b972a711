// The backward's products (backends/cpu/src/grad.rs is the reference): the input gradient
// `linear_dx` (dx [R, K] = dy [R, N] · w[g] [N, K] for the rows of group g, weights stored
// f32/f16/bf16 as matmul.cu reads them) and the weight gradient `weight_grad` (dw[g]
// [N, K] = Σ_{r ∈ g} dy[r]ᵀ x[r]) with its bias gradient `bias_grad` (db[g] [N] = Σ_{r ∈ g}
// dy[r]). Group offsets are read on the device; without them (`grouped` = 0) all rows are
// one group over one dense weight.
//
// Deterministic: every output element is summed by one thread, over the inner index in
// ascending order, with no atomics; the bias gradient sums rows in row order, as the cpu.
// 64 × 64 output tiles, 16-deep inner steps through shared memory, 4 × 4 outputs per
// thread (the layout of matmul.cu `grouped`).

#define GBM 64
#define GBN 64
#define GBK 16

// Rows [start, end) of group g, each bound clamped into [previous end, rows] as matmul.cu
// `tile_map` does: the host checks the offsets, this is the device's own guard, so no
// group leaves the rows or overlaps another whatever the offsets hold.
__device__ __forceinline__ void group_span(const int* offsets, u32 g, const GradMatmulParams& p, int& start,
                                           int& end) {
    int rows = (int)p.rows;
    if (!p.grouped) {
        start = 0;
        end = rows;
        return;
    }
    int prev = 0;
    for (u32 h = 0; h <= g; h++) {
        start = min(max(offsets[h], prev), rows);
        end = min(max(offsets[h + 1], start), rows);
        prev = end;
    }
}

// dx [R, K] = dy [R, N] · w[g] [N, K]. The grid's tiles (y, folded into z) are the groups'
// 64-row tiles in group order, found by a scan of the offsets (ceil(R / 64) + G of them
// at most: launch.rs sizes the grid so); spare tiles exit. Rows past the last group are
// not written: the backend's output is zeroed.
extern "C" __global__ void __launch_bounds__(256) linear_dx(const float* dy, const void* w, const int* offsets,
                                                            float* dx, GradMatmulParams p) {
    __shared__ float ys[GBK][GBM];
    __shared__ float ws[GBK][GBN];
    u32 n = p.n, k = p.k, wdtype = p.wdtype;
    u32 t = blockIdx.y + blockIdx.z * gridDim.y;
    u32 groups = p.grouped ? p.groups : 1;
    u32 g = 0, r0 = 0, r1 = 0;
    bool found = false;
    int prev = 0, rows = (int)p.rows;
    for (u32 h = 0; h < groups && !found; h++) {
        int start = p.grouped ? min(max(offsets[h], prev), rows) : 0;
        int end = p.grouped ? min(max(offsets[h + 1], start), rows) : rows;
        prev = end;
        u32 tiles = (u32)(end - start + GBM - 1) / GBM;
        if (t < tiles) {
            g = h;
            r0 = (u32)start + t * GBM;
            r1 = min(r0 + GBM, (u32)end);
            found = true;
        } else {
            t -= tiles;
        }
    }
    if (!found) return;  // the whole block: no barrier is left waiting
    u32 c0 = blockIdx.x * GBN;
    u32 tx = threadIdx.x % 16, ty = threadIdx.x / 16, tid = threadIdx.x;
    float acc[4][4] = {};
    u64 wbase = (u64)g * n;
    for (u32 n0 = 0; n0 < n; n0 += GBK) {
        #pragma unroll
        for (u32 l = 0; l < 4; l++) {
            u32 idx = tid + l * 256;
            // dy: 16 consecutive inner columns of a row per 16 threads.
            u32 rr = idx / GBK, nn = idx % GBK;
            u32 row = r0 + rr, ny = n0 + nn;
            ys[nn][rr] = (row < r1 && ny < n) ? dy[(u64)row * n + ny] : 0.0f;
            // w[g]: a row of 64 consecutive output columns per 64 threads.
            u32 wn = idx / GBN, cc = idx % GBN;
            u32 nw = n0 + wn, col = c0 + cc;
            ws[wn][cc] = (nw < n && col < k) ? load_weight(w, (wbase + nw) * k + col, wdtype) : 0.0f;
        }
        __syncthreads();
        #pragma unroll
        for (u32 nn = 0; nn < GBK; nn++) {
            float a[4], b[4];
            #pragma unroll
            for (int i = 0; i < 4; i++) { a[i] = ys[nn][ty * 4 + i]; b[i] = ws[nn][tx * 4 + i]; }
            #pragma unroll
            for (int i = 0; i < 4; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
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
            if (col < k) dx[(u64)row * k + col] = acc[i][j];
        }
    }
}

// dw[g] [N, K] = Σ_{r ∈ g} dy[r, n] · x[r, k]: one block per 64 × 64 tile of one group's
// matrix (x: K tiles; y, folded into z: G · ceil(N / 64) tiles, group-major), summing the
// group's rows 16 at a time. Every element of dw is written, an empty group's as zeros.
extern "C" __global__ void __launch_bounds__(256) weight_grad(const float* dy, const float* x, const int* offsets,
                                                              float* dw, GradMatmulParams p) {
    __shared__ float ds[GBK][GBM];
    __shared__ float xs[GBK][GBN];
    u32 n = p.n, k = p.k;
    u32 nb = (n + GBM - 1) / GBM;
    u32 t = blockIdx.y + blockIdx.z * gridDim.y;
    u32 groups = p.grouped ? p.groups : 1;
    if (nb == 0 || t / nb >= groups) return;
    u32 g = t / nb, n0 = (t % nb) * GBM, c0 = blockIdx.x * GBN;
    int start, end;
    group_span(offsets, g, p, start, end);
    u32 tx = threadIdx.x % 16, ty = threadIdx.x / 16, tid = threadIdx.x;
    float acc[4][4] = {};
    for (u32 r = (u32)start; r < (u32)end; r += GBK) {
        #pragma unroll
        for (u32 l = 0; l < 4; l++) {
            // Both tiles: a row of 64 consecutive columns per 64 threads.
            u32 idx = tid + l * 256, rr = idx / GBM, cc = idx % GBM;
            u32 row = r + rr;
            bool in = row < (u32)end;
            ds[rr][cc] = (in && n0 + cc < n) ? dy[(u64)row * n + n0 + cc] : 0.0f;
            xs[rr][cc] = (in && c0 + cc < k) ? x[(u64)row * k + c0 + cc] : 0.0f;
        }
        __syncthreads();
        #pragma unroll
        for (u32 rr = 0; rr < GBK; rr++) {
            float a[4], b[4];
            #pragma unroll
            for (int i = 0; i < 4; i++) { a[i] = ds[rr][ty * 4 + i]; b[i] = xs[rr][tx * 4 + i]; }
            #pragma unroll
            for (int i = 0; i < 4; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    u64 base = (u64)g * n;
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        u32 nr = n0 + ty * 4 + i;
        if (nr >= n) continue;
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            u32 col = c0 + tx * 4 + j;
            if (col < k) dw[(base + nr) * k + col] = acc[i][j];
        }
    }
}

// db[g] [N] = Σ_{r ∈ g} dy[r]: one thread per (group, column), rows in order (as the cpu),
// every element written (0 for an empty group). Same arguments as `weight_grad` (x unread).
extern "C" __global__ void bias_grad(const float* dy, const float* x, const int* offsets, float* db,
                                     GradMatmulParams p) {
    u64 i = global_id();
    u32 groups = p.grouped ? p.groups : 1;
    if (p.n == 0 || i >= (u64)groups * p.n) return;
    u32 g = (u32)(i / p.n), col = (u32)(i % p.n);
    int start, end;
    group_span(offsets, g, p, start, end);
    float acc = 0.0f;
    for (int r = start; r < end; r++) acc += dy[(u64)r * p.n + col];
    db[i] = acc;
}
