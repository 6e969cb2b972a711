// Activation functions shared by the elementwise and matrix-product shaders; the backend
// prepends this file to each of them (WGSL has no includes).

// erfc with fractional error below 1.2e-7 everywhere (Numerical Recipes' Chebyshev fit);
// WGSL has no erf builtin.
fn erfc_approx(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277)))))))));
    return select(2.0 - r, r, x >= 0.0);
}

fn act(x: f32, kind: u32) -> f32 {
    switch kind {
        case 0u: { return 0.5 * x * (2.0 - erfc_approx(x * 0.70710678118654752)); }
        case 1u: {
            // tanh saturates to ±1 in f32 beyond |u| = 9; clamping keeps drivers that build
            // tanh from exp from overflowing to inf / inf.
            let u = clamp(0.7978845608 * (x + 0.044715 * x * x * x), -10.0, 10.0);
            return 0.5 * x * (1.0 + tanh(u));
        }
        case 2u: { return max(x, 0.0); }
        case 3u: { return x / (1.0 + exp(-x)); }
        default: { return x; }
    }
}

// act'(x), as PyTorch's activation backward computes it (GeluBackward: cdf + x · pdf;
// the tanh form's product rule; relu: 1 where x > 0; silu: s · (1 + x · (1 − s))).
fn act_deriv(x: f32, kind: u32) -> f32 {
    switch kind {
        case 0u: {
            let cdf = 0.5 * (2.0 - erfc_approx(x * 0.70710678118654752));
            let pdf = exp(-0.5 * x * x) * 0.39894228040143268;
            return cdf + x * pdf;
        }
        case 1u: {
            let beta = 0.7978845608028654;
            let kappa = 0.044715;
            let x_sq = x * x;
            let t = tanh(clamp(beta * (x + kappa * x_sq * x), -10.0, 10.0));
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (beta * (1.0 + 3.0 * kappa * x_sq));
        }
        case 2u: { return select(0.0, 1.0, x > 0.0); }
        case 3u: {
            let s = 1.0 / (1.0 + exp(-x));
            return s * (1.0 + x * (1.0 - s));
        }
        default: { return 1.0; }
    }
}

// The clamped GLU (moe_engine::GluClamp, gpt-oss and DeepSeek-V4): g = min(gate, limit),
// u = clamp(up, −limit, limit), out = act_α(g) · (u + up_offset), with silu's act_α(g) =
// g / (1 + exp(−α·g)) and every other activation taking α = 1 (the front door checks).
// The clamps are selects rather than min / max, whose NaN behaviour WGSL leaves open: a
// NaN passes through them as it does through torch's clamp.
fn clamp_gate(g: f32, limit: f32) -> f32 {
    return select(g, limit, g > limit);
}

fn clamp_up(u: f32, limit: f32) -> f32 {
    return select(select(u, -limit, u < -limit), limit, u > limit);
}

// act_α(x): silu with its sigmoid scaled by α; the others as `act`.
fn act_scaled(x: f32, kind: u32, alpha: f32) -> f32 {
    if kind == 3u { return x / (1.0 + exp(-alpha * x)); }
    return act(x, kind);
}

// act_α'(x): s · (1 + α·x · (1 − s)) with s = σ(α·x) for silu; the others as `act_deriv`.
fn act_scaled_deriv(x: f32, kind: u32, alpha: f32) -> f32 {
    if kind == 3u {
        let s = 1.0 / (1.0 + exp(-alpha * x));
        return s * (1.0 + alpha * x * (1.0 - s));
    }
    return act_deriv(x, kind);
}

fn glu_clamped(gate: f32, up: f32, kind: u32, limit: f32, alpha: f32, up_offset: f32) -> f32 {
    return act_scaled(clamp_gate(gate, limit), kind, alpha) * (clamp_up(up, limit) + up_offset);
}
