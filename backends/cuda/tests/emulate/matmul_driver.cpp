// Runs kernels/matmul.cu and kernels/matmul_tc.cu under kernels/emulate.h with the launch
// configuration of the cuda backend (backend.rs `grouped_impl`), for
// backends/cuda/tests/emulated_kernels.rs.
//
// Input file (little-endian): u32 R, K, N, G, glu, act, wdtype (0 f32, 1 f16, 2 bf16),
// has_bias, tensor_cores; i32 offsets[G + 1]; f32 x[R·K]; weights[G·N·K] (f32 or 16-bit
// patterns); f32 bias[G·N] when has_bias. Output file: f32 out[R·F] (F = N/2 for GLU,
// else N), then f32 pre[R·N] for GLU.

#include "emulate.h"
#include "common.cuh"
#include "matmul.cu"
#include "matmul_tc.cu"

#include <cstdio>

template <class T>
static std::vector<T> read(FILE* f, size_t n) {
    std::vector<T> v(n);
    if (n && fread(v.data(), sizeof(T), n, f) != n) {
        fprintf(stderr, "input truncated\n");
        exit(2);
    }
    return v;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
        return 2;
    }
    FILE* in = fopen(argv[1], "rb");
    if (!in) return 2;
    auto h = read<u32>(in, 9);
    u32 r = h[0], k = h[1], n = h[2], groups = h[3], glu = h[4], act_kind = h[5], wdtype = h[6];
    bool has_bias = h[7], tc = h[8];
    auto offsets = read<int>(in, groups + 1);
    auto x = read<float>(in, (size_t)r * k);
    size_t wn = (size_t)groups * n * k;
    std::vector<float> wf;
    std::vector<u16> wh;
    if (wdtype == 0) wf = read<float>(in, wn); else wh = read<u16>(in, wn);
    std::vector<float> bias = has_bias ? read<float>(in, (size_t)groups * n) : std::vector<float>();
    fclose(in);

    u32 f = glu ? n / 2 : n;
    size_t max_tiles = (r + 63) / 64 + groups;
    std::vector<int> tiles(1 + 3 * max_tiles, 0);
    std::vector<float> out((size_t)r * f, 0.0f), pre(glu ? (size_t)r * n : 0, 0.0f);
    emu::launch(dim3{1, 1, 1}, dim3{1, 1, 1}, [&] { tile_map(offsets.data(), tiles.data(), groups); });
    if ((size_t)tiles[0] > max_tiles) {
        fprintf(stderr, "tile_map wrote %d tiles, room for %zu\n", tiles[0], max_tiles);
        return 1;
    }
    unsigned y = (unsigned)std::clamp<size_t>(max_tiles, 1, 65535);
    dim3 grid{std::max(1u, (f + 63) / 64), y, (unsigned)std::max<size_t>(1, (max_tiles + y - 1) / y)};
    const float* b = has_bias ? bias.data() : nullptr;
    float* p = glu ? pre.data() : nullptr;
    if (tc) {
        if (wdtype == 0) return 2;
        emu::launch(grid, dim3{128, 1, 1}, [&] {
            if (wdtype == 2) grouped_tc_bf16(x.data(), wh.data(), b, tiles.data(), out.data(), p, n, k, glu, act_kind);
            else grouped_tc_f16(x.data(), wh.data(), b, tiles.data(), out.data(), p, n, k, glu, act_kind);
        });
    } else {
        const void* w = wdtype == 0 ? (const void*)wf.data() : (const void*)wh.data();
        emu::launch(grid, dim3{256, 1, 1},
                    [&] { grouped(x.data(), w, b, tiles.data(), out.data(), p, n, k, wdtype, glu, act_kind); });
    }
    FILE* o = fopen(argv[2], "wb");
    if (!o) return 2;
    fwrite(out.data(), sizeof(float), out.size(), o);
    fwrite(pre.data(), sizeof(float), pre.size(), o);
    fclose(o);
    return 0;
}
