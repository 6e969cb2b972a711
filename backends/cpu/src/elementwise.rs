//! Activations, GLU, permute / combine, residual and shared-expert mixing on the cpu.

use crate::{f32s, i32s, tf32, CpuBackend, T};
use moe_engine::backend::{Activation, Plan};
use moe_engine::{Error, Result};
use rayon::prelude::*;

const PAR_CHUNK: usize = 1 << 14;

/// e^x for f32 without a libm call, so loops over it vectorise: Cephes `expf` (range
/// reduction by ln 2 split in two parts, degree-6 polynomial, exponent by bit
/// arithmetic), within 2 ulp of `f32::exp` on its whole range; inputs beyond the f32
/// range clamp to 0 and the largest finite value.
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer in any vector unit.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_55, 88.722_83);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^n: n is in [-126, 128]; build 2^(n/2) twice so n = 128 does not overflow the field.
    let half = n as i32 >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((n as i32 - half + 127) as u32) << 23);
    er * s1 * s2
}

/// `o = silu(gate) · up` in one branch-free loop the compiler vectorises, compiled for
/// the widest vector unit the cpu has (the crate itself targets baseline x86-64, whose
/// 4-lane SSE2 made this loop 5% of a Mixtral-shaped forward).
fn swiglu_row(o: &mut [f32], gate: &[f32], up: &[f32]) {
    #[inline(always)]
    fn body(o: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + exp_fast(-g)) * u;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(o: &mut [f32], gate: &[f32], up: &[f32]) {
            body(o, gate, up)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(o: &mut [f32], gate: &[f32], up: &[f32]) {
            body(o, gate, up)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the cpu has AVX-512F (checked just above).
            return unsafe { avx512(o, gate, up) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the cpu has AVX2 and FMA (checked just above).
            return unsafe { avx2(o, gate, up) };
        }
    }
    body(o, gate, up)
}

/// One activation value, in f32 as PyTorch computes it.
#[inline]
pub(crate) fn act(x: f32, a: Activation) -> f32 {
    match a {
        Activation::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // sqrt(2 / pi)
            0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
        }
        Activation::Relu => x.max(0.0),
        Activation::Silu => x / (1.0 + exp_fast(-x)),
        Activation::Identity => x,
    }
}

pub(crate) fn activation(x: &T, a: Activation) -> Result<T> {
    let v = f32s(x, "activation input")?;
    let mut out = v.to_vec();
    out.par_chunks_mut(PAR_CHUNK).for_each(|c| c.iter_mut().for_each(|y| *y = act(*y, a)));
    Ok(tf32(x.shape(), out))
}

pub(crate) fn glu(x: &T, a: Activation) -> Result<T> {
    let (r, two_i) = x.dims2("glu input")?;
    if two_i % 2 != 0 {
        return Err(Error::shape("glu input", "[rows, 2·ffn] (gate columns, then up)", x.shape()));
    }
    let i = two_i / 2;
    let v = f32s(x, "glu input")?;
    let mut out = vec![0f32; r * i];
    out.par_chunks_mut(i.max(1)).enumerate().for_each(|(row, o)| {
        let (gate, up) = v[row * two_i..(row + 1) * two_i].split_at(i);
        glu_row(o, gate, up, a);
    });
    Ok(tf32(&[r, i], out))
}

/// `o = act(gate) · up` for one row.
pub(crate) fn glu_row(o: &mut [f32], gate: &[f32], up: &[f32], a: Activation) {
    // One loop per activation, so the common SwiGLU loop has no branch and vectorises.
    match a {
        Activation::Silu => swiglu_row(o, gate, up),
        _ => {
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = act(g, a) * u;
            }
        }
    }
}

pub(crate) fn mul(a: &T, b: &T) -> Result<T> {
    if a.shape() != b.shape() {
        return Err(Error::shape("mul rhs", format!("{:?}", a.shape()), b.shape()));
    }
    let (x, y) = (f32s(a, "mul lhs")?, f32s(b, "mul rhs")?);
    Ok(tf32(a.shape(), x.iter().zip(y).map(|(p, q)| p * q).collect()))
}

pub(crate) fn add_gated(a: &T, b: &T, gate: Option<&T>) -> Result<T> {
    let (r, m) = a.dims2("add_gated lhs")?;
    if b.shape() != a.shape() {
        return Err(Error::shape("shared expert output", format!("[{r}, {m}]"), b.shape()));
    }
    let (x, y) = (f32s(a, "add_gated lhs")?, f32s(b, "shared expert output")?);
    let g = match gate {
        Some(g) => {
            if g.shape() != [r, 1] {
                return Err(Error::shape("shared_expert_gate logits", format!("[{r}, 1]"), g.shape()));
            }
            Some(f32s(g, "shared_expert_gate logits")?)
        }
        None => None,
    };
    let mut out = x.to_vec();
    for row in 0..r {
        let s = g.map_or(1.0, |g| 1.0 / (1.0 + (-g[row]).exp()));
        for c in 0..m {
            out[row * m + c] += s * y[row * m + c];
        }
    }
    Ok(tf32(a.shape(), out))
}

pub(crate) fn residual_mix(moe: &T, mlp: &T, coef: &T) -> Result<T> {
    let (r, m) = moe.dims2("moe output")?;
    if mlp.shape() != moe.shape() {
        return Err(Error::shape("residual mlp output", format!("[{r}, {m}]"), mlp.shape()));
    }
    if coef.shape() != [r, 2] {
        return Err(Error::shape("coefficient logits", format!("[{r}, 2]"), coef.shape()));
    }
    let (a, b, c) = (f32s(moe, "moe output")?, f32s(mlp, "residual mlp output")?, f32s(coef, "coefficient logits")?);
    let mut out = vec![0f32; r * m];
    for row in 0..r {
        let (l0, l1) = (c[row * 2], c[row * 2 + 1]);
        let mx = l0.max(l1);
        let (e0, e1) = ((l0 - mx).exp(), (l1 - mx).exp());
        let (c0, c1) = (e0 / (e0 + e1), e1 / (e0 + e1));
        for col in 0..m {
            out[row * m + col] = a[row * m + col] * c0 + b[row * m + col] * c1;
        }
    }
    Ok(tf32(&[r, m], out))
}

pub(crate) fn permute(x: &T, plan: &Plan<CpuBackend>) -> Result<T> {
    let (s, m) = x.dims2("x")?;
    let (ps, k) = plan.rows.dims2("plan.rows")?;
    if ps != s {
        return Err(Error::shape("plan.rows", format!("[{s}, k]"), plan.rows.shape()));
    }
    let rows = i32s(&plan.rows, "plan.rows")?;
    let v = f32s(x, "x")?;
    // Inverse map: compact row → token.
    let mut src = vec![usize::MAX; s * k];
    for (r, &row) in rows.iter().enumerate() {
        if row >= 0 {
            src[row as usize] = r / k;
        }
    }
    let mut out = vec![0f32; s * k * m];
    out.par_chunks_mut(m.max(1)).zip(src.par_iter()).for_each(|(o, &t)| {
        if t != usize::MAX {
            o.copy_from_slice(&v[t * m..(t + 1) * m]);
        }
    });
    Ok(tf32(&[s * k, m], out))
}

pub(crate) fn combine(yp: &T, plan: &Plan<CpuBackend>) -> Result<T> {
    let (_, m) = yp.dims2("expert output")?;
    let (s, k) = plan.rows.dims2("plan.rows")?;
    let rows = i32s(&plan.rows, "plan.rows")?;
    let w = f32s(&plan.weights, "plan.weights")?;
    let v = f32s(yp, "expert output")?;
    let mut out = vec![0f32; s * m];
    out.par_chunks_mut(m.max(1)).enumerate().for_each(|(t, o)| {
        for j in 0..k {
            let r = rows[t * k + j];
            if r >= 0 {
                let (wj, src) = (w[t * k + j], &v[r as usize * m..(r as usize + 1) * m]);
                for c in 0..m {
                    o[c] += wj * src[c];
                }
            }
        }
    });
    Ok(tf32(&[s, m], out))
}

#[cfg(test)]
mod tests {
    use super::exp_fast;

    #[test]
    fn exp_fast_matches_libm_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_fast(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        // 2 ulp of f32 is 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst}");
        assert_eq!(exp_fast(0.0), 1.0);
        assert_eq!(exp_fast(-1000.0), exp_fast(-87.336_55));
        assert!(exp_fast(1000.0).is_finite());
    }
}
