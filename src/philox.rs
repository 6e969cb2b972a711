//! Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
//! the one counter-based generator of the engine. It is written once per backend language
//! (here, `shaders/philox.wgsl`, `kernels/philox.cu`) with the same counter layout, so one
//! seed gives the same noise on every backend.
//!
//! Layout: element `i` of stream `stream` under `seed` is word `i % 4` of the block with
//! counter `[i / 4 (low 32 bits), i / 4 (high 32 bits), stream, 0]` and key
//! `[seed (low 32 bits), seed (high 32 bits)]`.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// One Philox 4x32-10 block: ten rounds over `counter` with `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// `n` raw 32-bit words of stream `stream` under `seed`.
pub fn words(seed: u64, stream: u32, n: usize) -> Vec<u32> {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut out = Vec::with_capacity(n);
    let mut block = 0u64;
    while out.len() < n {
        let w = philox4x32_10([block as u32, (block >> 32) as u32, stream, 0], key);
        let take = (n - out.len()).min(4);
        out.extend_from_slice(&w[..take]);
        block += 1;
    }
    out
}

/// Maps a word to a float in the open interval (0, 1): 24 bits, centred in their cell, so
/// neither 0 nor 1 occurs and `ln` stays finite.
pub fn to_open_unit(w: u32) -> f32 {
    ((w >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0)
}

/// The kinds of noise MoE gating draws.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NoiseKind {
    /// U(0, 1): random token selection priorities.
    Uniform,
    /// U(1 − eps, 1 + eps): multiplicative jitter of the gate input (DeepSpeed eps = 0.01).
    Jitter(f32),
    /// Standard Gumbel, −ln(−ln U): RSample and second-expert sampling.
    Gumbel,
}

/// `n` values of `kind` from stream `stream` under `seed`.
pub fn noise(kind: NoiseKind, seed: u64, stream: u32, n: usize) -> Vec<f32> {
    words(seed, stream, n)
        .into_iter()
        .map(|w| {
            let u = to_open_unit(w);
            match kind {
                NoiseKind::Uniform => u,
                NoiseKind::Jitter(eps) => (1.0 - eps) + 2.0 * eps * u,
                NoiseKind::Gumbel => -(-u.ln()).ln(),
            }
        })
        .collect()
}

/// Stream numbers of the layer's draws, fixed so every backend draws the same numbers.
pub mod streams {
    /// Gate-input jitter.
    pub const JITTER: u32 = 1;
    /// Gumbel noise on the logits.
    pub const GUMBEL: u32 = 2;
    /// Random token selection priorities.
    pub const RTS: u32 = 3;
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors of the Random123 distribution (kat_vectors, philox4x32 10).
    #[test]
    fn known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn noise_ranges_and_streams() {
        let u = noise(NoiseKind::Uniform, 7, streams::RTS, 1001);
        assert!(u.iter().all(|&x| x > 0.0 && x < 1.0));
        let mean: f32 = u.iter().sum::<f32>() / u.len() as f32;
        assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
        let j = noise(NoiseKind::Jitter(0.01), 7, streams::JITTER, 100);
        assert!(j.iter().all(|&x| (0.99..=1.01).contains(&x)));
        let g = noise(NoiseKind::Gumbel, 7, streams::GUMBEL, 100);
        assert!(g.iter().all(|x| x.is_finite()));
        assert_ne!(noise(NoiseKind::Uniform, 7, 1, 4), noise(NoiseKind::Uniform, 7, 2, 4));
        // A prefix of a longer draw is the shorter draw: element i depends only on i.
        assert_eq!(noise(NoiseKind::Uniform, 9, 1, 6)[..], noise(NoiseKind::Uniform, 9, 1, 10)[..6]);
    }
}
