//! The expert-parallel exchange's device ops on the cpu: bucketing kept routes by
//! destination slot, and regrouping row blocks. The same passes as
//! `moe_engine::kernel_abi::bucket` describes for the GPU kernels, written as loops.

use crate::par::Par;
use crate::{f32s, i32s, tf32, ti32, CpuBackend, T};
use moe_engine::ops::{BucketOp, BucketParts, RegroupOp};
use moe_engine::Result;

/// Routes per physical slot and the send row of every route: each logical expert's
/// compact rows are walked in order, so within a slot routes keep the plan's order.
pub(crate) fn bucket(op: &BucketOp<'_, CpuBackend>) -> Result<BucketParts<CpuBackend>> {
    let (s, k) = (op.plan.tokens(), op.plan.k());
    let rows = i32s(&op.plan.rows, "plan.rows")?;
    let offsets = i32s(op.plan.offsets.tensor(), "plan.offsets")?;
    let rep_off = i32s(&op.placement.replica_offsets, "replica offsets")?;
    let rep_slots = i32s(&op.placement.replica_slots, "replica slots")?;
    let slots = op.placement.slots();
    // Compact row → route, for the routes this rank sends (rows come from the plan op,
    // so each is in range and names one route).
    let mut inverse = vec![usize::MAX; s * k];
    for (r, &row) in rows.iter().enumerate() {
        if row >= 0 && op.tokens.contains(&(r / k)) {
            inverse[row as usize] = r;
        }
    }
    let mut counts = vec![0i32; slots];
    let mut slot_pos = vec![(0usize, 0i32); s * k];
    for e in 0..op.plan.num_experts() {
        let reps = &rep_slots[rep_off[e] as usize..rep_off[e + 1] as usize];
        for &r in &inverse[offsets[e] as usize..offsets[e + 1] as usize] {
            if r == usize::MAX {
                continue;
            }
            let p = reps[(r / k) % reps.len()] as usize;
            slot_pos[r] = (p, counts[p]);
            counts[p] += 1;
        }
    }
    let mut base = vec![0i32; slots + 1];
    for p in 0..slots {
        base[p + 1] = base[p] + counts[p];
    }
    let send: Vec<i32> = (0..s * k)
        .map(|r| {
            if rows[r] >= 0 && op.tokens.contains(&(r / k)) {
                let (p, pos) = slot_pos[r];
                base[p] + pos
            } else {
                -1
            }
        })
        .collect();
    counts.extend([op.schedule.params.s as i32, op.placement.fingerprint() as i32]);
    Ok(BucketParts { counts: ti32(&[slots + 2], counts)?, rows: ti32(&[s, k], send)? })
}

/// Output block j is input rows `in_start[j]..` of the table.
pub(crate) fn regroup(op: &RegroupOp<'_, CpuBackend>, par: Par) -> Result<T> {
    let [rows, m] = op.out_shape;
    let b = op.table.blocks();
    let table = i32s(op.table.tensor(), "block table")?;
    let (out_start, in_start) = table.split_at(b + 1);
    let x = f32s(op.x, "rows to regroup")?;
    let mut out = vec![0f32; rows * m];
    // Each output row finds its block (the last whose start is at most the row).
    par.rows_mut(&mut out, m, |q, o| {
        let j = out_start[..b].partition_point(|&st| st as usize <= q) - 1;
        let src = in_start[j] as usize + q - out_start[j] as usize;
        o.copy_from_slice(&x[src * m..(src + 1) * m]);
    });
    tf32(&op.out_shape, out)
}
