// Block regrouping of rows (as shaders/regroup.wgsl): output rows
// out_start[j]..out_start[j + 1] are input rows from in_start[j]; the table is
// out_start[0..=B] then in_start[0..B]. One thread per output element, each written once.

extern "C" __global__ void regroup(const float* src, const int* table, float* out, RegroupParams p) {
    u64 i = global_id();
    if (i >= p.n) return;
    u64 q = i / p.cols, col = i % p.cols;
    // The last block starting at or before row q (table[0] = 0 <= q).
    u32 lo = 0, hi = p.blocks;
    while (hi - lo > 1) {
        u32 mid = (lo + hi) / 2;
        if ((u64)table[mid] <= q) lo = mid; else hi = mid;
    }
    u64 row = (u64)table[p.blocks + 1 + lo] + q - (u64)table[lo];
    out[i] = src[row * p.cols + col];
}
