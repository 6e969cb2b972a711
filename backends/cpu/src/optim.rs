//! Optimizer steps on the cpu, element by element in the order of operations of
//! torch.optim's single-tensor implementations (`_single_tensor_sgd`, `_single_tensor_adam`),
//! so the f32 roundings are torch's.

use crate::{f32s, tf32, CpuBackend, T};
use moe_engine::ops::{OptimStepOp, StepKind, StepOut, SumSquaresOp};
use moe_engine::Result;
use rayon::prelude::*;

/// torch's `lerp` on the cpu: `a + w·(b − a)` for w < 0.5, else `b − (b − a)·(1 − w)`.
#[inline]
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

pub(crate) fn optim_step(op: &OptimStepOp<'_, CpuBackend>) -> Result<StepOut<CpuBackend>> {
    let rule = op.rule;
    let [lr, wd, mu, one_minus_damp, w1, beta2, one_minus_b2, eps, step_size, bc2_sqrt, decay, scale] = rule.scalars();
    let p = f32s(op.param, "parameter")?;
    let g = f32s(op.grad, "gradient")?;
    let m_in = op.m.map(|m| f32s(m, "first moment")).transpose()?;
    let v_in = op.v.map(|v| f32s(v, "second moment")).transpose()?;
    let n = p.len();
    let mut p_out = vec![0f32; n];
    let mut m_out = if rule.has_m() { vec![0f32; n] } else { Vec::new() };
    let mut v_out = if rule.has_v() { vec![0f32; n] } else { Vec::new() };
    let grad = |i: usize| if scale == 1.0 { g[i] } else { g[i] * scale };
    match rule.kind {
        StepKind::Sgd => {
            for i in 0..n {
                let mut d = grad(i);
                if wd != 0.0 {
                    d += wd * p[i];
                }
                if mu != 0.0 {
                    // torch starts the buffer as a clone of the first gradient.
                    let buf = match m_in {
                        Some(m) => m[i] * mu + one_minus_damp * d,
                        None => d,
                    };
                    m_out[i] = buf;
                    d = if rule.nesterov { d + mu * buf } else { buf };
                }
                p_out[i] = p[i] + -lr * d;
            }
        }
        StepKind::Adam | StepKind::AdamW => {
            let (m, v) = (m_in.unwrap_or(&[]), v_in.unwrap_or(&[]));
            let adamw = rule.kind == StepKind::AdamW;
            p_out.par_iter_mut().zip(m_out.par_iter_mut()).zip(v_out.par_iter_mut()).enumerate().for_each(
                |(i, ((po, mo), vo))| {
                    let mut param = p[i];
                    let mut d = grad(i);
                    if adamw {
                        param *= decay;
                    } else if wd != 0.0 {
                        d += wd * param;
                    }
                    *mo = lerp(m[i], d, w1);
                    *vo = v[i] * beta2 + one_minus_b2 * d * d;
                    let denom = vo.sqrt() / bc2_sqrt + eps;
                    *po = param + (-step_size * *mo) / denom;
                },
            );
        }
    }
    let shape = op.param.shape();
    Ok(StepOut {
        param: tf32(shape, p_out)?,
        m: rule.has_m().then(|| tf32(shape, m_out)).transpose()?,
        v: rule.has_v().then(|| tf32(shape, v_out)).transpose()?,
    })
}

/// Σ x², accumulated in f64 (the reference for the GPU backends' f32 tree sums).
pub(crate) fn sum_squares(op: &SumSquaresOp<'_, CpuBackend>) -> Result<T> {
    let x = f32s(op.x, "tensor")?;
    let s: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    tf32(&[1], vec![s as f32])
}
