//! The device ops of the expert-parallel exchange (`crate::parallel::Dispatcher`):
//! `bucket` gives every kept route of this rank's tokens its destination slot and its
//! row in a send buffer ordered by destination rank (with the routes per slot, the only
//! values the exchange reads on the host), and `regroup` moves blocks of rows between
//! the order they arrive in (by source rank) and the order the experts run in (by local
//! expert), and back.

use super::dispatch::RouteRows;
use super::{f32_matrix, fits_i32, output, to_u32, Plan};
use crate::device::{Device, Tensor};
use crate::error::{Error, Result};
use crate::kernel_abi::bucket::BucketSchedule;
use crate::kernel_abi::{BucketParams, RegroupParams};
use crate::tensor::{mul_size, DType, HostTensor};
use std::ops::Range;

/// Where the experts live, on the device: the physical slots of every logical expert
/// (several when EPLB replicated it) and how many slots each rank holds (slot `p` is
/// local slot `p % slots_per_rank` of rank `p / slots_per_rank`). Made from a checked
/// host placement, so every slot the bucketing reads is in range.
pub struct DevicePlacement<B: Device> {
    /// `[E + 1]` i32: expert e's slots are `replica_slots[offsets[e]..offsets[e + 1]]`.
    pub replica_offsets: Tensor<B>,
    /// `[P]` i32: physical slots, grouped by logical expert.
    pub replica_slots: Tensor<B>,
    experts: usize,
    slots: usize,
    slots_per_rank: usize,
    fingerprint: u32,
}

impl<B: Device> DevicePlacement<B> {
    /// Uploads the slots of each logical expert (`replicas[e]`, none empty, every slot in
    /// `0..ranks · slots_per_rank` exactly once over all experts).
    pub fn new(b: &B, replicas: &[Vec<usize>], slots_per_rank: usize, ranks: usize) -> Result<Self> {
        let slots = mul_size("expert slots", slots_per_rank, ranks)?;
        fits_i32("expert slots", slots + 2)?;
        let mut seen = vec![false; slots];
        let mut offsets = vec![0i32];
        let mut flat = Vec::with_capacity(slots);
        for (e, reps) in replicas.iter().enumerate() {
            if reps.is_empty() {
                return Err(Error::config("placement", format!("expert {e} has no slot")));
            }
            for &p in reps {
                if p >= slots {
                    return Err(Error::config(
                        "placement",
                        format!("slot {p} of expert {e} is past the {slots} slots"),
                    ));
                }
                if std::mem::replace(&mut seen[p], true) {
                    return Err(Error::config("placement", format!("slot {p} of expert {e} already holds an expert")));
                }
                flat.push(p as i32);
            }
            offsets.push(flat.len() as i32);
        }
        if let Some(p) = seen.iter().position(|s| !s) {
            return Err(Error::config("placement", format!("slot {p} holds no expert")));
        }
        // FNV-1a over the shape and every slot: ranks holding different placements differ.
        let words =
            [replicas.len(), slots_per_rank, ranks].into_iter().chain(offsets.iter().chain(&flat).map(|&v| v as usize));
        let fingerprint = words.fold(0x811c_9dc5u32, |h, w| (h ^ w as u32).wrapping_mul(0x0100_0193)) & 0x7fff_ffff;
        Ok(DevicePlacement {
            fingerprint,
            replica_offsets: b.upload(&HostTensor::i32(&[offsets.len()], offsets)?)?,
            replica_slots: b.upload(&HostTensor::i32(&[slots], flat)?)?,
            experts: replicas.len(),
            slots,
            slots_per_rank,
        })
    }

    /// Logical experts E.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Physical slots P over all ranks.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Slots per rank.
    pub fn slots_per_rank(&self) -> usize {
        self.slots_per_rank
    }

    /// A 31-bit hash of the placement, which the bucketing writes after its counts so that
    /// ranks can check they agree.
    pub fn fingerprint(&self) -> u32 {
        self.fingerprint
    }
}

/// Bucketing by destination, checked: for every kept route of the tokens in `tokens`,
/// its physical slot (replica `token % replicas` of its expert) and its row in the send
/// buffer, ordered by slot and, within a slot, by compact row.
#[non_exhaustive]
pub struct BucketOp<'a, B: Device> {
    /// The plan (its compact rows and offsets).
    pub plan: &'a Plan<B>,
    /// Where the experts live.
    pub placement: &'a DevicePlacement<B>,
    /// The tokens this rank sends.
    pub tokens: Range<usize>,
    /// Kernel parameters and passes.
    pub schedule: BucketSchedule,
}

impl<'a, B: Device> BucketOp<'a, B> {
    /// Checks the placement against the plan and the token range.
    pub fn check(b: &B, plan: &'a Plan<B>, placement: &'a DevicePlacement<B>, tokens: Range<usize>) -> Result<Self> {
        let (s, k, e) = (plan.tokens(), plan.k(), plan.num_experts());
        if placement.experts != e {
            return Err(Error::config("placement", format!("places {} experts, the plan has {e}", placement.experts)));
        }
        if tokens.start > tokens.end || tokens.end > s {
            return Err(Error::Precondition(format!("bucketing tokens {tokens:?} of {s}")));
        }
        let params = BucketParams {
            s: to_u32("tokens", s)?,
            k: to_u32("k", k)?,
            e: to_u32("experts", e)?,
            slots: to_u32("expert slots", placement.slots)?,
            t0: tokens.start as u32,
            t1: tokens.end as u32,
            fingerprint: placement.fingerprint,
            ..Default::default()
        };
        let schedule = BucketSchedule::new(params);
        fits_i32("bucketing scratch words", schedule.scratch_words)?;
        output(b, "bucketing scratch", &[schedule.scratch_words], DType::I32)?;
        Ok(BucketOp { plan, placement, tokens, schedule })
    }
}

/// What a backend's bucketing returns; the front door checks the shapes and seals it.
pub struct BucketParts<B: Device> {
    /// Kept routes per physical slot, then S and the placement's fingerprint: `[P + 2]` i32.
    pub counts: Tensor<B>,
    /// Send row of every route `[S, k]` i32, −1 when not sent.
    pub rows: Tensor<B>,
}

/// The bucketing: routes per physical slot and the send row of every route.
pub struct Bucket<B: Device> {
    /// `[P + 2]` i32: kept routes of this rank's tokens per physical slot, in slot order (by
    /// destination rank, then local slot), then the tokens S and the placement's
    /// fingerprint. Gathered from every rank, the counts size the exchange and the last
    /// two words show that the ranks agree on the batch and on where the experts live.
    pub counts: Tensor<B>,
    /// The send row of every route (within `S·k`; the first `Σ counts` rows are sent).
    pub rows: RouteRows<B>,
}

impl<B: Device> Bucket<B> {
    /// Checks what a backend returned for `op`.
    pub(crate) fn seal(b: &B, op: &BucketOp<'_, B>, p: BucketParts<B>) -> Result<Self> {
        let (s, k) = (op.plan.tokens(), op.plan.k());
        let counts = super::returned(b, "bucket", p.counts, &[op.placement.slots + 2], DType::I32)?;
        let rows = super::returned(b, "bucket", p.rows, &[s, k], DType::I32)?;
        Ok(Bucket { counts, rows: RouteRows::from_op(rows, s * k) })
    }
}

/// A gather of row blocks: output rows `out_start[j]..out_start[j + 1]` (consecutive
/// from 0) are input rows `in_start[j]..`, each block inside the input. On the device as
/// `[2B + 1]` i32 (`out_start[0..=B]`, then `in_start[0..B]`); made from host block
/// sizes checked on the way in.
pub struct BlockTable<B: Device> {
    tensor: Tensor<B>,
    blocks: usize,
    in_rows: usize,
    out_rows: usize,
}

impl<B: Device> BlockTable<B> {
    /// The table whose output is `blocks` in order, each `(in_start, rows)` of an input
    /// of `in_rows` rows.
    pub fn new(b: &B, blocks: &[(usize, usize)], in_rows: usize) -> Result<Self> {
        let mut out_start = Vec::with_capacity(2 * blocks.len() + 1);
        let mut total = 0usize;
        out_start.push(0i32);
        for (j, &(start, rows)) in blocks.iter().enumerate() {
            let end = start.checked_add(rows).filter(|&e| e <= in_rows).ok_or_else(|| {
                Error::Precondition(format!("row block {j} ({start}, {rows} rows) is past the {in_rows} input rows"))
            })?;
            total = total.checked_add(rows).ok_or_else(|| Error::Precondition("row blocks overflow".into()))?;
            fits_i32("regrouped rows", total.max(end))?;
            out_start.push(total as i32);
        }
        out_start.extend(blocks.iter().map(|&(start, _)| start as i32));
        let len = out_start.len();
        let tensor = b.upload(&HostTensor::i32(&[len], out_start)?)?;
        Ok(BlockTable { tensor, blocks: blocks.len(), in_rows, out_rows: total })
    }

    /// The device table `[2B + 1]`.
    pub fn tensor(&self) -> &Tensor<B> {
        &self.tensor
    }

    /// Blocks B.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Rows of the input the blocks read.
    pub fn in_rows(&self) -> usize {
        self.in_rows
    }

    /// Rows of the output.
    pub fn out_rows(&self) -> usize {
        self.out_rows
    }
}

/// Regrouping of rows by a block table, checked: `x [in_rows, M]` → `[out_rows, M]`.
#[non_exhaustive]
pub struct RegroupOp<'a, B: Device> {
    /// Input rows, f32.
    pub x: &'a Tensor<B>,
    /// The blocks.
    pub table: &'a BlockTable<B>,
    /// Output shape `[out_rows, M]`.
    pub out_shape: [usize; 2],
    /// Kernel parameters (`n` = out_rows·M).
    pub params: RegroupParams,
}

impl<'a, B: Device> RegroupOp<'a, B> {
    /// Checks `x` against the table's input rows.
    pub fn check(b: &B, x: &'a Tensor<B>, table: &'a BlockTable<B>) -> Result<Self> {
        let (r, m) = f32_matrix("rows to regroup", x)?;
        if r != table.in_rows {
            return Err(Error::shape(
                "rows to regroup",
                format!("[{}, hidden] (the table's input)", table.in_rows),
                x.shape(),
            ));
        }
        let n = output(b, "regrouped rows", &[table.out_rows, m], DType::F32)?;
        let params =
            RegroupParams { n: n as u64, cols: to_u32("hidden size", m)?, blocks: to_u32("row blocks", table.blocks)? };
        Ok(RegroupOp { x, table, out_shape: [table.out_rows, m], params })
    }
}
