//! The route op's check of its inputs for non-finite values, which GPU backends make on
//! the device and settle at the next download: the status words every backend writes, the
//! error they mean, and the queue of checks waiting to be read.
//!
//! Status words (`kernel_abi::ROUTE_STATUS_WORDS`): word 0, 1, 2 for the logits, the
//! correction bias and the choice noise hold `u32::MAX − i`, with `i` the flat index of the
//! first non-finite value, or 0 when there is none. Kernels keep the first with an atomic
//! max over a zeroed buffer (one per route call, so no host write is needed to reset it);
//! the front door keeps every index below `u32::MAX`.

use crate::error::{Error, Result};
use std::sync::Mutex;

/// The status word of a first non-finite value at flat index `i` (`None`: there is none).
pub fn status_word(first_bad: Option<usize>) -> u32 {
    first_bad.map_or(0, |i| u32::MAX - i as u32)
}

/// The route op's error for its status words; `value(which, index)` reads the flagged
/// element of tensor `which` (0 logits, 1 bias, 2 noise). Logits are reported first.
pub fn route_status(
    status: [u32; 3],
    experts: usize,
    mut value: impl FnMut(usize, usize) -> Result<f32>,
) -> Result<()> {
    let e = experts.max(1);
    let at = |w: u32| (w != 0).then(|| (u32::MAX - w) as usize);
    if let Some(i) = at(status[0]) {
        return Err(Error::NonFiniteLogits { token: i / e, expert: i % e, value: value(0, i)? });
    }
    if let Some(i) = at(status[1]) {
        let value = value(1, i)?;
        return Err(Error::NonFinite { tensor: "e_score_correction_bias".into(), index: vec![i], value });
    }
    if let Some(i) = at(status[2]) {
        let value = value(2, i)?;
        return Err(Error::NonFinite { tensor: "choice noise (gumbel)".into(), index: vec![i / e, i % e], value });
    }
    Ok(())
}

/// One route call's check waiting on the device: its status buffer `S` and the inputs `T`
/// the words index (logits, bias, noise; held so their values can be read back).
pub struct PendingRouteCheck<S, T> {
    /// The call's status words.
    pub status: S,
    /// Logits, bias (if given), noise (if given).
    pub inputs: [Option<T>; 3],
    /// Experts E (the row length of the logits and noise).
    pub experts: usize,
}

/// The route checks enqueued since the last download, in the order the routes ran.
pub struct RouteChecks<S, T> {
    pending: Mutex<Vec<PendingRouteCheck<S, T>>>,
}

impl<S, T> Default for RouteChecks<S, T> {
    fn default() -> Self {
        RouteChecks { pending: Mutex::new(Vec::new()) }
    }
}

impl<S, T> RouteChecks<S, T> {
    /// Queues a route call's check.
    pub fn push(&self, check: PendingRouteCheck<S, T>) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).push(check);
    }

    /// Settles every queued check in order: `words` reads a status buffer, `value` one
    /// element of an input. The first flagged call's error, or `Ok`; the queue is empty
    /// afterwards either way.
    pub fn settle(
        &self,
        mut words: impl FnMut(&S) -> Result<[u32; 3]>,
        mut value: impl FnMut(&T, usize) -> Result<f32>,
    ) -> Result<()> {
        let checks = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for c in &checks {
            route_status(words(&c.status)?, c.experts, |which, i| {
                let t = c.inputs[which].as_ref().ok_or_else(|| Error::Internal("a flag on an unbound input".into()))?;
                value(t, i)
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_flagged_call_is_reported_and_the_queue_empties() {
        let checks: RouteChecks<[u32; 3], Vec<f32>> = RouteChecks::default();
        let clean = [0; 3];
        checks.push(PendingRouteCheck { status: clean, inputs: [Some(vec![1.0; 8]), None, None], experts: 4 });
        let mut bad = vec![0.0; 6];
        bad[5] = f32::NAN;
        let flagged = [status_word(Some(5)), 0, 0];
        checks.push(PendingRouteCheck { status: flagged, inputs: [Some(bad), None, None], experts: 3 });
        match checks.settle(|s| Ok(*s), |t, i| Ok(t[i])) {
            Err(Error::NonFiniteLogits { token: 1, expert: 2, value }) => assert!(value.is_nan()),
            other => panic!("{other:?}"),
        }
        checks.settle(|_| panic!("the queue was emptied"), |_, _| Ok(0.0)).unwrap();
        assert_eq!(status_word(None), 0);
        assert_eq!(status_word(Some(0)), u32::MAX);
    }
}
