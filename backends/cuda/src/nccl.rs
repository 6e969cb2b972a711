//! The NCCL communicator: expert-parallel exchange between GPUs and nodes. Bytes from
//! the host are staged on the device and moved with grouped NCCL send/recv (counts
//! first, then the rows), so it implements the same [`Communicator`] as the in-process
//! one. Launch torchrun-style: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT` ([`NcclComm::from_env`]).
//!
//! Not yet run on a GPU (none was lent while this was written). NCCL collectives block
//! on the stream; a peer that dies mid-collective is detected by NCCL's own watchdog
//! (set `NCCL_ASYNC_ERROR_HANDLING`/timeouts in the launcher); the rendezvous has its own
//! timeout.

use crate::probe::driver_status;
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{result as nr, Comm, Id};
use moe_engine::parallel::{share_token, Communicator, LaunchEnv};
use moe_engine::{Error, Result};
use std::sync::Arc;
use std::time::Duration;

/// One rank of an NCCL group.
pub struct NcclComm {
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: the NCCL communicator and stream are used from one thread at a time through
// &self methods that enqueue on the stream and wait; NCCL communicators may move between
// threads.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

fn err(rank: usize, what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Communication { rank, msg: format!("NCCL {what}: {e:?}") }
}

/// `Ok` when libnccl can be loaded.
pub fn nccl_status() -> Result<()> {
    // SAFETY: only tries to open the library.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::backend("cuda", "NCCL (libnccl.so.2) could not be loaded"))
    }
}

impl NcclComm {
    /// Joins the job described by the launch environment: rank 0 creates the NCCL id and
    /// hands it out over TCP at `MASTER_ADDR:MASTER_PORT`; every rank uses GPU
    /// `LOCAL_RANK`.
    pub fn from_env(timeout: Duration) -> Result<Self> {
        let env = LaunchEnv::from_env()?;
        driver_status()?;
        nccl_status()?;
        let id = if env.rank == 0 {
            let id = Id::new().map_err(|e| err(0, "unique id", e))?;
            Some(id.internal().map(|c| c as u8))
        } else {
            None
        };
        let token = share_token(&env, id, timeout)?;
        Self::new(env.local_rank, env.rank, env.world_size, token)
    }

    /// Rank `rank` of `world` on device `ordinal`, with the group's id.
    pub fn new(ordinal: usize, rank: usize, world: usize, id: [u8; 128]) -> Result<Self> {
        driver_status()?;
        nccl_status()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| err(rank, "device", e))?;
        let stream = ctx.default_stream();
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(id.map(|b| b as _)))
            .map_err(|e| err(rank, "init", e))?;
        Ok(NcclComm { comm, stream })
    }

    fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| err(self.rank(), "stream", e))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let (me, n) = (self.rank(), self.size());
        if send.len() != n {
            return Err(Error::Communication { rank: me, msg: format!("{} buffers for {n} ranks", send.len()) });
        }
        // Counts first.
        let counts: Vec<i64> = send.iter().map(|v| v.len() as i64).collect();
        let sc = self.stream.clone_htod(&counts).map_err(|e| err(me, "upload", e))?;
        let mut rc = self.stream.alloc_zeros::<i64>(n).map_err(|e| err(me, "alloc", e))?;
        nr::group_start().map_err(|e| err(me, "group", e))?;
        for p in (0..n).filter(|&p| p != me) {
            self.comm.send(&sc.slice(p..p + 1), p as i32).map_err(|e| err(me, "send counts", e))?;
            self.comm.recv(&mut rc.slice_mut(p..p + 1), p as i32).map_err(|e| err(me, "recv counts", e))?;
        }
        nr::group_end().map_err(|e| err(me, "group", e))?;
        let recv_counts = self.stream.clone_dtoh(&rc).map_err(|e| err(me, "download", e))?;
        self.sync()?;
        // Then the rows, one staging buffer each way.
        let flat: Vec<u8> = send.concat();
        let sbuf = self.stream.clone_htod(&flat).map_err(|e| err(me, "upload", e))?;
        let total: usize = recv_counts.iter().enumerate().filter(|&(p, _)| p != me).map(|(_, &c)| c as usize).sum();
        let mut rbuf = self.stream.alloc_zeros::<u8>(total.max(1)).map_err(|e| err(me, "alloc", e))?;
        let mut soff = vec![0usize; n + 1];
        for p in 0..n {
            soff[p + 1] = soff[p] + send[p].len();
        }
        let mut roff = vec![0usize; n + 1];
        for p in 0..n {
            roff[p + 1] = roff[p] + if p == me { 0 } else { recv_counts[p] as usize };
        }
        nr::group_start().map_err(|e| err(me, "group", e))?;
        for p in (0..n).filter(|&p| p != me) {
            if soff[p + 1] > soff[p] {
                self.comm.send(&sbuf.slice(soff[p]..soff[p + 1]), p as i32).map_err(|e| err(me, "send", e))?;
            }
            if roff[p + 1] > roff[p] {
                self.comm.recv(&mut rbuf.slice_mut(roff[p]..roff[p + 1]), p as i32).map_err(|e| err(me, "recv", e))?;
            }
        }
        nr::group_end().map_err(|e| err(me, "group", e))?;
        let got = self.stream.clone_dtoh(&rbuf).map_err(|e| err(me, "download", e))?;
        self.sync()?;
        Ok((0..n).map(|p| if p == me { send[p].clone() } else { got[roff[p]..roff[p + 1]].to_vec() }).collect())
    }

    fn all_gather(&self, data: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        // Variable sizes through the all-to-all: the same bytes to every rank.
        let n = self.size();
        self.all_to_all_v(vec![data; n])
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let me = self.rank();
        let all = self.all_gather([color as u64, key as u64].iter().flat_map(|v| v.to_le_bytes()).collect())?;
        let entry = |b: &[u8]| {
            (
                u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])),
                u64::from_le_bytes(b[8..16].try_into().unwrap_or([0; 8])),
            )
        };
        let mut members: Vec<usize> = (0..self.size()).filter(|&r| entry(&all[r]).0 == color as u64).collect();
        members.sort_by_key(|&r| (entry(&all[r]).1, r));
        let new_rank = members.iter().position(|&r| r == me).unwrap_or(0);
        // Each new group's first member makes its id; everyone shares theirs.
        let token = if new_rank == 0 {
            Id::new().map_err(|e| err(me, "unique id", e))?.internal().map(|c| c as u8).to_vec()
        } else {
            vec![0u8; 128]
        };
        let ids = self.all_gather(token)?;
        let leader = members[0];
        let id: [u8; 128] = ids[leader][..128].try_into().map_err(|_| err(me, "split", "short id"))?;
        let ordinal = self.stream.context().ordinal();
        Ok(Box::new(NcclComm::new(ordinal, new_rank, members.len(), id)?))
    }
}
