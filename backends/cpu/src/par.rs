//! Where an op's loops run: on the backend's rayon pool, or in order on the calling thread
//! for ops too small to pay for the handoff. Handing a job to the pool and waking the
//! caller when it is done costs about 20 µs on the 2-core dev VM (measured: `permute` of
//! one decode token took 26 µs through the pool, `plan`, which never used it, 2 µs), a
//! tenth of a bf16 decode forward over its six pool ops.

use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// `f(state, item)` for every item, with every thread of the current pool taking part:
/// each thread claims the next unclaimed item until none are left, making its `state`
/// (scratch buffers) with `init` on its first item. Called inside `ThreadPool::install`.
///
/// Why not `par_iter().for_each_init`: that hands the items out by work stealing, so a
/// worker takes part only once it wakes and steals (measured on the 2-core dev VM: at
/// T = 1 both experts' tiles ran on one thread, 760 µs each, and a T = 32 forward split
/// its tiles 37/15). `broadcast` queues a job on every thread up front. That alone did
/// not make the second worker run alongside the first: it was queued on the first one's
/// CPU, which the pinning in affinity.rs answers.
pub(crate) fn share<T: Sync, S>(items: &[T], init: impl Fn() -> S + Sync, f: impl Fn(&mut S, &T) + Sync) {
    let next = AtomicUsize::new(0);
    rayon::broadcast(|_| {
        let mut state = None;
        // Relaxed is enough: the counter only hands out indices; the items' results are
        // published by broadcast's join.
        while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
            f(state.get_or_insert_with(&init), item);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn share_runs_every_item_once_and_on_every_thread() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let items: Vec<usize> = (0..64).collect();
        let seen = Mutex::new(Vec::new());
        let threads = Mutex::new(std::collections::BTreeSet::new());
        pool.install(|| {
            share(&items, rayon::current_thread_index, |t, &i| {
                threads.lock().unwrap().insert(*t);
                // The first thread's items wait (up to 10 s, for a loaded test machine)
                // until the other thread has claimed one: both must take part.
                let t0 = std::time::Instant::now();
                while threads.lock().unwrap().len() < 2 && t0.elapsed().as_secs() < 10 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                seen.lock().unwrap().push(i);
            })
        });
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen, items);
        assert_eq!(threads.into_inner().unwrap().len(), 2);
    }
}
