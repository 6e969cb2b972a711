//! Launchers of the backward and optimizer kernels: kernels/grad_matmul.cu (the input and
//! weight gradients of the products), kernels/grad.cu (activation, combine, residual mix,
//! gated add), kernels/route_grad.cu (the router) and kernels/optim.cu (the optimizer step
//! and the sum of squares). Every output is allocated zeroed, so rows no kernel thread
//! writes (past the last group, rows no route names) hold zeros; the kernels write every
//! other element themselves.
//!
//! The products do not go to cuBLAS: a grouped call would need the group sizes on the host
//! (a synchronisation inside every backward), and cuBLAS picks its algorithm (split-K
//! among them) per device, so the order of the sums over rows, hence the gradient's bits,
//! would follow the device. The kernels here sum each element in one order everywhere.

use crate::device::{derr, CudaBackend, CudaBuffer, Param, T};
use crate::launch;
use cudarc::driver::{CudaSlice, PushKernelArg};
use moe_engine::ops::{
    ActGradOp, CombineGrad, CombineGradOp, GatedAddGrad, GatedAddGradOp, LinearDxOp, MixGrad, MixGradOp, OptimStepOp,
    RouteGradOp, StepOut, SumRowsOp, SumSquaresOp, WeightGrad, WeightGradOp,
};
use moe_engine::{Error, Result};

impl CudaBackend {
    /// The offsets of a grouped op, or `None` for a dense one.
    fn offsets_of(o: Option<&moe_engine::ops::Offsets<Self>>) -> Result<Option<&CudaSlice<i32>>> {
        o.map(|o| Self::i32s(o.tensor(), "offsets")).transpose()
    }

    pub(crate) fn linear_dx(&self, op: &LinearDxOp<'_, Self>) -> Result<T> {
        let (r, k) = (op.rows, op.k);
        let mut dx = self.zeros::<f32>(r * k)?;
        if r * k > 0 {
            let f = self.function("grad_matmul.cu", "linear_dx")?;
            let offsets = Self::offsets_of(op.offsets)?;
            let null = 0u64;
            let p = Param(op.params);
            let mut args = self.stream.launch_builder(&f);
            args.arg(Self::f32s(op.dy, "output gradient")?);
            match op.w.buffer() {
                CudaBuffer::F32(s) => args.arg(s),
                CudaBuffer::Half(s) => args.arg(s),
                CudaBuffer::I32(_) => return Err(Error::Internal("a product weight stored as i32".into())),
            };
            match offsets {
                Some(o) => args.arg(o),
                None => args.arg(&null),
            };
            args.arg(&mut dx).arg(&p);
            // SAFETY: matches kernels/grad_matmul.cu linear_dx(dy, w, offsets, dx,
            // GradMatmulParams): dy holds [r, n], w [G, n, k] in the storage `wdtype` names,
            // offsets G + 1 values when `grouped` (null and unread otherwise), dx [r, k].
            unsafe { args.launch(launch::linear_dx(&op.params).config()) }.map_err(derr)?;
        }
        Self::out(&[r, k], dx)
    }

    pub(crate) fn weight_grad(&self, op: &WeightGradOp<'_, Self>) -> Result<WeightGrad<Self>> {
        let (g, n, k) = (op.groups, op.n, op.k);
        let dy = Self::f32s(op.dy, "output gradient")?;
        let x = Self::f32s(op.x, "forward input")?;
        let offsets = Self::offsets_of(op.offsets)?;
        let null = 0u64;
        let p = Param(op.params);
        // Both entry points take (dy, x, offsets, out, GradMatmulParams).
        let run = |entry: &str, out: &mut CudaSlice<f32>, geometry: launch::Launch| -> Result<()> {
            let f = self.function("grad_matmul.cu", entry)?;
            let mut args = self.stream.launch_builder(&f);
            args.arg(dy).arg(x);
            match offsets {
                Some(o) => args.arg(o),
                None => args.arg(&null),
            };
            args.arg(out).arg(&p);
            // SAFETY: matches kernels/grad_matmul.cu weight_grad / bias_grad (dy, x, offsets,
            // out, GradMatmulParams): dy holds [r, n], x [r, k], offsets G + 1 values when
            // `grouped` (null and unread otherwise), out [G, n, k] (weight_grad) or [G, n].
            unsafe { args.launch(geometry.config()) }.map_err(derr)?;
            Ok(())
        };
        let mut dw = self.zeros::<f32>(g * n * k)?;
        if g * n * k > 0 {
            run("weight_grad", &mut dw, launch::weight_grad(&op.params))?;
        }
        let db = if op.bias {
            let mut db = self.zeros::<f32>(g * n)?;
            if g * n > 0 {
                run("bias_grad", &mut db, launch::bias_grad(&op.params))?;
            }
            Some(Self::out(&op.b_shape, db)?)
        } else {
            None
        };
        Ok(WeightGrad { dw: Self::out(&op.w_shape, dw)?, db })
    }

    /// The column sum: kernels/grad_matmul.cu `bias_grad` over one dense group (x and the
    /// offsets unread).
    pub(crate) fn sum_rows(&self, op: &SumRowsOp<'_, Self>) -> Result<T> {
        let mut out = self.zeros::<f32>(op.cols)?;
        if op.cols > 0 {
            let f = self.function("grad_matmul.cu", "bias_grad")?;
            let null = 0u64;
            let p = Param(op.params);
            // SAFETY: matches kernels/grad_matmul.cu bias_grad(dy, x, offsets, db,
            // GradMatmulParams): dy holds [rows, cols], db cols values; `grouped` is 0, so x
            // and the offsets are not read.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(Self::f32s(op.dy, "row sum input")?)
                    .arg(&null)
                    .arg(&null)
                    .arg(&mut out)
                    .arg(&p)
                    .launch(launch::bias_grad(&op.params).config())
            }
            .map_err(derr)?;
        }
        Self::out(&[op.cols], out)
    }

    pub(crate) fn act_grad(&self, op: &ActGradOp<'_, Self>) -> Result<T> {
        let [r, n] = op.out_shape;
        let mut out = self.zeros::<f32>(r * n)?;
        if r * n > 0 {
            let f = self.function("grad.cu", "act_grad")?;
            let p = Param(op.params);
            // SAFETY: matches kernels/grad.cu act_grad(dy, pre, out, GradParams): dy holds
            // [r, I], pre and out [r, n] with n = I, or 2·I when `glu`.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(Self::f32s(op.dy, "activation output gradient")?)
                    .arg(Self::f32s(op.pre, "pre-activation")?)
                    .arg(&mut out)
                    .arg(&p)
                    .launch(launch::act_grad(&op.params).config())
            }
            .map_err(derr)?;
        }
        Self::out(&op.out_shape, out)
    }

    pub(crate) fn combine_grad(&self, op: &CombineGradOp<'_, Self>) -> Result<CombineGrad<Self>> {
        let dy = Self::f32s(op.dy, "combined output gradient")?;
        let rows = Self::i32s(op.rows.tensor(), "route rows")?;
        let p = Param(op.params);
        // d_yp starts zeroed: rows no route of the range names stay zero.
        let mut d_yp = self.zeros::<f32>(op.yp.numel())?;
        let routed = op.tokens.len() * op.rows.k() * op.yp.shape()[1];
        if routed > 0 {
            let f = self.function("grad.cu", "combine_grad_rows")?;
            // SAFETY: matches kernels/grad.cu combine_grad_rows(dy, rows, weights, d_yp,
            // GradParams): dy holds [t1 − t0, M], rows and weights [S, k], d_yp [bound, M];
            // route rows come from the ops that compute them, so each names a row of d_yp,
            // and no two routes name the same row.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(dy)
                    .arg(rows)
                    .arg(Self::f32s(op.weights, "combine weights")?)
                    .arg(&mut d_yp)
                    .arg(&p)
                    .launch(launch::combine_grad_rows(&op.params).config())
            }
            .map_err(derr)?;
        }
        let mut d_w = self.zeros::<f32>(op.weights.numel())?;
        if op.weights.numel() > 0 {
            let f = self.function("grad.cu", "combine_grad_weights")?;
            // SAFETY: matches kernels/grad.cu combine_grad_weights(dy, yp, rows, d_w,
            // GradParams): dy holds [t1 − t0, M], yp [bound, M], rows and d_w [S, k].
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(dy)
                    .arg(Self::f32s(op.yp, "expert output")?)
                    .arg(rows)
                    .arg(&mut d_w)
                    .arg(&p)
                    .launch(launch::combine_grad_weights(&op.params).config())
            }
            .map_err(derr)?;
        }
        Ok(CombineGrad { d_yp: Self::out(op.yp.shape(), d_yp)?, d_weights: Self::out(op.weights.shape(), d_w)? })
    }

    pub(crate) fn route_grad(&self, op: &RouteGradOp<'_, Self>) -> Result<T> {
        let (s, e) = (op.tokens, op.experts);
        let mut out = self.zeros::<f32>(s * e)?;
        if s > 0 {
            let f = self.function("route_grad.cu", "route_grad")?;
            let null = 0u64;
            let p = Param(op.params);
            let mut args = self.stream.launch_builder(&f);
            args.arg(Self::f32s(op.d_weights, "combine weight gradient")?)
                .arg(Self::i32s(&op.routes.experts, "routes.experts")?)
                .arg(Self::f32s(&op.routes.weights, "routes.weights")?)
                .arg(Self::f32s(&op.routes.scores, "routes.scores")?)
                .arg(Self::i32s(&op.plan.rows, "plan.rows")?)
                .arg(Self::f32s(op.logits, "router logits")?);
            match &op.aux {
                Some(a) => args.arg(Self::i32s(a.counts, "router loss counts")?),
                None => args.arg(&null),
            };
            args.arg(&mut out).arg(&p);
            // SAFETY: matches kernels/route_grad.cu route_grad(d_weights, experts, weights,
            // scores, rows, logits, counts, out, RouteGradParams): [S, k] route tensors,
            // [S, E] scores, logits and out, counts [E] when `has_aux` (null and unread
            // otherwise); expert ids come from a checked Routes, so each is below E.
            unsafe { args.launch(launch::route_grad(s).config()) }.map_err(derr)?;
        }
        Self::out(&[s, e], out)
    }

    pub(crate) fn mix_grad(&self, op: &MixGradOp<'_, Self>) -> Result<MixGrad<Self>> {
        let shape = op.dy.shape();
        let r = shape[0];
        let mut d_moe = self.zeros::<f32>(op.dy.numel())?;
        let mut d_mlp = self.zeros::<f32>(op.dy.numel())?;
        let mut d_coef = self.zeros::<f32>(2 * r)?;
        if r > 0 {
            let f = self.function("grad.cu", "mix_grad")?;
            let p = Param(op.params);
            // SAFETY: matches kernels/grad.cu mix_grad(dy, moe, mlp, coef, d_moe, d_mlp,
            // d_coef, GradParams): dy, moe, mlp, d_moe and d_mlp hold [r, M], coef and d_coef
            // [r, 2]; one block per row.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(Self::f32s(op.dy, "mix output gradient")?)
                    .arg(Self::f32s(op.moe, "moe output")?)
                    .arg(Self::f32s(op.mlp, "residual mlp output")?)
                    .arg(Self::f32s(op.coef, "coefficient logits")?)
                    .arg(&mut d_moe)
                    .arg(&mut d_mlp)
                    .arg(&mut d_coef)
                    .arg(&p)
                    .launch(launch::grad_rows(r).config())
            }
            .map_err(derr)?;
        }
        Ok(MixGrad {
            d_moe: Self::out(shape, d_moe)?,
            d_mlp: Self::out(shape, d_mlp)?,
            d_coef: Self::out(op.coef.shape(), d_coef)?,
        })
    }

    pub(crate) fn gated_add_grad(&self, op: &GatedAddGradOp<'_, Self>) -> Result<GatedAddGrad<Self>> {
        let shape = op.dy.shape();
        let r = shape[0];
        let mut d_shared = self.zeros::<f32>(op.dy.numel())?;
        let mut d_gate = self.zeros::<f32>(r)?;
        if r > 0 {
            let f = self.function("grad.cu", "gated_add_grad")?;
            let p = Param(op.params);
            // SAFETY: matches kernels/grad.cu gated_add_grad(dy, shared, gate, d_shared,
            // d_gate, GradParams): dy, shared and d_shared hold [r, M], gate and d_gate
            // [r, 1]; one block per row.
            unsafe {
                self.stream
                    .launch_builder(&f)
                    .arg(Self::f32s(op.dy, "sum gradient")?)
                    .arg(Self::f32s(op.shared, "shared expert output")?)
                    .arg(Self::f32s(op.gate, "shared_expert_gate logits")?)
                    .arg(&mut d_shared)
                    .arg(&mut d_gate)
                    .arg(&p)
                    .launch(launch::grad_rows(r).config())
            }
            .map_err(derr)?;
        }
        Ok(GatedAddGrad { d_shared: Self::out(shape, d_shared)?, d_gate: Self::out(op.gate.shape(), d_gate)? })
    }

    pub(crate) fn optim_step(&self, op: &OptimStepOp<'_, Self>) -> Result<StepOut<Self>> {
        let shape = op.param.shape();
        let n = op.param.numel();
        let mut p_out = self.zeros::<f32>(n)?;
        let mut m_out = op.rule.has_m().then(|| self.zeros::<f32>(n)).transpose()?;
        let mut v_out = op.rule.has_v().then(|| self.zeros::<f32>(n)).transpose()?;
        if n > 0 {
            let f = self.function("optim.cu", "optim_step")?;
            let null = 0u64;
            let p = Param(op.params);
            let mut args = self.stream.launch_builder(&f);
            args.arg(Self::f32s(op.param, "parameter")?).arg(Self::f32s(op.grad, "gradient")?);
            for state in [op.m, op.v] {
                match state {
                    Some(t) => args.arg(Self::f32s(t, "optimizer state")?),
                    None => args.arg(&null),
                };
            }
            args.arg(&mut p_out);
            for state in [&mut m_out, &mut v_out] {
                match state {
                    Some(s) => args.arg(s),
                    None => args.arg(&null),
                };
            }
            args.arg(&p);
            // SAFETY: matches kernels/optim.cu optim_step(param, grad, m, v, p_out, m_out,
            // v_out, OptimParams): every buffer holds n values; m is read only when `has_m`
            // (checked present), v and the state outputs only for the rules that keep them
            // (the check gives Adam both moments, and the outputs follow the rule), null
            // and unread otherwise.
            unsafe { args.launch(launch::optim_step(n).config()) }.map_err(derr)?;
        }
        Ok(StepOut {
            param: Self::out(shape, p_out)?,
            m: m_out.map(|m| Self::out(shape, m)).transpose()?,
            v: v_out.map(|v| Self::out(shape, v)).transpose()?,
        })
    }

    pub(crate) fn sum_squares(&self, op: &SumSquaresOp<'_, Self>) -> Result<T> {
        let n = op.x.numel();
        let mut partials = self.zeros::<f32>(launch::SUM_SQUARES_PARTIALS)?;
        let mut out = self.zeros::<f32>(1)?;
        let p = Param(op.params);
        let first = self.function("optim.cu", "sum_squares_partial")?;
        // SAFETY: matches kernels/optim.cu sum_squares_partial(x, partials, OptimParams): x
        // holds n values (at least one allocated), partials SUM_SQUARES_PARTIALS, at least
        // the grid's blocks.
        unsafe {
            self.stream
                .launch_builder(&first)
                .arg(Self::f32s(op.x, "tensor")?)
                .arg(&mut partials)
                .arg(&p)
                .launch(launch::sum_squares_partial(n).config())
        }
        .map_err(derr)?;
        let last = self.function("optim.cu", "sum_squares_final")?;
        // SAFETY: matches kernels/optim.cu sum_squares_final(partials, out, OptimParams):
        // partials holds SUM_SQUARES_PARTIALS values (all written by the first pass), out 1.
        unsafe {
            self.stream
                .launch_builder(&last)
                .arg(&partials)
                .arg(&mut out)
                .arg(&p)
                .launch(launch::sum_squares_final().config())
        }
        .map_err(derr)?;
        Self::out(&[1], out)
    }
}
