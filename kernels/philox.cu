// Philox 4x32-10 noise with the counter layout of src/philox.rs: element i of stream
// `stream` under `seed` is word i % 4 of the block with counter [i / 4 lo, i / 4 hi,
// stream, 0] and key [seed lo, seed hi]. Uniforms equal the cpu's bit for bit.

extern "C" __global__ void noise(float* out, NoiseParams p) {
    u64 i = global_id();
    if (i >= p.n) return;
    u64 block = i / 4;
    u32 c0 = (u32)block, c1 = (u32)(block >> 32), c2 = p.stream, c3 = 0;
    u32 k0 = p.seed_lo, k1 = p.seed_hi;
    for (int round = 0; round < 10; round++) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        u32 hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        u32 hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        u32 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    }
    u32 words[4] = {c0, c1, c2, c3};
    u32 w = words[i % 4];
    float u = (__uint2float_rn(w >> 8) + 0.5f) * (1.0f / 16777216.0f);
    float v = u;
    if (p.kind == 1) v = __fadd_rn(1.0f - p.eps, __fmul_rn(2.0f * p.eps, u));
    else if (p.kind == 2) v = -logf(-logf(u));
    out[i] = v;
}
