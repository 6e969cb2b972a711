//! Activations, GLU, permute / combine, residual and shared-expert mixing on the cpu.

use crate::par::Par;
use crate::{f32s, i32s, tf32, CpuBackend, T};
use moe_engine::ops::{CombineOp, ElementwiseKind, ElementwiseOp, PassRowsOp, PermuteOp, PermuteScaledOp};
use moe_engine::{Activation, Error, GluClamp, Result};

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

/// An elementwise op on checked operands.
pub(crate) fn run(op: &ElementwiseOp<'_, CpuBackend>, par: Par) -> Result<T> {
    let a = f32s(op.a, "elementwise input")?;
    let second = |name: &str| -> Result<&[f32]> {
        f32s(op.b.ok_or_else(|| Error::Internal(format!("{name} without its second operand")))?, name)
    };
    let cols = op.params.cols as usize;
    let out = match op.kind {
        ElementwiseKind::Activation(act_kind) => {
            let mut out = a.to_vec();
            par.rows_mut(&mut out, PAR_CHUNK, |_, c| c.iter_mut().for_each(|y| *y = act(*y, act_kind)));
            out
        }
        ElementwiseKind::Glu(act_kind) | ElementwiseKind::GluClamped(act_kind, _) => {
            let clamp = if let ElementwiseKind::GluClamped(_, c) = op.kind { Some(c) } else { None };
            let mut out = vec![0f32; op.params.n as usize];
            par.rows_mut(&mut out, cols, |row, o| {
                let (gate, up) = a[row * 2 * cols..(row + 1) * 2 * cols].split_at(cols);
                glu_row(o, gate, up, act_kind, clamp);
            });
            out
        }
        ElementwiseKind::AddBias => {
            let bias = second("add_bias")?;
            let mut out = a.to_vec();
            par.rows_mut(&mut out, cols, |_, o| o.iter_mut().zip(bias).for_each(|(o, b)| *o += b));
            out
        }
        ElementwiseKind::Mul => a.iter().zip(second("mul")?).map(|(p, q)| p * q).collect(),
        ElementwiseKind::Scale(alpha) => a.iter().map(|v| alpha * v).collect(),
        ElementwiseKind::AddGated => {
            let b = second("add_gated")?;
            let g = op.c.map(|g| f32s(g, "shared_expert_gate logits")).transpose()?;
            let mut out = a.to_vec();
            par.rows_mut(&mut out, cols, |row, o| {
                let y = &b[row * cols..(row + 1) * cols];
                let s = g.map_or(1.0, |g| 1.0 / (1.0 + (-g[row]).exp()));
                o.iter_mut().zip(y).for_each(|(o, y)| *o += s * y);
            });
            out
        }
        ElementwiseKind::ResidualMix => {
            let b = second("residual_mix")?;
            let c = f32s(op.c.ok_or_else(|| Error::Internal("residual_mix without coefficients".into()))?, "coef")?;
            let mut out = vec![0f32; a.len()];
            par.rows_mut(&mut out, cols, |row, o| {
                let (l0, l1) = (c[row * 2], c[row * 2 + 1]);
                let mx = l0.max(l1);
                let (e0, e1) = ((l0 - mx).exp(), (l1 - mx).exp());
                let (c0, c1) = (e0 / (e0 + e1), e1 / (e0 + e1));
                let base = row * cols;
                for (col, o) in o.iter_mut().enumerate() {
                    *o = a[base + col] * c0 + b[base + col] * c1;
                }
            });
            out
        }
    };
    tf32(&op.out_shape, out)
}

/// `o = act(gate) · up` for one row, or with a clamp [`glu_clamped`] of each pair.
pub(crate) fn glu_row(o: &mut [f32], gate: &[f32], up: &[f32], a: Activation, clamp: Option<GluClamp>) {
    // One loop per activation, so the common SwiGLU loop has no branch and vectorises.
    match (a, clamp) {
        (_, Some(c)) => {
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = glu_clamped(g, u, a, c);
            }
        }
        (Activation::Silu, None) => swiglu_row(o, gate, up),
        _ => {
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = act(g, a) * u;
            }
        }
    }
}

/// `min(g, limit)` as torch's `clamp(max=limit)`: a NaN stays NaN (`f32::min` would drop
/// it), so every backend writes the comparison the same way.
#[inline]
pub(crate) fn clamp_gate(g: f32, limit: f32) -> f32 {
    if g > limit {
        limit
    } else {
        g
    }
}

/// `clamp(u, −limit, limit)` as torch's, NaN kept.
#[inline]
pub(crate) fn clamp_up(u: f32, limit: f32) -> f32 {
    if u > limit {
        limit
    } else if u < -limit {
        -limit
    } else {
        u
    }
}

/// act_α(x): silu with its sigmoid scaled by α, `x / (1 + e^(−α·x))` (gpt-oss's `gate ·
/// sigmoid(gate · alpha)`); every other activation takes α = 1 (the front door checks).
#[inline]
pub(crate) fn act_scaled(x: f32, a: Activation, alpha: f32) -> f32 {
    match a {
        Activation::Silu => x / (1.0 + exp_fast(-alpha * x)),
        _ => act(x, a),
    }
}

/// The clamped GLU of one (gate, up) pair: `act_α(min(gate, l)) · (clamp(up, −l, l) +
/// up_offset)`.
#[inline]
pub(crate) fn glu_clamped(gate: f32, up: f32, a: Activation, c: GluClamp) -> f32 {
    act_scaled(clamp_gate(gate, c.limit), a, c.alpha) * (clamp_up(up, c.limit) + c.up_offset)
}

pub(crate) fn permute(op: &PermuteOp<'_, CpuBackend>, par: Par) -> Result<T> {
    let [rows_out, m] = op.out_shape;
    let k = op.rows.k();
    let rows = i32s(op.rows.tensor(), "route rows")?;
    let v = f32s(op.x, "x")?;
    // Inverse map: grouped row → token. Route rows are made by the ops that compute them,
    // so each is in range and named once.
    let mut src = vec![usize::MAX; rows_out];
    for (r, &row) in rows.iter().enumerate() {
        if row >= 0 {
            src[row as usize] = r / k;
        }
    }
    let mut out = vec![0f32; rows_out * m];
    par.rows_mut(&mut out, m, |i, o| {
        let t = src[i];
        if t != usize::MAX {
            o.copy_from_slice(&v[t * m..(t + 1) * m]);
        }
    });
    tf32(&op.out_shape, out)
}

/// permute with every route's row scaled by its weight.
pub(crate) fn permute_scaled(op: &PermuteScaledOp<'_, CpuBackend>, par: Par) -> Result<T> {
    let [rows_out, m] = op.out_shape;
    let rows = i32s(op.rows.tensor(), "route rows")?;
    let w = f32s(op.weights, "route weights")?;
    let v = f32s(op.x, "x")?;
    let k = op.rows.k();
    // Inverse map: grouped row → route (the route names its token and weight).
    let mut src = vec![usize::MAX; rows_out];
    for (r, &row) in rows.iter().enumerate() {
        if row >= 0 {
            src[row as usize] = r;
        }
    }
    let mut out = vec![0f32; rows_out * m];
    par.rows_mut(&mut out, m, |i, o| {
        let route = src[i];
        if route != usize::MAX {
            let (t, wr) = (route / k, w[route]);
            o.iter_mut().zip(&v[t * m..(t + 1) * m]).for_each(|(o, &x)| *o = wr * x);
        }
    });
    tf32(&op.out_shape, out)
}

/// y with the rows of groups `from_group..G` taken from x.
pub(crate) fn pass_rows(op: &PassRowsOp<'_, CpuBackend>) -> Result<T> {
    let [r, m] = op.out_shape;
    let off = crate::matmul::offsets(op.offsets, r)?;
    let (r0, r1) = (off[op.from_group] as usize, off[off.len() - 1] as usize);
    let mut out = f32s(op.y, "pass_rows y")?[..r * m].to_vec();
    out[r0 * m..r1 * m].copy_from_slice(&f32s(op.x, "pass_rows x")?[r0 * m..r1 * m]);
    tf32(&op.out_shape, out)
}

pub(crate) fn combine(op: &CombineOp<'_, CpuBackend>, par: Par) -> Result<T> {
    let [len, m] = op.out_shape;
    let k = op.rows.k();
    let rows = i32s(op.rows.tensor(), "route rows")?;
    let w = f32s(op.weights, "combine weights")?;
    let v = f32s(op.yp, "expert output")?;
    let t0 = op.tokens.start;
    let mut out = vec![0f32; len * m];
    par.rows_mut(&mut out, m, |i, o| {
        let t = t0 + i;
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
    tf32(&op.out_shape, out)
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
