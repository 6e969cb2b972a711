//! Transports: how device tensors move between the ranks of a group. One primitive, a
//! round of point-to-point transfers of row segments ([`Transport::exchange`]), gives the
//! variable all-to-all of the expert-parallel exchange and the all-gather of the
//! tensor-parallel output; the hierarchical exchange ([`super::Hierarchical`]) is two
//! rounds of it. NCCL (`moe-cuda`) sends and receives device memory directly; the
//! in-process communicator, the laptop way to run N ranks, stages through the host.

use super::comm::{Communicator, InProcessComm};
use crate::backend::Backend;
use crate::device::{returned, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::{f32_or_i32_matrix, output};
use crate::tensor::{DType, HostData, HostTensor};

/// A run of `rows` rows from row `start` of a tensor, sent to or received from `peer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The other rank.
    pub peer: usize,
    /// First row.
    pub start: usize,
    /// Rows.
    pub rows: usize,
}

/// Rows every rank sends every rank in one all-to-all, `rows[src][dst]`: the same matrix
/// on every rank (gathered from the per-peer counts), so any rank can plan a schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowCounts {
    ranks: usize,
    rows: Vec<usize>,
}

impl RowCounts {
    /// The matrix of `ranks × ranks` row counts, by source then destination.
    pub fn new(ranks: usize, rows: Vec<usize>) -> Result<Self> {
        if rows.len() != ranks * ranks {
            return Err(Error::Internal(format!("{} row counts for {ranks} ranks", rows.len())));
        }
        Ok(RowCounts { ranks, rows })
    }

    /// Ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Rows `src` sends `dst`.
    pub fn get(&self, src: usize, dst: usize) -> usize {
        self.rows[src * self.ranks + dst]
    }

    /// Rows `src` sends in all.
    pub fn sent_by(&self, src: usize) -> usize {
        (0..self.ranks).map(|d| self.get(src, d)).sum()
    }

    /// Rows `dst` receives in all.
    pub fn received_by(&self, dst: usize) -> usize {
        (0..self.ranks).map(|s| self.get(s, dst)).sum()
    }

    /// Errors unless the matrix is for `group`'s number of ranks.
    pub(crate) fn check_group(&self, group: &(impl Communicator + ?Sized)) -> Result<()> {
        if self.ranks != group.size() {
            return Err(Error::Internal(format!("row counts for {} ranks in a group of {}", self.ranks, group.size())));
        }
        Ok(())
    }

    /// The way back: what `dst` returns to `src`.
    pub fn transposed(&self) -> Self {
        let n = self.ranks;
        RowCounts { ranks: n, rows: (0..n * n).map(|i| self.get(i % n, i / n)).collect() }
    }
}

/// One round of transfers with checked segments: every send inside `x`, every peer in the
/// group, receives disjoint and inside `recv_rows`, the rows a rank sends itself matching
/// those it receives from itself. Only [`ExchangeOp::check`] makes one, so a transport
/// that receives one may post its transfers on raw memory.
#[non_exhaustive]
pub struct ExchangeOp<'a, B: Device> {
    /// The rows sent, `[rows, cols]` f32 or i32.
    pub x: &'a Tensor<B>,
    /// Send segments of `x`, in the order they match the peers' receives.
    pub sends: &'a [Segment],
    /// Receive segments of the output.
    pub recvs: &'a [Segment],
    /// Output shape `[recv_rows, cols]`.
    pub out_shape: [usize; 2],
}

impl<'a, B: Device> ExchangeOp<'a, B> {
    /// Checks the segments of `rank` in a group of `size`.
    pub fn check(
        b: &B,
        rank: usize,
        size: usize,
        x: &'a Tensor<B>,
        sends: &'a [Segment],
        recvs: &'a [Segment],
        recv_rows: usize,
    ) -> Result<Self> {
        let (rows, cols) = f32_or_i32_matrix("exchanged rows", x)?;
        check_segments(size, "send", sends, rows, false)?;
        check_segments(size, "receive", recvs, recv_rows, true)?;
        let own = |segs: &[Segment]| segs.iter().filter(|s| s.peer == rank).map(|s| s.rows).collect::<Vec<_>>();
        if own(sends) != own(recvs) {
            return Err(Error::Internal(format!(
                "rank {rank} sends itself rows {:?} but receives {:?}",
                own(sends),
                own(recvs)
            )));
        }
        output(b, "received rows", &[recv_rows, cols], x.dtype())?;
        Ok(ExchangeOp { x, sends, recvs, out_shape: [recv_rows, cols] })
    }
}

/// Moves rows of device tensors between the ranks of a group (the data plane; the
/// [`Communicator`] it extends is the control plane). Implementors do
/// [`Transport::run_exchange`] on a checked [`ExchangeOp`]; callers use
/// [`Transport::exchange`] and the collectives built on it.
pub trait Transport<B: Device>: Communicator {
    /// One checked round of transfers (see [`Transport::exchange`]).
    fn run_exchange(&self, b: &B, op: &ExchangeOp<'_, B>) -> Result<Tensor<B>>;

    /// One round of point-to-point transfers, collective over the group: every send
    /// segment of `x` (a matrix of f32 or i32 rows) goes to its peer, and the returned
    /// `[recv_rows, cols]` tensor holds every receive segment at its `start` (rows no
    /// segment covers are zero). Between two ranks, segments match in the order listed:
    /// the j-th send to `p` is `p`'s j-th receive from this rank, of the same length. A
    /// rank may send to itself.
    fn exchange(
        &self,
        b: &B,
        x: &Tensor<B>,
        sends: &[Segment],
        recvs: &[Segment],
        recv_rows: usize,
    ) -> Result<Tensor<B>> {
        let op = ExchangeOp::check(b, self.rank(), self.size(), x, sends, recvs, recv_rows)?;
        let out = self.run_exchange(b, &op)?;
        returned(b, "exchange", out, &op.out_shape, x.dtype())
    }

    /// Variable all-to-all of rows by `counts`, which every rank holds: this rank's `x`
    /// holds its rows for rank 0, then rank 1, ... (rows past them are not sent); the
    /// result holds what every rank sent here, by source.
    fn all_to_all_rows(&self, b: &B, x: &Tensor<B>, counts: &RowCounts) -> Result<Tensor<B>> {
        counts.check_group(self)?;
        let me = self.rank();
        let (sends, recvs) = flat_schedule(counts, me);
        self.exchange(b, x, &sends, &recvs, counts.received_by(me))
    }

    /// All-gather of row blocks: rank r contributes `x` of `rows[r]` rows; every rank gets
    /// them all, in rank order.
    fn all_gather_rows(&self, b: &B, x: &Tensor<B>, rows: &[usize]) -> Result<Tensor<B>> {
        let (me, n) = (self.rank(), self.size());
        if rows.len() != n || x.shape().first() != Some(&rows[me]) {
            return Err(Error::Internal(format!(
                "all_gather_rows: {:?} rows for {n} ranks, this rank holds {:?}",
                rows,
                x.shape()
            )));
        }
        let sends: Vec<Segment> = (0..n).map(|peer| Segment { peer, start: 0, rows: rows[me] }).collect();
        let mut start = 0;
        let recvs: Vec<Segment> = (0..n)
            .map(|peer| {
                let s = Segment { peer, start, rows: rows[peer] };
                start += rows[peer];
                s
            })
            .collect();
        self.exchange(b, x, &sends, &recvs, start)
    }

    /// `coef · Σ_r x_r` over the group's ranks, elementwise, bitwise the same on every
    /// rank (the gradient all-reduce of data-parallel training). Collective; f32 only.
    /// The default gathers every rank's tensor and sums the blocks in rank order with one
    /// device product (a `[1, ranks]` row of `coef` times the `[ranks, n]` blocks); NCCL
    /// overrides it with one `ncclAllReduce` pre-multiplied by `coef`.
    fn all_reduce_scaled(&self, b: &B, x: &Tensor<B>, coef: f32) -> Result<Tensor<B>>
    where
        B: crate::backend::Backend,
    {
        x.expect_dtype("all-reduced tensor", crate::DType::F32)?;
        let (n, ranks) = (x.numel(), self.size());
        if n == 0 {
            return Ok(x.clone());
        }
        let all = self.all_gather_rows(b, &x.reshape(&[1, n])?, &vec![1; ranks])?;
        let c = b.upload(&crate::HostTensor::f32(&[1, ranks], vec![coef; ranks])?)?;
        b.linear_dx(&c, &all, None)?.reshape(x.shape())
    }
}

/// The flat all-to-all of `counts` for rank `me`: one send and one receive per rank.
pub(crate) fn flat_schedule(counts: &RowCounts, me: usize) -> (Vec<Segment>, Vec<Segment>) {
    let n = counts.ranks();
    let (mut sends, mut recvs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut s0, mut r0) = (0, 0);
    for p in 0..n {
        sends.push(Segment { peer: p, start: s0, rows: counts.get(me, p) });
        recvs.push(Segment { peer: p, start: r0, rows: counts.get(p, me) });
        s0 += counts.get(me, p);
        r0 += counts.get(p, me);
    }
    (sends, recvs)
}

/// Peers in the group, segments inside their tensor, and (receives) no two overlapping.
fn check_segments(size: usize, what: &str, segs: &[Segment], rows: usize, disjoint: bool) -> Result<()> {
    for s in segs {
        if s.peer >= size || s.start.checked_add(s.rows).is_none_or(|e| e > rows) {
            return Err(Error::Internal(format!("{what} segment {s:?}: outside {rows} rows or {size} ranks")));
        }
    }
    if disjoint {
        let mut sorted: Vec<&Segment> = segs.iter().filter(|s| s.rows > 0).collect();
        sorted.sort_by_key(|s| s.start);
        if let Some(w) = sorted.windows(2).find(|w| w[0].start + w[0].rows > w[1].start) {
            return Err(Error::Internal(format!("receive segments {:?} and {:?} overlap", w[0], w[1])));
        }
    }
    Ok(())
}

/// One round of transfers staged through the host: `x`'s rows are downloaded, each peer's
/// send segments packed into one message, `all_to_all_v(messages, expected)` moves them
/// (`expected[p]`: the bytes this rank's receives from `p` add up to), and the received
/// rows are uploaded into place. For transports whose wire is host bytes: the in-process
/// communicator, and a host process group (torch.distributed's gloo, through the Python
/// package).
pub fn exchange_via_host<B: Backend>(
    b: &B,
    op: &ExchangeOp<'_, B>,
    rank: usize,
    size: usize,
    all_to_all_v: impl FnOnce(Vec<Vec<u8>>, Vec<usize>) -> Result<Vec<Vec<u8>>>,
) -> Result<Tensor<B>> {
    let (x, sends, recvs) = (op.x, op.sends, op.recvs);
    let [recv_rows, cols] = op.out_shape;
    let host = b.download(x)?;
    let row = cols * 4;
    let mut expected = vec![0usize; size];
    for r in recvs {
        expected[r.peer] += r.rows * row;
    }
    let got = {
        let bytes: &[u8] = match host.data() {
            HostData::F32(v) => bytemuck::cast_slice(v),
            HostData::I32(v) => bytemuck::cast_slice(v),
        };
        let mut msgs = vec![Vec::new(); size];
        for s in sends {
            msgs[s.peer].extend_from_slice(&bytes[s.start * row..(s.start + s.rows) * row]);
        }
        all_to_all_v(msgs, expected)?
    };
    if got.len() != size {
        return Err(Error::Communication { rank, msg: format!("{} messages from a group of {size}", got.len()) });
    }
    // Received rows go straight into the values of the tensor uploaded.
    let shape = [recv_rows, cols];
    let mut out = match x.dtype() {
        DType::I32 => HostData::I32(vec![0; recv_rows * cols]),
        _ => HostData::F32(vec![0.0; recv_rows * cols]),
    };
    let dst: &mut [u8] = match &mut out {
        HostData::F32(v) => bytemuck::cast_slice_mut(v),
        HostData::I32(v) => bytemuck::cast_slice_mut(v),
    };
    let mut read = vec![0usize; size];
    let short = |peer: usize| Error::Communication {
        rank,
        msg: format!("rank {peer} sent {} bytes, which do not match the rows agreed", got[peer].len()),
    };
    for r in recvs {
        let n = r.rows * row;
        let piece = got[r.peer].get(read[r.peer]..read[r.peer] + n).ok_or_else(|| short(r.peer))?;
        dst[r.start * row..r.start * row + n].copy_from_slice(piece);
        read[r.peer] += n;
    }
    if let Some(p) = (0..size).find(|&p| read[p] != got[p].len()) {
        return Err(short(p));
    }
    let t = match out {
        HostData::I32(v) => HostTensor::i32(&shape, v)?,
        HostData::F32(v) => HostTensor::f32(&shape, v)?,
    };
    b.upload(&t)
}

/// The in-process communicator stages through the host ([`exchange_via_host`]): the only
/// transport of the engine itself that reads rows on the host.
impl<B: Backend> Transport<B> for InProcessComm {
    fn run_exchange(&self, b: &B, op: &ExchangeOp<'_, B>) -> Result<Tensor<B>> {
        exchange_via_host(b, op, self.rank(), self.size(), |msgs, _| self.all_to_all_v(msgs))
    }
}
