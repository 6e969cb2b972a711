//! Launchers of `shaders/elementwise.wgsl` and `shaders/permute.wgsl`.

use crate::kernels::{grid_1d, ELEMENTWISE, PERMUTE};
use crate::{WgpuBackend, T};
use moe_engine::backend::{Activation, Plan};
use moe_engine::{DType, Error, Result};

fn f32buf<'a>(t: &'a T, name: &str) -> Result<&'a wgpu::Buffer> {
    WgpuBackend::buf(t, name, DType::F32)
}

/// Runs an elementwise entry point over `out_shape` (cols = its last dimension).
fn run(
    b: &WgpuBackend,
    entry: &'static str,
    out_shape: &[usize],
    act: u32,
    gated: u32,
    ins: [&wgpu::Buffer; 3],
) -> Result<T> {
    let out = b.tensor(out_shape, DType::F32, entry)?;
    let n = out.numel();
    if n == 0 {
        return Ok(out);
    }
    let cols = *out_shape.last().unwrap_or(&1);
    b.dispatch(
        &ELEMENTWISE,
        entry,
        &[n as u32, cols.max(1) as u32, act, gated],
        &[ins[0], ins[1], ins[2], &out.buffer().buf],
        grid_1d(n, 256),
    )?;
    Ok(out)
}

pub(crate) fn activation(b: &WgpuBackend, x: &T, a: Activation) -> Result<T> {
    let xb = f32buf(x, "activation input")?;
    run(b, "activation", x.shape(), a.kernel_code(), 0, [xb, &b.dummy, &b.dummy])
}

pub(crate) fn glu(b: &WgpuBackend, x: &T, a: Activation) -> Result<T> {
    let (r, two_i) = x.dims2("glu input")?;
    if two_i % 2 != 0 {
        return Err(Error::shape("glu input", "[rows, 2·ffn] (gate columns, then up)", x.shape()));
    }
    let xb = f32buf(x, "glu input")?;
    run(b, "glu", &[r, two_i / 2], a.kernel_code(), 0, [xb, &b.dummy, &b.dummy])
}

pub(crate) fn mul(b: &WgpuBackend, x: &T, y: &T) -> Result<T> {
    if x.shape() != y.shape() {
        return Err(Error::shape("mul rhs", format!("{:?}", x.shape()), y.shape()));
    }
    run(b, "mul", x.shape(), 0, 0, [f32buf(x, "mul lhs")?, f32buf(y, "mul rhs")?, &b.dummy])
}

pub(crate) fn add_gated(b: &WgpuBackend, x: &T, y: &T, gate: Option<&T>) -> Result<T> {
    let (r, m) = x.dims2("add_gated lhs")?;
    if y.shape() != x.shape() {
        return Err(Error::shape("shared expert output", format!("[{r}, {m}]"), y.shape()));
    }
    let (gb, gated) = match gate {
        Some(g) => {
            if g.shape() != [r, 1] {
                return Err(Error::shape("shared_expert_gate logits", format!("[{r}, 1]"), g.shape()));
            }
            (f32buf(g, "shared_expert_gate logits")?, 1)
        }
        None => (&b.dummy, 0),
    };
    run(b, "add_gated", &[r, m], 0, gated, [f32buf(x, "add_gated lhs")?, f32buf(y, "shared expert output")?, gb])
}

pub(crate) fn residual_mix(b: &WgpuBackend, moe: &T, mlp: &T, coef: &T) -> Result<T> {
    let (r, m) = moe.dims2("moe output")?;
    if mlp.shape() != moe.shape() {
        return Err(Error::shape("residual mlp output", format!("[{r}, {m}]"), mlp.shape()));
    }
    if coef.shape() != [r, 2] {
        return Err(Error::shape("coefficient logits", format!("[{r}, 2]"), coef.shape()));
    }
    run(
        b,
        "residual_mix",
        &[r, m],
        0,
        0,
        [f32buf(moe, "moe output")?, f32buf(mlp, "residual mlp output")?, f32buf(coef, "coefficient logits")?],
    )
}

pub(crate) fn permute(b: &WgpuBackend, x: &T, plan: &Plan<WgpuBackend>) -> Result<T> {
    let (s, m) = x.dims2("x")?;
    let (ps, k) = plan.rows.dims2("plan.rows")?;
    if ps != s {
        return Err(Error::shape("plan.rows", format!("[{s}, k]"), plan.rows.shape()));
    }
    let out = b.tensor(&[s * k, m], DType::F32, "permuted rows")?;
    let n = s * k * m;
    if n > 0 {
        b.dispatch(
            &PERMUTE,
            "permute",
            &[n as u32, m as u32, k as u32],
            &[f32buf(x, "x")?, WgpuBackend::buf(&plan.rows, "plan.rows", DType::I32)?, &b.dummy, &out.buffer().buf],
            grid_1d(n, 256),
        )?;
    }
    Ok(out)
}

pub(crate) fn combine(b: &WgpuBackend, yp: &T, plan: &Plan<WgpuBackend>) -> Result<T> {
    let (_, m) = yp.dims2("expert output")?;
    let (s, k) = plan.rows.dims2("plan.rows")?;
    let out = b.tensor(&[s, m], DType::F32, "combined output")?;
    let n = s * m;
    if n > 0 {
        b.dispatch(
            &PERMUTE,
            "combine",
            &[n as u32, m as u32, k as u32],
            &[
                f32buf(yp, "expert output")?,
                WgpuBackend::buf(&plan.rows, "plan.rows", DType::I32)?,
                f32buf(&plan.weights, "plan.weights")?,
                &out.buffer().buf,
            ],
            grid_1d(n, 256),
        )?;
    }
    Ok(out)
}
