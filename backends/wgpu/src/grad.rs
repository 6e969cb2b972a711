//! Launchers of the backward and optimizer shaders: `shaders/grad_matmul.wgsl`,
//! `shaders/grad.wgsl`, `shaders/route_grad.wgsl` and `shaders/optim.wgsl`. The ops'
//! checks filled the parameter blocks; this binds buffers and dispatches.

use crate::elementwise::f32buf;
use crate::kernels::{GRAD, GRAD_MATMUL, OPTIM, ROUTE_GRAD};
use crate::{WgpuBackend, T};
use moe_engine::kernel_abi::{grid_1d, GradMatmulParams, WG_ELEMENTWISE};
use moe_engine::ops::{
    ActGradOp, CombineGrad, CombineGradOp, GatedAddGrad, GatedAddGradOp, LinearDxOp, MixGrad, MixGradOp, OptimStepOp,
    RouteGradOp, StepOut, SumRowsOp, SumSquaresOp, WeightGrad, WeightGradOp,
};
use moe_engine::{DType, Result};

/// Threads per workgroup of `route_grad` (one token each).
const WG_ROUTE_GRAD: u32 = 64;

fn i32buf<'a>(t: &'a T, name: &str) -> Result<&'a wgpu::Buffer> {
    WgpuBackend::buf(t, name, DType::I32)
}

/// `dy · w[g]`: one dispatch per weight part (a stack larger than the adapter's largest
/// binding is split, as the forward's products read it), each adding its share.
pub(crate) fn linear_dx(b: &WgpuBackend, op: &LinearDxOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&[op.rows, op.k], DType::F32, "input gradient")?;
    let n = op.rows * op.k;
    if n > 0 {
        let off = op.offsets.map_or(Ok(&b.dummy), |o| i32buf(o.tensor(), "offsets"))?;
        let dy = f32buf(op.dy, "output gradient")?;
        for (i, part) in b.weight_parts(op.w)?.iter().enumerate() {
            let params = GradMatmulParams {
                accumulate: (i > 0) as u32,
                g0: part.g0 as u32,
                g1: part.g1 as u32,
                c0: part.c0 as u32,
                c1: part.c1 as u32,
                ..op.params
            };
            let bufs = [dy, &part.buf, off, &out.buffer().buf, &b.dummy_rw];
            b.dispatch(&GRAD_MATMUL, "linear_dx", &params, &bufs, grid_1d(n, WG_ELEMENTWISE))?;
        }
    }
    Ok(out)
}

pub(crate) fn weight_grad(b: &WgpuBackend, op: &WeightGradOp<'_, WgpuBackend>) -> Result<WeightGrad<WgpuBackend>> {
    let dw = b.tensor(&op.w_shape, DType::F32, "weight gradient")?;
    let db = if op.bias { Some(b.tensor(&op.b_shape, DType::F32, "bias gradient")?) } else { None };
    let off = op.offsets.map_or(Ok(&b.dummy), |o| i32buf(o.tensor(), "offsets"))?;
    let db_buf = db.as_ref().map_or(&b.dummy_rw, |t| &t.buffer().buf);
    let bufs = [f32buf(op.dy, "output gradient")?, f32buf(op.x, "forward input")?, off, &dw.buffer().buf, db_buf];
    let n = op.groups * op.n * op.k;
    if n > 0 {
        b.dispatch(&GRAD_MATMUL, "weight_grad", &op.params, &bufs, grid_1d(n, WG_ELEMENTWISE))?;
    }
    if op.bias && op.groups * op.n > 0 {
        b.dispatch(&GRAD_MATMUL, "bias_grad", &op.params, &bufs, grid_1d(op.groups * op.n, WG_ELEMENTWISE))?;
    }
    Ok(WeightGrad { dw, db })
}

/// The column sum: grad_matmul.wgsl's `bias_grad` over one dense group (x unbound).
pub(crate) fn sum_rows(b: &WgpuBackend, op: &SumRowsOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&[op.cols], DType::F32, "row sum")?;
    if op.cols > 0 {
        let bufs = [f32buf(op.dy, "row sum input")?, &b.dummy, &b.dummy, &b.dummy_rw, &out.buffer().buf];
        b.dispatch(&GRAD_MATMUL, "bias_grad", &op.params, &bufs, grid_1d(op.cols, WG_ELEMENTWISE))?;
    }
    Ok(out)
}

pub(crate) fn act_grad(b: &WgpuBackend, op: &ActGradOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&op.out_shape, DType::F32, "pre-activation gradient")?;
    let n = op.out_shape[0] * op.out_shape[1];
    if n > 0 {
        let bufs = [
            f32buf(op.dy, "activation output gradient")?,
            f32buf(op.pre, "pre-activation")?,
            &b.dummy,
            &b.dummy,
            &b.dummy,
            &out.buffer().buf,
            &b.dummy_rw,
            &b.dummy_rw2,
        ];
        b.dispatch(&GRAD, "act_grad", &op.params, &bufs, grid_1d(n, WG_ELEMENTWISE))?;
    }
    Ok(out)
}

pub(crate) fn combine_grad(b: &WgpuBackend, op: &CombineGradOp<'_, WgpuBackend>) -> Result<CombineGrad<WgpuBackend>> {
    let d_yp = b.tensor(op.yp.shape(), DType::F32, "expert output gradient")?;
    let d_w = b.tensor(op.weights.shape(), DType::F32, "combine weight gradient")?;
    let p = &op.params;
    let bufs = [
        f32buf(op.dy, "combined output gradient")?,
        f32buf(op.yp, "expert output")?,
        f32buf(op.weights, "combine weights")?,
        &b.dummy,
        i32buf(op.rows.tensor(), "route rows")?,
        &d_yp.buffer().buf,
        &d_w.buffer().buf,
        &b.dummy_rw,
    ];
    let scattered = (p.t1 - p.t0) as usize * p.k as usize * p.cols as usize;
    if scattered > 0 {
        b.dispatch(&GRAD, "combine_grad_rows", p, &bufs, grid_1d(scattered, WG_ELEMENTWISE))?;
    }
    let routes = p.rows as usize * p.k as usize;
    if routes > 0 {
        b.dispatch(&GRAD, "combine_grad_weights", p, &bufs, grid_1d(routes, WG_ELEMENTWISE))?;
    }
    Ok(CombineGrad { d_yp, d_weights: d_w })
}

pub(crate) fn mix_grad(b: &WgpuBackend, op: &MixGradOp<'_, WgpuBackend>) -> Result<MixGrad<WgpuBackend>> {
    let shape = op.dy.shape();
    let d_moe = b.tensor(shape, DType::F32, "moe output gradient")?;
    let d_mlp = b.tensor(shape, DType::F32, "residual mlp gradient")?;
    let d_coef = b.tensor(op.coef.shape(), DType::F32, "coefficient gradient")?;
    if op.params.rows > 0 {
        let bufs = [
            f32buf(op.dy, "mix output gradient")?,
            f32buf(op.moe, "moe output")?,
            f32buf(op.mlp, "residual mlp output")?,
            f32buf(op.coef, "coefficient logits")?,
            &b.dummy,
            &d_moe.buffer().buf,
            &d_mlp.buffer().buf,
            &d_coef.buffer().buf,
        ];
        b.dispatch(&GRAD, "mix_grad", &op.params, &bufs, grid_1d(op.params.rows as usize, WG_ELEMENTWISE))?;
    }
    Ok(MixGrad { d_moe, d_mlp, d_coef })
}

pub(crate) fn gated_add_grad(
    b: &WgpuBackend,
    op: &GatedAddGradOp<'_, WgpuBackend>,
) -> Result<GatedAddGrad<WgpuBackend>> {
    let d_shared = b.tensor(op.dy.shape(), DType::F32, "shared expert gradient")?;
    let d_gate = b.tensor(op.gate.shape(), DType::F32, "shared expert gate gradient")?;
    if op.params.rows > 0 {
        let bufs = [
            f32buf(op.dy, "sum gradient")?,
            f32buf(op.shared, "shared expert output")?,
            f32buf(op.gate, "shared_expert_gate logits")?,
            &b.dummy,
            &b.dummy,
            &d_shared.buffer().buf,
            &d_gate.buffer().buf,
            &b.dummy_rw,
        ];
        b.dispatch(&GRAD, "gated_add_grad", &op.params, &bufs, grid_1d(op.params.rows as usize, WG_ELEMENTWISE))?;
    }
    Ok(GatedAddGrad { d_shared, d_gate })
}

pub(crate) fn route_grad(b: &WgpuBackend, op: &RouteGradOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&[op.tokens, op.experts], DType::F32, "logit gradient")?;
    if op.tokens > 0 {
        let counts = op.aux.as_ref().map_or(Ok(&b.dummy), |a| i32buf(a.counts, "router loss counts"))?;
        let bufs = [
            f32buf(op.d_weights, "combine weight gradient")?,
            i32buf(&op.routes.experts, "routes.experts")?,
            f32buf(&op.routes.weights, "routes.weights")?,
            f32buf(&op.routes.scores, "routes.scores")?,
            i32buf(&op.plan.rows, "plan.rows")?,
            f32buf(op.logits, "router logits")?,
            counts,
            &out.buffer().buf,
        ];
        b.dispatch(&ROUTE_GRAD, "route_grad", &op.params, &bufs, grid_1d(op.tokens, WG_ROUTE_GRAD))?;
    }
    Ok(out)
}

pub(crate) fn optim_step(b: &WgpuBackend, op: &OptimStepOp<'_, WgpuBackend>) -> Result<StepOut<WgpuBackend>> {
    let shape = op.param.shape();
    let param = b.tensor(shape, DType::F32, "updated parameter")?;
    let m = if op.rule.has_m() { Some(b.tensor(shape, DType::F32, "first moment")?) } else { None };
    let v = if op.rule.has_v() { Some(b.tensor(shape, DType::F32, "second moment")?) } else { None };
    if op.params.n > 0 {
        let bufs = [
            f32buf(op.param, "parameter")?,
            f32buf(op.grad, "gradient")?,
            op.m.map_or(Ok(&b.dummy), |t| f32buf(t, "first moment"))?,
            op.v.map_or(Ok(&b.dummy), |t| f32buf(t, "second moment"))?,
            &param.buffer().buf,
            m.as_ref().map_or(&b.dummy_rw, |t| &t.buffer().buf),
            v.as_ref().map_or(&b.dummy_rw2, |t| &t.buffer().buf),
        ];
        b.dispatch(&OPTIM, "optim_step", &op.params, &bufs, grid_1d(op.params.n as usize, WG_ELEMENTWISE))?;
    }
    Ok(StepOut { param, m, v })
}

pub(crate) fn sum_squares(b: &WgpuBackend, op: &SumSquaresOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&[1], DType::F32, "sum of squares")?;
    let bufs = [f32buf(op.x, "tensor")?, &b.dummy, &b.dummy, &b.dummy, &out.buffer().buf, &b.dummy_rw, &b.dummy_rw2];
    b.dispatch(&OPTIM, "sum_squares", &op.params, &bufs, [1, 1, 1])?;
    Ok(out)
}
