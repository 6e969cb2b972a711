// Philox 4x32-10 noise with the counter layout of src/philox.rs, so one seed gives the
// same numbers as the cpu backend: element i of stream `stream` under `seed` is word
// i % 4 of the block with counter [i / 4, 0, stream, 0] and key [seed lo, seed hi].
// Uniform draws are bitwise equal to the cpu's; jitter and Gumbel apply the same f32
// formulas (log may differ in the last ulp).
//
// Bindings: 0 params, 1 out.

struct NoiseParams {
    n: vec2<u32>, // values (u64 in the ABI; below 2^32 by the front door's check)
    seed_lo: u32,
    seed_hi: u32,
    stream: u32,
    kind: u32,    // 0 uniform, 1 jitter, 2 gumbel
    eps: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: NoiseParams;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

// (high, low) words of the 64-bit product a · b, from 16-bit halves (WGSL has no u64).
fn mulhilo(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    let hi = p11 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
    return vec2<u32>(hi, a * b);
}

fn philox(counter: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = counter;
    var k = key;
    for (var round = 0u; round < 10u; round++) {
        if round > 0u {
            k = k + vec2<u32>(0x9E3779B9u, 0xBB67AE85u);
        }
        let r0 = mulhilo(0xD2511F53u, c.x);
        let r1 = mulhilo(0xCD9E8D57u, c.z);
        c = vec4<u32>(r1.x ^ c.y ^ k.x, r1.y, r0.x ^ c.w ^ k.y, r0.y);
    }
    return c;
}

@compute @workgroup_size(256)
fn noise(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if i >= p.n.x { return; }
    let block = philox(vec4<u32>(i / 4u, 0u, p.stream, 0u), vec2<u32>(p.seed_lo, p.seed_hi));
    let w = block[i % 4u];
    // 24 bits centred in their cell: the open interval (0, 1).
    let u = (f32(w >> 8u) + 0.5) * (1.0 / 16777216.0);
    var v = u;
    if p.kind == 1u {
        v = (1.0 - p.eps) + 2.0 * p.eps * u;
    } else if p.kind == 2u {
        v = -log(-log(u));
    }
    out[i] = v;
}
