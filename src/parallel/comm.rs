//! Communicators: the control plane of a group of ranks (small host values: split
//! colours, ids, barriers, scalar reductions). The rows themselves move through a
//! [`super::Transport`], which moves device tensors. The in-process communicator here runs
//! N ranks as threads; every collective has a deadline, so a rank that errors or stops
//! makes its peers return [`Error::Communication`] instead of hanging.

use crate::error::{Error, Result};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The control plane of a group of ranks: small host values. The expert-parallel rows
/// move through [`super::Transport`] (device tensors), whose implementors are
/// communicators too.
pub trait Communicator: Send + Sync {
    /// This rank, `0..size`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Every rank's `data`, indexed by rank.
    fn all_gather(&self, data: Vec<u8>) -> Result<Vec<Vec<u8>>>;

    /// Splits the group (collectively: every rank calls it): ranks passing the same
    /// `color` form a new group of the same kind, ordered by `key` then by rank.
    /// DeepSpeed's expert-parallel and expert-data-parallel groups are such splits
    /// ([`ExpertGroups`]).
    fn split(&self, color: usize, key: usize) -> Result<Self>
    where
        Self: Sized;

    /// Returns when every rank has reached it.
    fn barrier(&self) -> Result<()> {
        self.all_gather(Vec::new()).map(|_| ())
    }
    /// Largest `v` over the ranks (dropless capacity agreed across the group).
    fn all_reduce_max(&self, v: u64) -> Result<u64> {
        let all = self.all_gather(v.to_le_bytes().to_vec())?;
        Ok(all.iter().map(|b| u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]))).max().unwrap_or(v))
    }
    /// Elementwise sum over the ranks, in rank order (the same result on every rank).
    fn all_reduce_sum(&self, v: &[f32]) -> Result<Vec<f32>> {
        let all = self.all_gather(bytemuck::cast_slice(v).to_vec())?;
        let mut out = vec![0f32; v.len()];
        for b in &all {
            let part: Vec<f32> = bytemuck::pod_collect_to_vec(b);
            if part.len() != v.len() {
                return Err(Error::Communication { rank: self.rank(), msg: "all_reduce_sum: lengths differ".into() });
            }
            for (o, p) in out.iter_mut().zip(part) {
                *o += p;
            }
        }
        Ok(out)
    }
}

/// DeepSpeed's expert-parallel layout of a world of `world` ranks with `ep_size` ranks
/// per expert-parallel group: expert-parallel groups are contiguous blocks of `ep_size`
/// ranks; expert-data-parallel groups take the ranks at the same position in every block
/// (they hold the same experts and all-reduce their gradients).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertGroups {
    /// Ranks of each expert-parallel group.
    pub ep: Vec<Vec<usize>>,
    /// Ranks of each expert-data-parallel group.
    pub edp: Vec<Vec<usize>>,
}

impl ExpertGroups {
    /// `ep_size` must divide `world`.
    pub fn new(world: usize, ep_size: usize) -> Result<Self> {
        if ep_size == 0 || !world.is_multiple_of(ep_size) {
            return Err(Error::config("ep_size", format!("{ep_size} must divide the world size {world}")));
        }
        let blocks = world / ep_size;
        Ok(ExpertGroups {
            ep: (0..blocks).map(|b| (b * ep_size..(b + 1) * ep_size).collect()).collect(),
            edp: (0..ep_size).map(|i| (0..blocks).map(|b| b * ep_size + i).collect()).collect(),
        })
    }

    /// Splits `world` into this rank's (expert-parallel, expert-data-parallel) groups.
    pub fn split<C: Communicator>(world: &C, ep_size: usize) -> Result<(C, C)> {
        Self::new(world.size(), ep_size)?;
        let r = world.rank();
        let ep = world.split(r / ep_size, r)?;
        let edp = world.split(r % ep_size, r)?;
        Ok((ep, edp))
    }
}

/// `timeout` from now; a timeout too long to represent waits as long as the clock can
/// count (centuries), rather than overflowing.
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).or_else(|| now.checked_add(Duration::from_secs(u32::MAX as u64))).unwrap_or(now)
}

struct Msg {
    from: usize,
    /// Collective number and phase, so messages of different collectives never mix.
    tag: (u64, u8),
    data: Vec<u8>,
}

/// One rank of an in-process group: channels to every rank, a deadline per collective.
pub struct InProcessComm {
    /// Identifies the group, so concurrent splits of different groups never mix.
    group: u64,
    rank: usize,
    size: usize,
    peers: Vec<Sender<Msg>>,
    inbox: Mutex<(Receiver<Msg>, Vec<Msg>)>,
    seq: Mutex<u64>,
    timeout: Duration,
}

/// A group of `n` in-process ranks; move one to each thread. A collective that does not
/// complete within `timeout` (a peer errored, stopped or is stuck) returns an error.
pub fn in_process(n: usize, timeout: Duration) -> Vec<InProcessComm> {
    static NEXT_GROUP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let group = NEXT_GROUP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| channel::<Msg>()).unzip();
    receivers
        .into_iter()
        .enumerate()
        .map(|(rank, rx)| InProcessComm {
            group,
            rank,
            size: n,
            peers: senders.clone(),
            inbox: Mutex::new((rx, Vec::new())),
            seq: Mutex::new(0),
            timeout,
        })
        .collect()
}

impl InProcessComm {
    /// Variable all-to-all of host bytes: `send[dst]` goes to rank `dst`; returns what each
    /// rank sent here, indexed by source. One round: a message carries its own length, so
    /// the receiver (which knows what it expects, as a [`super::Transport`] exchange does)
    /// checks it. How this communicator stages a transport exchange.
    pub fn all_to_all_v(&self, mut send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if send.len() != self.size {
            return Err(self.fail(format!("all_to_all_v: {} buffers for {} ranks", send.len(), self.size)));
        }
        let seq = self.next_seq();
        for to in (0..self.size).filter(|&r| r != self.rank) {
            self.send(to, (seq, 1), std::mem::take(&mut send[to]))?;
        }
        let rows = self.gather_tagged((seq, 1), "all_to_all_v")?;
        Ok(rows
            .into_iter()
            .enumerate()
            .map(|(src, data)| if src == self.rank { std::mem::take(&mut send[src]) } else { data.unwrap_or_default() })
            .collect())
    }

    fn next_seq(&self) -> u64 {
        let mut s = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        *s += 1;
        *s
    }

    fn fail(&self, msg: String) -> Error {
        Error::Communication { rank: self.rank, msg }
    }

    fn send(&self, to: usize, tag: (u64, u8), data: Vec<u8>) -> Result<()> {
        self.peers[to]
            .send(Msg { from: self.rank, tag, data })
            .map_err(|_| self.fail(format!("rank {to} has stopped (its end of the channel is closed)")))
    }

    /// One message per rank other than this one, with `tag`, indexed by source.
    fn gather_tagged(&self, tag: (u64, u8), what: &str) -> Result<Vec<Option<Vec<u8>>>> {
        let deadline = deadline_after(self.timeout);
        let mut got: Vec<Option<Vec<u8>>> = vec![None; self.size];
        let mut inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        let (rx, early) = &mut *inbox;
        // Messages that arrived during an earlier collective's wait.
        let mut i = 0;
        while i < early.len() {
            if early[i].tag == tag {
                let m = early.swap_remove(i);
                got[m.from] = Some(m.data);
            } else {
                i += 1;
            }
        }
        let missing = |got: &Vec<Option<Vec<u8>>>| {
            (0..self.size).filter(|&r| r != self.rank && got[r].is_none()).collect::<Vec<_>>()
        };
        while !missing(&got).is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(m) if m.tag == tag => got[m.from] = Some(m.data),
                Ok(m) => early.push(m),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.fail(format!(
                        "{what} #{}: no answer from rank(s) {:?} within {:?} (a peer errored, stopped or is stuck)",
                        tag.0,
                        missing(&got),
                        self.timeout
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.fail(format!("{what}: every peer has stopped"))),
            }
        }
        Ok(got)
    }
}

/// New groups made by [`InProcessComm::split`], waiting for their members to collect them:
/// (parent group, split number, color) → one communicator per member, by new rank.
type SplitRegistry = Mutex<std::collections::HashMap<(u64, u64, usize), Vec<Option<InProcessComm>>>>;

fn split_registry() -> &'static SplitRegistry {
    static REG: std::sync::OnceLock<SplitRegistry> = std::sync::OnceLock::new();
    REG.get_or_init(Default::default)
}

impl Communicator for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn split(&self, color: usize, key: usize) -> Result<Self> {
        let seq = self.next_seq();
        let mine = [color as u64, key as u64];
        let all = self.all_gather(bytemuck::cast_slice(&mine).to_vec())?;
        let entries: Vec<(u64, u64)> = all
            .iter()
            .map(|b| {
                let v: Vec<u64> = bytemuck::pod_collect_to_vec(b);
                (v.first().copied().unwrap_or(0), v.get(1).copied().unwrap_or(0))
            })
            .collect();
        let mut members: Vec<usize> = (0..self.size).filter(|&r| entries[r].0 == color as u64).collect();
        members.sort_by_key(|&r| (entries[r].1, r));
        let new_rank = members.iter().position(|&r| r == self.rank).unwrap_or(0);
        let id = (self.group, seq, color);
        // The first member creates the group's channels; the others collect theirs after
        // the barrier below.
        if new_rank == 0 {
            let comms = in_process(members.len(), self.timeout).into_iter().map(Some).collect();
            split_registry().lock().unwrap_or_else(|e| e.into_inner()).insert(id, comms);
        }
        self.barrier()?;
        let mut reg = split_registry().lock().unwrap_or_else(|e| e.into_inner());
        let slot = reg.get_mut(&id).and_then(|v| v.get_mut(new_rank)).and_then(Option::take);
        if reg.get(&id).is_some_and(|v| v.iter().all(Option::is_none)) {
            reg.remove(&id);
        }
        slot.ok_or_else(|| self.fail(format!("split: no communicator for color {color}, rank {new_rank}")))
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, data: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let seq = self.next_seq();
        for to in (0..self.size).filter(|&r| r != self.rank) {
            self.send(to, (seq, 2), data.clone())?;
        }
        let got = self.gather_tagged((seq, 2), "all_gather")?;
        Ok(got
            .into_iter()
            .enumerate()
            .map(|(r, d)| if r == self.rank { data.clone() } else { d.unwrap_or_default() })
            .collect())
    }
}
