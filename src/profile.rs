//! Op timings: the wall time each front door of [`crate::backend::Backend`] spent in its
//! backend's `run_*` method, summed per op, for the calls this thread makes while a
//! profile is running. Only the outermost op counts (an op a backend runs through
//! another front door, as the cpu's fused MLP does for its second product, is part of the
//! outer op's time). On the cpu, which computes inside `run_*`, that is the op's compute
//! time; on wgpu and cuda, which enqueue, it is the time to enqueue.
//!
//! Off (one thread-local check per op) unless [`start`] was called on this thread.

use std::cell::RefCell;
use std::time::{Duration, Instant};

/// The time spent in one op while a profile ran.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OpTime {
    /// The op's front door (`grouped_mlp`, `route`, ...).
    pub op: &'static str,
    /// Calls.
    pub calls: u64,
    /// Total wall time.
    pub total: Duration,
}

#[derive(Default)]
struct State {
    running: bool,
    depth: u32,
    ops: Vec<OpTime>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Starts (or restarts, emptied) a profile on this thread.
pub fn start() {
    STATE.with(|s| *s.borrow_mut() = State { running: true, ..State::default() });
}

/// Ends this thread's profile and returns its ops in the order they were first called.
pub fn finish() -> Vec<OpTime> {
    STATE.with(|s| std::mem::take(&mut *s.borrow_mut()).ops)
}

/// Runs `f`, adding its wall time to `op` when a profile is running on this thread and no
/// other op is already being timed.
pub(crate) fn time<T>(op: &'static str, f: impl FnOnce() -> T) -> T {
    let outer = STATE.with(|s| {
        let mut s = s.borrow_mut();
        let outer = s.running && s.depth == 0;
        s.depth += u32::from(s.running);
        outer
    });
    if !outer {
        let out = f();
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.depth = s.depth.saturating_sub(u32::from(s.running));
        });
        return out;
    }
    let t0 = Instant::now();
    let out = f();
    let dt = t0.elapsed();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.depth = s.depth.saturating_sub(1);
        match s.ops.iter_mut().find(|o| o.op == op) {
            Some(o) => {
                o.calls += 1;
                o.total += dt;
            }
            None => s.ops.push(OpTime { op, calls: 1, total: dt }),
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_outermost_ops_of_a_running_profile_count() {
        assert_eq!(time("a", || 1), 1);
        assert!(finish().is_empty(), "no profile was running");
        start();
        time("outer", || time("inner", || std::thread::sleep(Duration::from_millis(2))));
        time("outer", || ());
        time("other", || ());
        let ops = finish();
        assert_eq!(ops.iter().map(|o| (o.op, o.calls)).collect::<Vec<_>>(), vec![("outer", 2), ("other", 1)]);
        assert!(ops[0].total >= Duration::from_millis(2));
        assert!(finish().is_empty(), "finish ends the profile");
        time("after", || ());
        assert!(finish().is_empty());
    }
}
