//! Launchers of kernels/elementwise.cu and kernels/permute.cu: one thread per output
//! element, every entry point of a family with the same arguments.

use crate::device::{derr, CudaBackend, Param, T};
use crate::launch;
use cudarc::driver::{CudaSlice, PushKernelArg};
use moe_engine::ops::{CombineOp, ElementwiseOp, PassRowsOp, PermuteOp, PermuteScaledOp};
use moe_engine::Result;

impl CudaBackend {
    pub(crate) fn elementwise(&self, op: &ElementwiseOp<'_, Self>) -> Result<T> {
        let n = op.params.n as usize;
        let mut out = self.zeros::<f32>(n)?;
        if n > 0 {
            let f = self.function("elementwise.cu", op.kind.entry())?;
            let a = Self::f32s(op.a, "elementwise input")?;
            let b = op.b.map(|t| Self::f32s(t, "elementwise input")).transpose()?.unwrap_or(&self.dummy);
            let c = op.c.map(|t| Self::f32s(t, "elementwise input")).transpose()?.unwrap_or(&self.dummy);
            let p = Param(op.params);
            // SAFETY: matches kernels/elementwise.cu (a, b, c, out, ElementwiseParams); the
            // checked op sized every operand the kind reads, out holds n values.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(a)
                    .arg(b)
                    .arg(c)
                    .arg(&mut out)
                    .arg(&p)
                    .launch(launch::per_element(n).config())
            }
            .map_err(derr)?;
        }
        Self::out(&op.out_shape, out)
    }

    /// permute or combine: `src` rows moved by the route rows (and weights); `n` threads,
    /// an output of `shape` (zero where no thread writes).
    fn rows_op(
        &self,
        entry: &str,
        src: &T,
        rows: &T,
        weights: &CudaSlice<f32>,
        params: moe_engine::kernel_abi::PermuteParams,
        shape: &[usize],
    ) -> Result<T> {
        let n = params.n as usize;
        let mut out = self.zeros::<f32>(shape.iter().product())?;
        if n > 0 {
            let f = self.function("permute.cu", entry)?;
            let p = Param(params);
            // SAFETY: matches kernels/permute.cu (src, rows, weights, out, PermuteParams);
            // route rows come from the ops that compute them, so each indexes a row of the
            // layout (the output of permute, `src` of combine), named once; for pass_rows
            // `rows` holds checked group offsets (G + 1 values, non-decreasing, within the
            // R rows) and src, weights and out all hold [R, M].
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(Self::f32s(src, "rows")?)
                    .arg(Self::i32s(rows, "route rows")?)
                    .arg(weights)
                    .arg(&mut out)
                    .arg(&p)
                    .launch(launch::per_element(n).config())
            }
            .map_err(derr)?;
        }
        Self::out(shape, out)
    }

    pub(crate) fn permute(&self, op: &PermuteOp<'_, Self>) -> Result<T> {
        self.rows_op("permute", op.x, op.rows.tensor(), &self.dummy, op.params, &op.out_shape)
    }

    pub(crate) fn permute_scaled(&self, op: &PermuteScaledOp<'_, Self>) -> Result<T> {
        let w = Self::f32s(op.weights, "route weights")?;
        self.rows_op("permute_scaled", op.x, op.rows.tensor(), w, op.params, &op.out_shape)
    }

    /// pass_rows on the permute family's arguments: x as the source rows, the group offsets
    /// as the route rows, y as the weights (kernels/permute.cu says so). Every output
    /// element is written (from x or from y).
    pub(crate) fn pass_rows(&self, op: &PassRowsOp<'_, Self>) -> Result<T> {
        let y = Self::f32s(op.y, "pass_rows y")?;
        self.rows_op("pass_rows", op.x, op.offsets.tensor(), y, op.params, &op.out_shape)
    }

    pub(crate) fn combine(&self, op: &CombineOp<'_, Self>) -> Result<T> {
        let w = Self::f32s(op.weights, "combine weights")?;
        self.rows_op("combine", op.yp, op.rows.tensor(), w, op.params, &op.out_shape)
    }
}
