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
