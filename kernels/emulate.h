// Host emulation of the CUDA subset the kernels use, so their indexing can be tested
// against the cpu backend on machines with no GPU (backends/cuda/tests/emulated_kernels.rs).
//
// One block runs at a time, its threads as std::threads; `__shared__` becomes `static`
// (one copy, shared by the block's threads, reused by the next block); `__syncthreads`
// is a barrier of the block; a warp-wide `mma.sync.m16n8k16` is a barrier of the warp's
// 32 threads around an exchange of their fragments, laid out as the PTX ISA specifies.
// It checks what the kernel computes, not how fast or whether the PTX assembles: NVRTC's
// compile check (`moe info --compile-kernels`) covers the latter.
//
// Include this, then common.cuh, then the kernel files.

#pragma once
#define MOE_EMULATE 1

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ alignas(16) static
#define __align__(n)
#define __launch_bounds__(n)

using std::max;
using std::min;

inline float __int_as_float(unsigned v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline float __uint_as_float(unsigned v) { return __int_as_float(v); }
inline unsigned __float_as_uint(float f) {
    unsigned v;
    std::memcpy(&v, &f, 4);
    return v;
}

inline float f16_bits_to_float(unsigned short h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}

// cvt.rn.{bf16,f16}.f32: round to nearest even (finite inputs; the tests use no NaN).
template <bool BF16>
inline unsigned short to_half_bits(float v) {
    if (BF16) {
        unsigned u = __float_as_uint(v);
        u += 0x7fffu + ((u >> 16) & 1u);
        return (unsigned short)(u >> 16);
    }
    _Float16 h = (_Float16)v;
    unsigned short bits;
    std::memcpy(&bits, &h, 2);
    return bits;
}

namespace emu {
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
struct Fragments {
    unsigned a[32][4];
    unsigned b[32][2];
};
inline std::vector<Fragments> warp_fragments;
inline std::vector<unsigned> shuffle_slots;

inline float half_value(unsigned short bits, bool bf16) {
    return bf16 ? __uint_as_float(((unsigned)bits) << 16) : f16_bits_to_float(bits);
}

// Runs `kernel()` for every thread of every block of `grid` (blocks one after another).
template <class F>
void launch(dim3 grid, dim3 block, F kernel) {
    gridDim = grid;
    blockDim = block;
    unsigned threads = block.x * block.y * block.z;
    unsigned warps = (threads + 31) / 32;
    warp_barriers.clear();
    for (unsigned w = 0; w < warps; w++)
        warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
    warp_fragments.assign(warps, Fragments{});
    shuffle_slots.assign(32 * warps, 0);
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                std::barrier<> bar(threads);
                block_barrier = &bar;
                std::vector<std::thread> pool;
                for (unsigned t = 0; t < threads; t++)
                    pool.emplace_back([=, &kernel] {
                        threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        blockIdx = dim3{bx, by, bz};
                        kernel();
                    });
                for (auto& th : pool) th.join();
            }
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

// d += A · B for the warp's 16 × 8 × 16 tile: each lane posts its fragment registers, the
// warp meets, each lane rebuilds A and B from all 32 lanes and keeps its four outputs.
template <bool BF16>
inline void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    unsigned lane = threadIdx.x % 32, w = threadIdx.x / 32;
    emu::Fragments& f = emu::warp_fragments[w];
    std::memcpy(f.a[lane], a, sizeof a);
    std::memcpy(f.b[lane], b, sizeof b);
    emu::warp_barriers[w]->arrive_and_wait();
    float A[16][16], B[16][8];
    for (unsigned l = 0; l < 32; l++) {
        unsigned g = l / 4, t = l % 4;
        for (unsigned r = 0; r < 4; r++)
            for (unsigned h = 0; h < 2; h++)
                A[g + (r & 1) * 8][2 * t + h + (r >> 1) * 8] =
                    emu::half_value((unsigned short)(f.a[l][r] >> (16 * h)), BF16);
        for (unsigned r = 0; r < 2; r++)
            for (unsigned h = 0; h < 2; h++)
                B[2 * t + h + r * 8][g] = emu::half_value((unsigned short)(f.b[l][r] >> (16 * h)), BF16);
    }
    emu::warp_barriers[w]->arrive_and_wait();
    unsigned g = lane / 4, t = lane % 4;
    for (unsigned i = 0; i < 4; i++) {
        unsigned row = g + (i >> 1) * 8, col = 2 * t + (i & 1);
        float s = 0.0f;
        for (unsigned kk = 0; kk < 16; kk++) s += A[row][kk] * B[kk][col];
        d[i] += s;
    }
}

// Warp shuffles and barriers: every lane of the warp posts its value, the warp meets,
// each lane reads its partner's, the warp meets again before the slots are reused.
namespace emu {
template <class V>
V shuffle_xor(V v, int off) {
    static_assert(sizeof(V) == 4, "32-bit shuffles only");
    unsigned lane = threadIdx.x % 32, w = threadIdx.x / 32;
    std::memcpy(&shuffle_slots[32 * w + lane], &v, 4);
    warp_barriers[w]->arrive_and_wait();
    V out;
    std::memcpy(&out, &shuffle_slots[32 * w + (lane ^ (unsigned)off)], 4);
    warp_barriers[w]->arrive_and_wait();
    return out;
}
}  // namespace emu

inline float __shfl_xor_sync(unsigned, float v, int off) { return emu::shuffle_xor(v, off); }
inline int __shfl_xor_sync(unsigned, int v, int off) { return emu::shuffle_xor(v, off); }
inline void __syncwarp() { emu::warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

inline unsigned atomicMax(unsigned* p, unsigned v) {
    std::atomic_ref<unsigned> a(*p);
    unsigned old = a.load();
    while (v > old && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}

inline unsigned atomicMin(unsigned* p, unsigned v) {
    std::atomic_ref<unsigned> a(*p);
    unsigned old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}

inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline float __uint2float_rn(unsigned v) { return (float)v; }
// Separate statements keep the host compiler from contracting these into an fma.
inline float __fmul_rn(float a, float b) {
    volatile float r = a * b;
    return r;
}
inline float __fadd_rn(float a, float b) {
    volatile float r = a + b;
    return r;
}
