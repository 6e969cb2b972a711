//! The NCCL communicator: expert-parallel exchange between GPUs and nodes. As a
//! [`Transport`] it sends and receives device memory directly: each round of segments is
//! one NCCL group of `ncclSend`/`ncclRecv` on views of the tensors, enqueued on the
//! backend's stream (so it orders with the kernels around it and nothing waits on the
//! host); a segment a rank sends itself is a device-to-device copy. The control plane
//! ([`Communicator`]: split colours, NCCL ids, barriers) stages its few bytes through the
//! device. Launch torchrun-style: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT` ([`NcclComm::from_env`]).
//!
//! Not yet run on a GPU (none was lent while this was written). NCCL collectives block
//! on the stream; a peer that dies mid-collective is detected by NCCL's own watchdog
//! (set `NCCL_ASYNC_ERROR_HANDLING`/timeouts in the launcher); the rendezvous has its own
//! timeout.

use crate::device::{CudaBackend, CudaBuffer};
use crate::probe::driver_status;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{result as nr, sys, Id, NcclType};
use moe_engine::parallel::{share_token, Communicator, ExchangeOp, LaunchEnv, Segment, Transport};
use moe_engine::{DType, Error, Result, Tensor};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// An NCCL communicator handle that may move to another thread. NCCL allows a
/// communicator to be used from any thread, but not from two at once: [`NcclComm`] keeps
/// it behind a mutex, which is what makes it `Sync`. Held raw (not as cudarc's `Comm`) so
/// that one group can post receives into several segments of one buffer, and destroyed
/// without a panic on error.
struct CommCell(sys::ncclComm_t);

// SAFETY: ncclComm_t may be used from any thread as long as calls on it do not overlap;
// every use goes through the mutex in NcclComm.
unsafe impl Send for CommCell {}

impl Drop for CommCell {
    fn drop(&mut self) {
        // Abort, not destroy: ncclCommDestroy waits for pending work, which never ends when
        // a peer has died; abort returns. An error leaves nothing more to clean up.
        // SAFETY: the communicator was initialised by ncclCommInitRank and is freed once.
        let _ = unsafe { nr::comm_abort(self.0) };
    }
}

/// One rank of an NCCL group, on a cuda backend's stream.
pub struct NcclComm {
    comm: Mutex<CommCell>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
}

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
    /// Joins the job described by the launch environment on `backend` (GPU `LOCAL_RANK`
    /// by convention): rank 0 creates the NCCL id and hands it out over TCP at
    /// `MASTER_ADDR:MASTER_PORT`.
    pub fn from_env(backend: &CudaBackend, timeout: Duration) -> Result<Self> {
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
        Self::new(backend, env.rank, env.world_size, token)
    }

    /// Rank `rank` of `world` with the group's id, on `backend`'s stream.
    pub fn new(backend: &CudaBackend, rank: usize, world: usize, id: [u8; 128]) -> Result<Self> {
        Self::on_stream(backend.stream.clone(), rank, world, id)
    }

    fn on_stream(stream: Arc<CudaStream>, rank: usize, world: usize, id: [u8; 128]) -> Result<Self> {
        driver_status()?;
        nccl_status()?;
        // NCCL takes the device of the thread's current context.
        stream.context().bind_to_thread().map_err(|e| err(rank, "bind the device", e))?;
        let bad = |what: &str| err(rank, "init", format!("{what} does not fit NCCL's int"));
        let (nranks, r) =
            (i32::try_from(world).map_err(|_| bad("world size"))?, i32::try_from(rank).map_err(|_| bad("rank"))?);
        let mut comm = std::mem::MaybeUninit::<sys::ncclComm_t>::uninit();
        // SAFETY: comm is written by ncclCommInitRank before it is read; the id is the
        // group's 128 bytes.
        let comm = unsafe {
            nr::comm_init_rank(comm.as_mut_ptr(), nranks, sys::ncclUniqueId { internal: id.map(|b| b as _) }, r)
                .map_err(|e| err(rank, "init", e))?;
            comm.assume_init()
        };
        Ok(NcclComm { comm: Mutex::new(CommCell(comm)), stream, rank, size: world })
    }

    fn comm(&self) -> MutexGuard<'_, CommCell> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One NCCL group of sends and receives of `V` values, `cols` per row: the transfers of
    /// [`Transport::exchange`] on device memory. The segments must be checked (as an
    /// [`ExchangeOp`]'s are, and as `bytes_all_to_all` builds them).
    fn exchange_typed<V: NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        src: &CudaSlice<V>,
        cols: usize,
        sends: &[Segment],
        recvs: &[Segment],
        recv_rows: usize,
    ) -> Result<CudaSlice<V>> {
        let me = self.rank;
        let e = |what: &'static str| move |x: cudarc::driver::DriverError| err(me, what, x);
        // NCCL posts on the thread's current device, which must be the stream's.
        self.stream.context().bind_to_thread().map_err(e("bind the device"))?;
        let mut out = self.stream.alloc_zeros::<V>((recv_rows * cols).max(1)).map_err(e("alloc"))?;
        // Segments to this rank: the j-th send to itself is its j-th receive from itself.
        let own_sends = sends.iter().filter(|s| s.peer == me);
        let own_recvs = recvs.iter().filter(|s| s.peer == me);
        for (s, r) in own_sends.zip(own_recvs) {
            if s.rows > 0 {
                let from = src.slice(s.start * cols..(s.start + s.rows) * cols);
                let mut to = out.slice_mut(r.start * cols..(r.start + r.rows) * cols);
                self.stream.memcpy_dtod(&from, &mut to).map_err(e("copy"))?;
            }
        }
        // One group: NCCL matches the transfers between two ranks in the order posted,
        // which is the order listed. Pointers are the tensors' base plus the segment's
        // offset; the front door checked every segment lies inside its tensor, and the
        // receive segments are disjoint.
        let width = std::mem::size_of::<V>() as u64;
        let cell = self.comm();
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        let (src_ptr, _src_sync) = src.device_ptr(&self.stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
        nr::group_start().map_err(|x| err(me, "group", x))?;
        let posted = (|| -> Result<()> {
            for s in sends.iter().filter(|s| s.peer != me && s.rows > 0) {
                let ptr = src_ptr + (s.start * cols) as u64 * width;
                // SAFETY: rows [start, start + rows) of src, on the stream src lives on.
                unsafe { nr::send(ptr as _, s.rows * cols, V::as_nccl_type(), s.peer as i32, cell.0, stream) }
                    .map_err(|x| err(me, "send", x))?;
            }
            for r in recvs.iter().filter(|r| r.peer != me && r.rows > 0) {
                let ptr = out_ptr + (r.start * cols) as u64 * width;
                // SAFETY: rows [start, start + rows) of out, disjoint from every other receive.
                unsafe { nr::recv(ptr as _, r.rows * cols, V::as_nccl_type(), r.peer as i32, cell.0, stream) }
                    .map_err(|x| err(me, "recv", x))?;
            }
            Ok(())
        })();
        // The group is closed whether or not every call was posted.
        let ended = nr::group_end().map_err(|x| err(me, "group", x));
        posted?;
        ended?;
        drop((_src_sync, _out_sync));
        Ok(out)
    }

    /// Variable all-to-all of host bytes (the control plane): sizes first, then the data,
    /// staged through the device.
    fn bytes_all_to_all(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let (me, n) = (self.rank, self.size);
        let e = |what: &'static str| move |x: cudarc::driver::DriverError| err(me, what, x);
        let sizes: Vec<i64> = send.iter().map(|v| v.len() as i64).collect();
        let sc = self.stream.clone_htod(&sizes).map_err(e("upload"))?;
        let one = |p: usize| Segment { peer: p, start: p, rows: 1 };
        let all: Vec<Segment> = (0..n).map(one).collect();
        let rc = self.exchange_typed(&sc, 1, &all, &all, n)?;
        let got_sizes = self.stream.clone_dtoh(&rc).map_err(e("download"))?;
        let flat: Vec<u8> = send.concat();
        let sbuf =
            self.stream.clone_htod(&flat.iter().copied().chain([0]).collect::<Vec<u8>>()).map_err(e("upload"))?;
        let (mut sends, mut recvs) = (Vec::new(), Vec::new());
        let (mut s0, mut r0) = (0, 0);
        for p in 0..n {
            let (sl, rl) = (sizes[p] as usize, got_sizes[p].max(0) as usize);
            sends.push(Segment { peer: p, start: s0, rows: sl });
            recvs.push(Segment { peer: p, start: r0, rows: rl });
            s0 += sl;
            r0 += rl;
        }
        let rbuf = self.exchange_typed(&sbuf, 1, &sends, &recvs, r0)?;
        let got = self.stream.clone_dtoh(&rbuf).map_err(e("download"))?;
        Ok(recvs.iter().map(|r| got[r.start..r.start + r.rows].to_vec()).collect())
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, data: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.bytes_all_to_all(vec![data; self.size])
    }

    fn split(&self, color: usize, key: usize) -> Result<Self> {
        let me = self.rank;
        let all = self.all_gather([color as u64, key as u64].iter().flat_map(|v| v.to_le_bytes()).collect())?;
        let entry = |b: &[u8]| {
            (
                u64::from_le_bytes(b.get(..8).and_then(|s| s.try_into().ok()).unwrap_or([0; 8])),
                u64::from_le_bytes(b.get(8..16).and_then(|s| s.try_into().ok()).unwrap_or([0; 8])),
            )
        };
        let mut members: Vec<usize> = (0..self.size).filter(|&r| entry(&all[r]).0 == color as u64).collect();
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
        let id: [u8; 128] =
            ids[leader].get(..128).and_then(|s| s.try_into().ok()).ok_or_else(|| err(me, "split", "short id"))?;
        NcclComm::on_stream(self.stream.clone(), new_rank, members.len(), id)
    }
}

impl Transport<CudaBackend> for NcclComm {
    fn run_exchange(&self, b: &CudaBackend, op: &ExchangeOp<'_, CudaBackend>) -> Result<Tensor<CudaBackend>> {
        // The transfers are ordered on this communicator's stream; the tensor must be the
        // backend's whose stream that is.
        if !Arc::ptr_eq(&b.stream, &self.stream) {
            return Err(Error::Misuse(format!(
                "NCCL rank {}: the tensors are on another backend's stream than the communicator's",
                self.rank
            )));
        }
        let (x, sends, recvs) = (op.x, op.sends, op.recvs);
        let [recv_rows, cols] = op.out_shape;
        let shape = vec![recv_rows, cols];
        match x.buffer() {
            CudaBuffer::F32(s) => {
                let out = self.exchange_typed(s, cols, sends, recvs, recv_rows)?;
                Tensor::<CudaBackend>::from_parts(CudaBuffer::F32(out), shape, DType::F32)
            }
            CudaBuffer::I32(s) => {
                let out = self.exchange_typed(s, cols, sends, recvs, recv_rows)?;
                Tensor::<CudaBackend>::from_parts(CudaBuffer::I32(out), shape, DType::I32)
            }
            CudaBuffer::Half(_) => Err(Error::dtype("exchanged rows", "f32 or i32", x.dtype())),
        }
    }

    /// One `ncclAllReduce` on the backend's stream, summing `coef · x` (NCCL's
    /// pre-multiplied sum, `ncclRedOpCreatePreMulSum`), on device buffers. Ring and tree
    /// all-reduces finish every chunk on one rank and broadcast it, so every rank holds
    /// bitwise the same result.
    fn all_reduce_scaled(&self, b: &CudaBackend, x: &Tensor<CudaBackend>, coef: f32) -> Result<Tensor<CudaBackend>> {
        let me = self.rank;
        if !Arc::ptr_eq(&b.stream, &self.stream) {
            return Err(Error::Misuse(format!(
                "NCCL rank {me}: the tensor is on another backend's stream than the communicator's"
            )));
        }
        let CudaBuffer::F32(src) = x.buffer() else {
            return Err(Error::dtype("all-reduced tensor", "f32", x.dtype()));
        };
        let n = x.numel();
        let e = |what: &'static str| move |v: cudarc::driver::DriverError| err(me, what, v);
        self.stream.context().bind_to_thread().map_err(e("bind the device"))?;
        let mut out = self.stream.alloc_zeros::<f32>(n.max(1)).map_err(e("alloc"))?;
        if n > 0 {
            let cell = self.comm();
            let stream = self.stream.cu_stream() as sys::cudaStream_t;
            let (src_ptr, _src_sync) = src.device_ptr(&self.stream);
            let (out_ptr, _out_sync) = out.device_ptr_mut(&self.stream);
            let mut op = std::mem::MaybeUninit::<sys::ncclRedOp_t>::uninit();
            let mut scalar = coef;
            // SAFETY: the scalar is read at once (host immediate); the op is destroyed below.
            unsafe {
                sys::ncclRedOpCreatePreMulSum(
                    op.as_mut_ptr(),
                    (&mut scalar as *mut f32).cast(),
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclScalarResidence_t::ncclScalarHostImmediate,
                    cell.0,
                )
                .result()
                .map_err(|v| err(me, "create the pre-multiplied sum", v))?;
            }
            // SAFETY: created just above.
            let op = unsafe { op.assume_init() };
            // SAFETY: n f32 values in and out, on the stream both buffers live on.
            let done = unsafe {
                nr::all_reduce(src_ptr as _, out_ptr as _, n, sys::ncclDataType_t::ncclFloat32, op, cell.0, stream)
            }
            .map_err(|v| err(me, "all-reduce", v));
            // SAFETY: the op was made on this communicator and is destroyed once.
            let destroyed = unsafe { sys::ncclRedOpDestroy(op, cell.0) }.result().map_err(|v| err(me, "destroy op", v));
            done?;
            destroyed?;
        }
        Tensor::<CudaBackend>::from_parts(CudaBuffer::F32(out), x.shape().to_vec(), DType::F32)
    }
}
