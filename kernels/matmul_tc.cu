// Tensor-core products for f16/bf16 weights (sm_80 and later): the grouped expert product
// of matmul.cu on `mma.sync.m16n8k16` with float32 accumulation, the cast that feeds
// cuBLAS's half-precision GEMM, and `cast_weight` (f32 weights to f16/bf16 storage). Activations are rounded to the weights' type on their way
// into shared memory (tensor cores take both operands in one type), as PyTorch's bf16
// models do; f32 weights keep the exact SIMT path in matmul.cu.
//
// Tiles: 64 rows × 64 output columns per block, 32-deep K steps, 4 warps as 2 × 2, each
// warp 32 × 32 = 2 × 4 mma tiles (and the same again for the up half of GLU experts). The
// tile list is matmul.cu's `tile_map` (one expert per tile, no padding to capacity).
//
// Fragment layout of m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating
// point type"), with g = lane / 4 and t = lane % 4, two halves per 32-bit register, the
// lower k in the low half:
//   A (16 × 16, row-major): a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16 × 8, col-major):  b0 = B[2t..][g], b1 = B[2t+8..][g]
//   C (16 × 8, f32):        c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1]
// Both shared tiles keep k contiguous (x as [row][k], weights as [column][k]), so every
// fragment register is one aligned 32-bit shared load.
//
// kernels/emulate.h runs this file on the host (threads for lanes, a software mma) so the
// tests check the indexing against the cpu backend without a GPU.

#define TC_BM 64
#define TC_BN 64
#define TC_BK 32
// Row stride 40 halves (20 words): the 8 row groups × 4 lanes of a fragment load land in
// 32 distinct banks.
#define TC_LD (TC_BK + 8)

#ifndef MOE_EMULATE
// Round to nearest even into the 16-bit type.
template <bool BF16>
__device__ __forceinline__ u16 to_half_bits(float v) {
    u16 h;
    if (BF16) {
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    } else {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    }
    return h;
}

// d += a · b on one 16 × 8 × 16 tile, warp-wide.
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}
#endif

__device__ __forceinline__ u32 ld_pair(const u16* p) { return *(const u32*)p; }

// out [R, N] (or act(gate) · up [R, F] for GLU experts) = x [R, K] · w[g] [N, K]ᵀ (+ bias[g]),
// as matmul.cu `grouped`, with w in f16 (BF16 = false) or bf16.
template <bool BF16>
__device__ void grouped_tc_body(const float* x, const u16* w, const float* bias, const int* tiles, float* out,
                                float* pre, const MatmulParams& p) {
    __shared__ __align__(16) u16 xs[TC_BM][TC_LD];
    __shared__ __align__(16) u16 gs[TC_BN][TC_LD];
    __shared__ __align__(16) u16 us[TC_BN][TC_LD];
    u32 n = p.n, k = p.k, glu = p.glu, act_kind = p.act;
    u32 t = blockIdx.y + blockIdx.z * p.y_stride;
    if ((int)t >= tiles[0]) return;
    u32 g = tiles[1 + 3 * t], r0 = tiles[2 + 3 * t], r1 = tiles[3 + 3 * t];
    u32 f = glu ? n / 2 : n;
    u32 c0 = blockIdx.x * TC_BN;
    u32 tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    u32 wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    u32 gi = lane / 4, ti = lane % 4;
    float acc[2][4][4] = {}, accu[2][4][4] = {};
    u64 wbase = (u64)g * n;
    for (u32 k0 = 0; k0 < k; k0 += TC_BK) {
        // 64 × 32 elements per tile, 128 threads: 16 each, consecutive threads along k.
        for (u32 l = 0; l < (TC_BM * TC_BK) / 128; l++) {
            u32 idx = tid + l * 128, rr = idx / TC_BK, kk = idx % TC_BK;
            u32 row = r0 + rr, kx = k0 + kk, col = c0 + rr;
            xs[rr][kk] = (row < r1 && kx < k) ? to_half_bits<BF16>(x[(u64)row * k + kx]) : (u16)0;
            bool ok = col < f && kx < k;
            gs[rr][kk] = ok ? w[(wbase + col) * k + kx] : (u16)0;
            if (glu) us[rr][kk] = ok ? w[(wbase + f + col) * k + kx] : (u16)0;
        }
        __syncthreads();
        #pragma unroll
        for (u32 ks = 0; ks < TC_BK; ks += 16) {
            u32 a[2][4], b[4][2], bu[4][2];
            #pragma unroll
            for (int i = 0; i < 2; i++) {
                u32 rb = wm + i * 16 + gi, kc = ks + 2 * ti;
                a[i][0] = ld_pair(&xs[rb][kc]);
                a[i][1] = ld_pair(&xs[rb + 8][kc]);
                a[i][2] = ld_pair(&xs[rb][kc + 8]);
                a[i][3] = ld_pair(&xs[rb + 8][kc + 8]);
            }
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                u32 cb = wn + j * 8 + gi, kc = ks + 2 * ti;
                b[j][0] = ld_pair(&gs[cb][kc]);
                b[j][1] = ld_pair(&gs[cb][kc + 8]);
                if (glu) {
                    bu[j][0] = ld_pair(&us[cb][kc]);
                    bu[j][1] = ld_pair(&us[cb][kc + 8]);
                }
            }
            #pragma unroll
            for (int i = 0; i < 2; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++) {
                    mma_16816<BF16>(acc[i][j], a[i], b[j]);
                    if (glu) mma_16816<BF16>(accu[i][j], a[i], bu[j]);
                }
        }
        __syncthreads();
    }
    #pragma unroll
    for (int i = 0; i < 2; i++)
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            u32 row = r0 + wm + i * 16 + gi + h * 8;
            if (row >= r1) continue;
            #pragma unroll
            for (int j = 0; j < 4; j++)
                #pragma unroll
                for (int e = 0; e < 2; e++) {
                    u32 col = c0 + wn + j * 8 + 2 * ti + e;
                    if (col >= f) continue;
                    float v = acc[i][j][2 * h + e] + (p.has_bias ? bias[wbase + col] : 0.0f);
                    if (!glu) {
                        out[(u64)row * n + col] = v;
                        continue;
                    }
                    float u = accu[i][j][2 * h + e] + (p.has_bias ? bias[wbase + f + col] : 0.0f);
                    if (p.keep_pre) {
                        pre[(u64)row * n + col] = v;
                        pre[(u64)row * n + f + col] = u;
                    }
                    out[(u64)row * f + col] = p.clamp ? glu_clamped(v, u, act_kind, p.limit, p.alpha, p.up_offset)
                                                      : act(v, act_kind) * u;
                }
        }
}

extern "C" __global__ void __launch_bounds__(128) grouped_tc_f16(const float* x, const u16* w, const float* bias,
                                                                 const int* tiles, float* out, float* pre,
                                                                 MatmulParams p) {
    grouped_tc_body<false>(x, w, bias, tiles, out, pre, p);
}

extern "C" __global__ void __launch_bounds__(128) grouped_tc_bf16(const float* x, const u16* w, const float* bias,
                                                                  const int* tiles, float* out, float* pre,
                                                                  MatmulParams p) {
    grouped_tc_body<true>(x, w, bias, tiles, out, pre, p);
}

// The cuBLAS half path: x f32 → f16 (bf16 = 0) or bf16 bits, round to nearest even.
extern "C" __global__ void to_half(const float* x, u16* out, CastParams p) {
    u64 i = global_id();
    if (i >= p.n) return;
    out[i] = p.bf16 ? to_half_bits<true>(x[i]) : to_half_bits<false>(x[i]);
}

// out [R, N] = bias broadcast over rows: cuBLAS then accumulates onto it (beta = 1).
extern "C" __global__ void fill_rows(const float* bias, float* out, CastParams p) {
    u64 i = global_id();
    if (i < p.n) out[i] = bias[i % p.cols];
}

// cast_weight: the 16-bit pattern of each f32 (read as its bits), by integer arithmetic
// exactly as the `half` crate rounds (what upload_weight stores), NaN included: to nearest
// even; past the largest half to an infinity of its sign; NaN to a quiet NaN keeping its
// sign and the payload's top bits. cvt.rn is not used: it does not promise those NaN bits.
__device__ __forceinline__ u32 f16_bits_exact(u32 v) {
    u32 sign = v & 0x80000000u, e = v & 0x7f800000u, man = v & 0x007fffffu;
    if (e == 0x7f800000u) return (sign >> 16) | 0x7c00u | (man ? 0x0200u : 0u) | (man >> 13);
    u32 half_sign = sign >> 16;
    int half_exp = (int)(e >> 23) - 127 + 15;
    if (half_exp >= 0x1f) return half_sign | 0x7c00u;
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return half_sign;
        u32 m = man | 0x00800000u;
        u32 half_man = m >> (14 - half_exp);
        u32 round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) && (m & (3u * round_bit - 1u))) half_man += 1u;
        return half_sign | half_man;
    }
    u32 r = half_sign | ((u32)half_exp << 10) | (man >> 13);
    return ((man & 0x1000u) && (man & 0x2fffu)) ? r + 1u : r;
}

__device__ __forceinline__ u32 bf16_bits_exact(u32 v) {
    if ((v & 0x7fffffffu) > 0x7f800000u) return (v >> 16) | 0x0040u;
    return ((v & 0x8000u) && (v & 0x17fffu)) ? (v >> 16) + 1u : v >> 16;
}

extern "C" __global__ void cast_weight(const u32* x, u16* out, CastParams p) {
    u64 i = global_id();
    if (i >= p.n) return;
    out[i] = (u16)(p.bf16 ? bf16_bits_exact(x[i]) : f16_bits_exact(x[i]));
}
