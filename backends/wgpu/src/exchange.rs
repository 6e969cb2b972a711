//! Launchers of the expert-parallel exchange's device ops: `shaders/bucket.wgsl` (the
//! passes `kernel_abi::bucket` describes) and `shaders/regroup.wgsl`.

use crate::elementwise::{count, f32buf};
use crate::kernels::{BUCKET, REGROUP};
use crate::{WgpuBackend, T};
use moe_engine::kernel_abi::{grid_1d, WG_ELEMENTWISE, WG_PLAN};
use moe_engine::ops::{BucketOp, BucketParts, RegroupOp};
use moe_engine::{DType, Result};

pub(crate) fn bucket(b: &WgpuBackend, op: &BucketOp<'_, WgpuBackend>) -> Result<BucketParts<WgpuBackend>> {
    let sched = &op.schedule;
    let (s, k) = (op.plan.tokens(), op.plan.k());
    let counts = b.tensor(&[op.placement.slots() + 2], DType::I32, "routes per slot")?;
    let rows = b.tensor(&[s, k], DType::I32, "send rows")?;
    let scratch = b.alloc(4 * sched.scratch_words as u64, "bucketing scratch")?;
    let i32buf = |t, name| WgpuBackend::buf(t, name, DType::I32);
    let bufs = [
        i32buf(&op.plan.rows, "plan.rows")?,
        i32buf(op.plan.offsets.tensor(), "plan.offsets")?,
        i32buf(&op.placement.replica_offsets, "replica offsets")?,
        i32buf(&op.placement.replica_slots, "replica slots")?,
        &scratch.buf,
        &counts.buffer().buf,
        &rows.buffer().buf,
    ];
    for pass in &sched.passes {
        b.dispatch(&BUCKET, pass.entry, &sched.params, &bufs, grid_1d(pass.invocations, WG_PLAN))?;
    }
    Ok(BucketParts { counts, rows })
}

pub(crate) fn regroup(b: &WgpuBackend, op: &RegroupOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&op.out_shape, DType::F32, "regrouped rows")?;
    let n = count(op.params.n)?;
    if n > 0 {
        let bufs = [
            f32buf(op.x, "rows to regroup")?,
            WgpuBackend::buf(op.table.tensor(), "block table", DType::I32)?,
            &out.buffer().buf,
        ];
        b.dispatch(&REGROUP, "regroup", &op.params, &bufs, grid_1d(n, WG_ELEMENTWISE))?;
    }
    Ok(out)
}
