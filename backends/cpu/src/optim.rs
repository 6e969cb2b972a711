//! Optimizer steps on the cpu, element by element in the order of operations of
//! torch.optim's single-tensor implementations (`_single_tensor_sgd`, `_single_tensor_adam`),
//! so the f32 roundings are torch's. The step writes into the parameter and state
//! buffers when the optimizer holds the only handles to them (no allocation, no fresh
//! pages to fault in), and into new tensors otherwise.

use crate::{f32s, tf32, CpuBackend, CpuBuffer, T};
use moe_engine::ops::{OptimStepOp, StepKind, StepOut, StepRule, SumSquaresOp};
use moe_engine::Result;
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

/// The step on slices: `p` and (where the rule keeps them) `m`, `v` updated in place
/// from `g`; `m_given` false is SGD's first step with momentum (the buffer starts as the
/// gradient).
fn update(rule: StepRule, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], m_given: bool) {
    let [lr, wd, mu, one_minus_damp, w1, beta2, one_minus_b2, eps, step_size, bc2_sqrt, decay, scale] = rule.scalars();
    let grad = |x: f32| if scale == 1.0 { x } else { x * scale };
    match rule.kind {
        StepKind::Sgd => {
            let has_m = !m.is_empty();
            let body = |(p, g): (&mut [f32], &[f32]), m: &mut [f32]| {
                for j in 0..p.len() {
                    let mut d = grad(g[j]);
                    if wd != 0.0 {
                        d += wd * p[j];
                    }
                    if mu != 0.0 {
                        // torch starts the buffer as a clone of the first gradient.
                        let buf = if m_given { m[j] * mu + one_minus_damp * d } else { d };
                        m[j] = buf;
                        d = if rule.nesterov { d + mu * buf } else { buf };
                    }
                    p[j] += -lr * d;
                }
            };
            if has_m {
                p.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .zip(m.par_chunks_mut(CHUNK))
                    .for_each(|(pg, m)| body(pg, m));
            } else {
                p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|pg| body(pg, &mut []));
            }
        }
        StepKind::Adam | StepKind::AdamW => {
            let adamw = rule.kind == StepKind::AdamW;
            let low = w1.abs() < 0.5;
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| {
                    adam_chunk(
                        p,
                        g,
                        m,
                        v,
                        AdamScalars { adamw, low, wd, w1, beta2, one_minus_b2, eps, step_size, bc2_sqrt, decay, scale },
                    )
                });
        }
    }
}

/// The constants of an Adam step.
#[derive(Clone, Copy)]
struct AdamScalars {
    adamw: bool,
    /// torch's lerp branch (|w| < 0.5), the same for every element.
    low: bool,
    wd: f32,
    w1: f32,
    beta2: f32,
    one_minus_b2: f32,
    eps: f32,
    step_size: f32,
    bc2_sqrt: f32,
    decay: f32,
    scale: f32,
}

/// One chunk of an Adam step. The branches are the same for every element (hoisted by
/// the compiler), so the loop vectorises; compiled for the widest vector unit the cpu
/// has, as the activations are.
fn adam_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamScalars) {
    #[inline(always)]
    fn body(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamScalars) {
        let n = p.len().min(g.len()).min(m.len()).min(v.len());
        let (p, g, m, v) = (&mut p[..n], &g[..n], &mut m[..n], &mut v[..n]);
        for j in 0..n {
            let mut param = p[j];
            // x · 1 is x exactly, so the unclipped step multiplies too.
            let mut d = g[j] * c.scale;
            if c.adamw {
                param *= c.decay;
            } else if c.wd != 0.0 {
                d += c.wd * param;
            }
            // torch's lerp on the cpu: m + w·(d − m) for |w| < 0.5, else d − (d − m)·(1 − w).
            let mj = if c.low { m[j] + c.w1 * (d - m[j]) } else { d - (d - m[j]) * (1.0 - c.w1) };
            let vj = v[j] * c.beta2 + c.one_minus_b2 * d * d;
            m[j] = mj;
            v[j] = vj;
            let denom = vj.sqrt() / c.bc2_sqrt + c.eps;
            p[j] = param + (-c.step_size * mj) / denom;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamScalars) {
            body(p, g, m, v, c)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamScalars) {
            body(p, g, m, v, c)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the cpu has AVX-512F (checked just above).
            return unsafe { avx512(p, g, m, v, c) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the cpu has AVX2 (checked just above).
            return unsafe { avx2(p, g, m, v, c) };
        }
    }
    body(p, g, m, v, c)
}

/// The step into new tensors.
pub(crate) fn optim_step(op: &OptimStepOp<'_, CpuBackend>) -> Result<StepOut<CpuBackend>> {
    let rule = op.rule;
    let mut p = f32s(op.param, "parameter")?.to_vec();
    let g = f32s(op.grad, "gradient")?;
    let n = p.len();
    let mut m = match op.m {
        Some(t) => f32s(t, "first moment")?.to_vec(),
        None if rule.has_m() => vec![0f32; n],
        None => Vec::new(),
    };
    let mut v = match op.v {
        Some(t) => f32s(t, "second moment")?.to_vec(),
        None if rule.has_v() => vec![0f32; n],
        None => Vec::new(),
    };
    update(rule, &mut p, g, &mut m, &mut v, op.m.is_some());
    let shape = op.param.shape();
    Ok(StepOut {
        param: tf32(shape, p)?,
        m: rule.has_m().then(|| tf32(shape, m)).transpose()?,
        v: rule.has_v().then(|| tf32(shape, v)).transpose()?,
    })
}

/// The f32 vector of a tensor this handle alone holds.
fn unique(t: &mut T) -> Option<&mut Vec<f32>> {
    match t.buffer_mut()? {
        CpuBuffer::F32(v) => Some(v),
        _ => None,
    }
}

/// The step written into the buffers, when the tensors are this handle's alone.
pub(crate) fn optim_step_in_place(
    rule: StepRule,
    param: &mut T,
    grad: &T,
    m: Option<&mut T>,
    v: Option<&mut T>,
) -> Result<bool> {
    let g = f32s(grad, "gradient")?;
    let mut empty_m = Vec::new();
    let mut empty_v = Vec::new();
    let Some(p) = unique(param) else { return Ok(false) };
    let m = match m {
        Some(t) => match unique(t) {
            Some(m) => m,
            None => return Ok(false),
        },
        None => &mut empty_m,
    };
    let v = match v {
        Some(t) => match unique(t) {
            Some(v) => v,
            None => return Ok(false),
        },
        None => &mut empty_v,
    };
    // The front door checked the shapes; the slices must agree before they are zipped.
    if p.len() != g.len() || (!m.is_empty() && m.len() != p.len()) || (!v.is_empty() && v.len() != p.len()) {
        return Err(moe_engine::Error::Internal("optimizer step buffers of different lengths".into()));
    }
    let m_given = !m.is_empty();
    update(rule, p, g, m, v, m_given);
    Ok(true)
}

/// Σ x², accumulated in f64 (the reference for the GPU backends' f32 tree sums).
pub(crate) fn sum_squares(op: &SumSquaresOp<'_, CpuBackend>) -> Result<T> {
    let x = f32s(op.x, "tensor")?;
    let s: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    tf32(&[1], vec![s as f32])
}
