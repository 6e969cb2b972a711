//! Communicators. Collectives move host bytes: a backend stages device data through the
//! host (the in-process communicator), or exchanges device buffers directly (NCCL, in
//! `moe-cuda`). Every collective has a deadline: a rank that errors or stops makes its
//! peers return [`Error::Communication`] instead of hanging.

use crate::error::{Error, Result};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The collectives the expert-parallel layer needs. Data are bytes; the typed helpers
/// ([`all_to_all_v_f32`], ...) wrap them.
pub trait Communicator: Send + Sync {
    /// This rank, `0..size`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Variable all-to-all: `send[dst]` goes to rank `dst`; returns what each rank sent
    /// here, indexed by source. Counts are exchanged first, then the rows.
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>;
    /// Every rank's `data`, indexed by rank.
    fn all_gather(&self, data: Vec<u8>) -> Result<Vec<Vec<u8>>>;

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

/// [`Communicator::all_to_all_v`] on f32 rows.
pub fn all_to_all_v_f32(c: &dyn Communicator, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
    let bytes = send.into_iter().map(|v| bytemuck::cast_slice(&v).to_vec()).collect();
    Ok(c.all_to_all_v(bytes)?.into_iter().map(|b| bytemuck::pod_collect_to_vec(&b)).collect())
}

/// [`Communicator::all_to_all_v`] on i32 values.
pub fn all_to_all_v_i32(c: &dyn Communicator, send: Vec<Vec<i32>>) -> Result<Vec<Vec<i32>>> {
    let bytes = send.into_iter().map(|v| bytemuck::cast_slice(&v).to_vec()).collect();
    Ok(c.all_to_all_v(bytes)?.into_iter().map(|b| bytemuck::pod_collect_to_vec(&b)).collect())
}

struct Msg {
    from: usize,
    /// Collective number and phase, so messages of different collectives never mix.
    tag: (u64, u8),
    data: Vec<u8>,
}

/// One rank of an in-process group: channels to every rank, a deadline per collective.
pub struct InProcessComm {
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
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| channel::<Msg>()).unzip();
    receivers
        .into_iter()
        .enumerate()
        .map(|(rank, rx)| InProcessComm {
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
        let deadline = Instant::now() + self.timeout;
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

impl Communicator for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_to_all_v(&self, mut send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if send.len() != self.size {
            return Err(self.fail(format!("all_to_all_v: {} buffers for {} ranks", send.len(), self.size)));
        }
        let seq = self.next_seq();
        // Counts first: every rank learns how much it will receive from each peer.
        for to in (0..self.size).filter(|&r| r != self.rank) {
            self.send(to, (seq, 0), (send[to].len() as u64).to_le_bytes().to_vec())?;
        }
        let counts = self.gather_tagged((seq, 0), "all_to_all_v counts")?;
        for to in (0..self.size).filter(|&r| r != self.rank) {
            self.send(to, (seq, 1), std::mem::take(&mut send[to]))?;
        }
        let rows = self.gather_tagged((seq, 1), "all_to_all_v rows")?;
        let mut out = Vec::with_capacity(self.size);
        for (src, data) in rows.into_iter().enumerate() {
            if src == self.rank {
                out.push(std::mem::take(&mut send[src]));
                continue;
            }
            let data = data.unwrap_or_default();
            let want = counts[src].as_ref().map_or(0, |c| u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8])));
            if data.len() as u64 != want {
                return Err(
                    self.fail(format!("all_to_all_v: rank {src} announced {want} bytes and sent {}", data.len()))
                );
            }
            out.push(data);
        }
        Ok(out)
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
