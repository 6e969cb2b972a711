//! Launchers of the expert-parallel exchange's device ops: kernels/bucket.cu (the passes
//! `kernel_abi::bucket` describes) and kernels/regroup.cu.

use crate::device::{derr, CudaBackend, Param, T};
use crate::launch;
use cudarc::driver::PushKernelArg;
use moe_engine::ops::{BucketOp, BucketParts, RegroupOp};
use moe_engine::Result;

impl CudaBackend {
    pub(crate) fn bucket(&self, op: &BucketOp<'_, Self>) -> Result<BucketParts<Self>> {
        let sched = &op.schedule;
        let (s, k) = (op.plan.tokens(), op.plan.k());
        let slots = op.placement.slots();
        let rows = Self::i32s(&op.plan.rows, "plan.rows")?;
        let offsets = Self::i32s(op.plan.offsets.tensor(), "plan.offsets")?;
        let rep_off = Self::i32s(&op.placement.replica_offsets, "replica offsets")?;
        let rep_slots = Self::i32s(&op.placement.replica_slots, "replica slots")?;
        let mut scratch = self.zeros::<i32>(sched.scratch_words)?;
        let mut counts = self.zeros::<i32>(slots + 2)?;
        let mut send = self.zeros::<i32>(s * k)?;
        let p = Param(sched.params);
        for pass in &sched.passes {
            let f = self.function("bucket.cu", pass.entry)?;
            // SAFETY: every pass of kernels/bucket.cu takes the same arguments
            // (kernel_abi::bucket::BINDINGS, then BucketParams); the buffers are sized by the
            // schedule, plan rows and offsets come from the plan op and the replica tables
            // from a checked placement.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(rows)
                    .arg(offsets)
                    .arg(rep_off)
                    .arg(rep_slots)
                    .arg(&mut scratch)
                    .arg(&mut counts)
                    .arg(&mut send)
                    .arg(&p)
                    .launch(launch::bucket_pass(pass).config())
            }
            .map_err(derr)?;
        }
        Ok(BucketParts { counts: Self::out_i32(&[slots + 2], counts)?, rows: Self::out_i32(&[s, k], send)? })
    }

    pub(crate) fn regroup(&self, op: &RegroupOp<'_, Self>) -> Result<T> {
        let n = op.params.n as usize;
        let mut out = self.zeros::<f32>(n)?;
        if n > 0 {
            let f = self.function("regroup.cu", "regroup")?;
            let p = Param(op.params);
            // SAFETY: matches kernels/regroup.cu (src, table, out, RegroupParams); the table
            // was checked on the host: every block lies inside `src`, and out holds n values.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(Self::f32s(op.x, "rows to regroup")?)
                    .arg(Self::i32s(op.table.tensor(), "block table")?)
                    .arg(&mut out)
                    .arg(&p)
                    .launch(launch::per_element(n).config())
            }
            .map_err(derr)?;
        }
        Self::out(&op.out_shape, out)
    }
}
