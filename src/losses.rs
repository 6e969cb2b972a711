//! Router losses, computed on the host from the per-expert reductions a forward reports
//! (counts and mean scores are `[E]` vectors, so this costs nothing).

use crate::config::GateSpec;

/// All losses the engine reports for a forward. Coefficients (α, aux_loss_coef) are the
/// trainer's to apply; these are the unscaled terms.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Losses {
    /// DeepSpeed `l_aux` for the configured k (top-1, top-2 and top-k formulas); for other
    /// gates the HF load-balancing loss.
    pub l_aux: f64,
    /// HF `load_balancing_loss_func`: E · Σₑ fₑ · Pₑ with f the fraction of routes and P the
    /// mean score (uniform routing gives k).
    pub load_balancing: f64,
    /// Switch z-loss: mean over tokens of logsumexp(logits)².
    pub z_loss: f64,
    /// DeepSeek expert-level balance loss without α: Σᵢ fᵢ · Pᵢ, fᵢ = E / (k·S) · countᵢ.
    pub expert_balance: f64,
}

/// Computes the losses from counts (all routes, and first choices) and mean scores.
pub fn compute(
    gate: &GateSpec,
    counts: &[i64],
    first_counts: &[i64],
    mean_scores: &[f32],
    z_loss: f32,
    tokens: usize,
) -> Losses {
    let e = counts.len() as f64;
    let s = tokens.max(1) as f64;
    let k = gate.k() as f64;
    let me = |i: usize| mean_scores[i] as f64;
    let dot = |c: &[i64]| (0..c.len()).map(|i| me(i) * c[i] as f64 / s).sum::<f64>();
    let load_balancing = e * dot(counts);
    let l_aux = match gate {
        // top-1: E · Σ me·ce, ce over the (used) first choices.
        GateSpec::DeepSpeed(g) if g.k == 1 => e * dot(counts),
        // top-2: E² · mean(me·ce) = E · Σ me·ce, ce from first choices only.
        GateSpec::DeepSpeed(g) if g.k == 2 => e * dot(first_counts),
        // top-k: E² / k · mean(me·ce) = E / k · Σ me·ce.
        GateSpec::DeepSpeed(_) => e / k * dot(counts),
        _ => load_balancing,
    };
    let expert_balance = (0..counts.len()).map(|i| e / (k * s) * counts[i] as f64 * me(i)).sum();
    Losses { l_aux, load_balancing, z_loss: z_loss as f64, expert_balance }
}
