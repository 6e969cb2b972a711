// Runs a sequence of kernel launches from every family under kernels/emulate.h, for the
// tests that replay the cuda backend's launches on the host (tests/emulate/mod.rs writes
// the script and reads the buffers back).
//
// Script (little-endian): u32 buffer count, then per buffer u64 byte length and the bytes;
// u32 launch count, then per launch u32 name length, the name, u32 grid[3], u32 block[3],
// u32 argument count, then per argument u32 kind: 0 a buffer (u32 index), 1 a null
// pointer, 2 a value (u32 byte length, the bytes; the length must be the parameter's
// size). Output: every buffer's bytes, in order.

#include "emulate.h"
#include "common.cuh"
#include "abi.cuh"
#include "bucket.cu"
#include "elementwise.cu"
#include "grad.cu"
#include "grad_matmul.cu"
#include "matmul.cu"
#include "matmul_tc.cu"
#include "optim.cu"
#include "permute.cu"
#include "philox.cu"
#include "plan.cu"
#include "regroup.cu"
#include "route.cu"
#include "route_grad.cu"
#include "stats.cu"

#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <tuple>

struct Arg {
    unsigned kind = 1;
    void* ptr = nullptr;
    std::vector<unsigned char> bytes;
};

static void fail(const std::string& msg) {
    fprintf(stderr, "%s\n", msg.c_str());
    exit(1);
}

template <class P>
static P take(const std::vector<Arg>& args, size_t& i) {
    const Arg& a = args.at(i++);
    if constexpr (std::is_pointer_v<P>) {
        if (a.kind == 2) fail("argument " + std::to_string(i - 1) + ": a value where a pointer is expected");
        return (P)a.ptr;
    } else {
        if (a.kind != 2 || a.bytes.size() != sizeof(P))
            fail("argument " + std::to_string(i - 1) + ": expected a value of " + std::to_string(sizeof(P)) + " bytes");
        P v;
        std::memcpy(&v, a.bytes.data(), sizeof(P));
        return v;
    }
}

using Kernel = std::function<void(const std::vector<Arg>&)>;

template <class... P>
static Kernel bind(void (*f)(P...)) {
    return [f](const std::vector<Arg>& args) {
        if (args.size() != sizeof...(P)) fail("wrong argument count");
        size_t i = 0;
        std::tuple<P...> t{take<P>(args, i)...};  // braces: arguments taken left to right
        std::apply(f, t);
    };
}

static std::map<std::string, Kernel> registry() {
    return {
        {"activation", bind(activation)},     {"glu", bind(glu)},
        {"mul", bind(mul)},                   {"add_gated", bind(add_gated)},
        {"scale", bind(scale)},               {"add_bias", bind(add_bias)},
        {"residual_mix", bind(residual_mix)}, {"tile_map", bind(tile_map)},
        {"grouped", bind(grouped)},           {"grouped_tc_f16", bind(grouped_tc_f16)},
        {"grouped_tc_bf16", bind(grouped_tc_bf16)}, {"to_half", bind(to_half)},
        {"fill_rows", bind(fill_rows)},       {"cast_weight", bind(cast_weight)},
        {"permute", bind(permute)},           {"permute_scaled", bind(permute_scaled)},
        {"pass_rows", bind(pass_rows)},
        {"combine", bind(combine)},           {"noise", bind(noise)},
        {"plan_count", bind(plan_count)},     {"plan_capacity", bind(plan_capacity)},
        {"plan_rank", bind(plan_rank)},       {"plan_slots", bind(plan_slots)},
        {"plan_offsets", bind(plan_offsets)}, {"plan_finish", bind(plan_finish)},
        {"plan_stats", bind(plan_stats)},     {"route", bind(route)},
        {"router_stats", bind(router_stats)}, {"bucket_clear", bind(bucket_clear)},
        {"bucket_invert", bind(bucket_invert)}, {"bucket_rank", bind(bucket_rank)},
        {"bucket_offsets", bind(bucket_offsets)}, {"bucket_rows", bind(bucket_rows)},
        {"regroup", bind(regroup)},
        {"linear_dx", bind(linear_dx)},       {"weight_grad", bind(weight_grad)},
        {"bias_grad", bind(bias_grad)},       {"act_grad", bind(act_grad)},
        {"combine_grad_rows", bind(combine_grad_rows)}, {"combine_grad_weights", bind(combine_grad_weights)},
        {"mix_grad", bind(mix_grad)},         {"gated_add_grad", bind(gated_add_grad)},
        {"route_grad", bind(route_grad)},     {"optim_step", bind(optim_step)},
        {"sum_squares_partial", bind(sum_squares_partial)}, {"sum_squares_final", bind(sum_squares_final)},
    };
}

template <class T>
static T rd(FILE* f) {
    T v;
    if (fread(&v, sizeof v, 1, f) != 1) fail("script truncated");
    return v;
}

static std::vector<unsigned char> rd_bytes(FILE* f, size_t n) {
    std::vector<unsigned char> v(n);
    if (n && fread(v.data(), 1, n, f) != n) fail("script truncated");
    return v;
}

int main(int argc, char** argv) {
    if (argc != 3) fail("usage: launch_driver SCRIPT OUT");
    FILE* in = fopen(argv[1], "rb");
    if (!in) fail("cannot open the script");
    std::vector<std::vector<unsigned char>> buffers(rd<unsigned>(in));
    for (auto& b : buffers) {
        b = rd_bytes(in, rd<unsigned long long>(in));
        b.resize(b.size() + 16);  // slack, so a zero-length buffer still has an address
    }
    auto kernels = registry();
    unsigned launches = rd<unsigned>(in);
    for (unsigned l = 0; l < launches; l++) {
        auto name_bytes = rd_bytes(in, rd<unsigned>(in));
        std::string name(name_bytes.begin(), name_bytes.end());
        dim3 grid{rd<unsigned>(in), rd<unsigned>(in), rd<unsigned>(in)};
        dim3 block{rd<unsigned>(in), rd<unsigned>(in), rd<unsigned>(in)};
        std::vector<Arg> args(rd<unsigned>(in));
        for (auto& a : args) {
            a.kind = rd<unsigned>(in);
            if (a.kind == 0) {
                unsigned idx = rd<unsigned>(in);
                if (idx >= buffers.size()) fail(name + ": no buffer " + std::to_string(idx));
                a.ptr = buffers[idx].data();
            } else if (a.kind == 2) {
                a.bytes = rd_bytes(in, rd<unsigned>(in));
            }
        }
        auto k = kernels.find(name);
        if (k == kernels.end()) fail("no kernel " + name);
        emu::launch(grid, block, [&] { k->second(args); });
    }
    fclose(in);
    FILE* out = fopen(argv[2], "wb");
    if (!out) fail("cannot write the output");
    for (auto& b : buffers) fwrite(b.data(), 1, b.size() - 16, out);
    fclose(out);
    return 0;
}
