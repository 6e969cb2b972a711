//! Where an op's loops run: on the backend's rayon pool, or in order on the calling thread
//! for ops too small to pay for the handoff. Handing a job to the pool and waking the
//! caller when it is done costs about 20 µs on the 2-core dev VM (measured: `permute` of
//! one decode token took 26 µs through the pool, `plan`, which never used it, 2 µs), a
//! tenth of a bf16 decode forward over its six pool ops.

use rayon::prelude::*;

/// Elements an elementwise op (gather, combine, activation) writes below which it runs on
/// the calling thread: 64 Ki f32 is 256 KiB, a copy of some 10 µs on one core, less than
/// the handoff.
pub(crate) const SMALL_OP: usize = 1 << 16;

/// Whether an op's loops run on the pool's threads (`Par(true)`, inside
/// `ThreadPool::install`) or in order on the calling thread (`Par(false)`, where a rayon
/// loop would run on rayon's global pool instead, so ops take this rather than calling
/// rayon themselves).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Par(pub(crate) bool);

impl Par {
    /// `f(i, row)` for every `cols`-element row `i` of `out`.
    pub(crate) fn rows_mut<E: Send>(self, out: &mut [E], cols: usize, f: impl Fn(usize, &mut [E]) + Sync + Send) {
        let cols = cols.max(1);
        if self.0 {
            out.par_chunks_mut(cols).enumerate().for_each(|(i, o)| f(i, o));
        } else {
            out.chunks_mut(cols).enumerate().for_each(|(i, o)| f(i, o));
        }
    }
}
