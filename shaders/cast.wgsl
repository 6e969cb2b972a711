// cast_weight: f32 values rounded to f16 or bf16 storage and packed two per u32 word, the
// even element in the low half (the layout backends/wgpu/src/halves.rs `encode` writes and
// the matrix shaders unpack). The input is read as its bit patterns and rounded by integer
// arithmetic, exactly as the `half` crate rounds (what `upload_weight` stores): to nearest
// even; values past the largest half become infinities of their sign; infinities stay;
// NaN becomes a quiet NaN keeping its sign and the payload's top bits. pack2x16float is
// not used: WGSL leaves its result indeterminate for infinities, NaN and values out of
// the f16 range, and does not fix its rounding.
// Bindings: 0 params, 1 input (f32 bits), 2 output words. One invocation per output word;
// the high half of the last word of an odd count is 0, as `encode` pads it.

struct CastParams {
    n: vec2<u32>, // elements (u64 in the ABI; the high word is 0 on wgpu)
    cols: u32,    // unused here
    bf16: u32,    // 1: bf16, 0: f16
}

@group(0) @binding(0) var<uniform> p: CastParams;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

const WG: u32 = 256u;

// The f16 bits of the f32 with bits `v` (half's f32_to_f16_fallback).
fn to_f16(v: u32) -> u32 {
    let sign = v & 0x80000000u;
    let e = v & 0x7f800000u;
    let man = v & 0x007fffffu;
    if e == 0x7f800000u {
        // Infinity (mantissa 0) or NaN (the quiet bit set, the payload's top bits kept).
        var nan_bit = 0u;
        if man != 0u {
            nan_bit = 0x0200u;
        }
        return (sign >> 16u) | 0x7c00u | nan_bit | (man >> 13u);
    }
    let half_sign = sign >> 16u;
    let half_exp = i32(e >> 23u) - 127 + 15;
    if half_exp >= 0x1f {
        return half_sign | 0x7c00u;
    }
    if half_exp <= 0 {
        // Subnormal halves (or zero): the hidden bit joins the mantissa.
        if 14 - half_exp > 24 {
            return half_sign;
        }
        let m = man | 0x00800000u;
        var half_man = m >> u32(14 - half_exp);
        let round_bit = 1u << u32(13 - half_exp);
        if (m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u {
            half_man += 1u;
        }
        return half_sign | half_man;
    }
    let r = half_sign | (u32(half_exp) << 10u) | (man >> 13u);
    let round_bit = 0x1000u;
    if (man & round_bit) != 0u && (man & (3u * round_bit - 1u)) != 0u {
        // A carry out of the mantissa raises the exponent (to infinity past the largest).
        return r + 1u;
    }
    return r;
}

// The bf16 bits of the f32 with bits `v` (half's f32_to_bf16).
fn to_bf16(v: u32) -> u32 {
    if (v & 0x7fffffffu) > 0x7f800000u {
        return (v >> 16u) | 0x0040u;
    }
    let round_bit = 0x8000u;
    if (v & round_bit) != 0u && (v & (3u * round_bit - 1u)) != 0u {
        return (v >> 16u) + 1u;
    }
    return v >> 16u;
}

fn to_half(v: u32) -> u32 {
    if p.bf16 == 1u {
        return to_bf16(v);
    }
    return to_f16(v);
}

@compute @workgroup_size(256)
fn cast_weight(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = gid.x + gid.y * nwg.x * WG;
    let n = p.n.x;
    if w >= n / 2u + (n & 1u) {
        return;
    }
    let i = 2u * w;
    var hi = 0u;
    if i + 1u < n {
        hi = to_half(x[i + 1u]);
    }
    out[w] = to_half(x[i]) | (hi << 16u);
}
