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

/// The router losses a backward adds to the objective, each with its coefficient (0:
/// not part of the loss): `aux_coef · l_aux` is how DeepSpeed and HF trainers use them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossCoefs {
    /// Coefficient of [`Losses::l_aux`] (DeepSpeed's `l_aux`; the HF load-balancing loss
    /// for other gates).
    pub l_aux: f64,
    /// Coefficient of [`Losses::load_balancing`].
    pub load_balancing: f64,
    /// Coefficient of [`Losses::expert_balance`] (DeepSeek's α).
    pub expert_balance: f64,
    /// Coefficient of [`Losses::z_loss`].
    pub z_loss: f64,
}

impl LossCoefs {
    /// Every coefficient times `factor`: the router losses of a loss scaled by `factor`
    /// (loss scaling multiplies the whole loss, so its gradient, by the scale).
    pub fn scaled(self, factor: f64) -> Self {
        LossCoefs {
            l_aux: self.l_aux * factor,
            load_balancing: self.load_balancing * factor,
            expert_balance: self.expert_balance * factor,
            z_loss: self.z_loss * factor,
        }
    }
}

/// Which count vector a loss's gradient is proportional to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountsOf {
    /// Routes per expert before dropping.
    All,
    /// First choices per expert (DeepSpeed top-2's `l_aux`).
    First,
}

/// The score gradient of the weighted losses except the z-loss: every one is `Σₑ cₑ ·
/// mean_s(scores)ₑ` with `cₑ` a constant times a count, so `d scores[s, e] = scale ·
/// counts[e]`. Returns the counts and the scale, or None when no such loss is weighted;
/// an error when two weighted losses need different counts.
pub fn score_grad(
    gate: &GateSpec,
    coefs: &LossCoefs,
    tokens: usize,
    experts: usize,
) -> crate::Result<Option<(CountsOf, f64)>> {
    let e = experts as f64;
    let s = tokens.max(1) as f64;
    let k = gate.k() as f64;
    let (l_aux_counts, l_aux_c) = match gate {
        GateSpec::DeepSpeed(g) if g.k == 1 => (CountsOf::All, 1.0),
        GateSpec::DeepSpeed(g) if g.k == 2 => (CountsOf::First, 1.0),
        GateSpec::DeepSpeed(_) => (CountsOf::All, 1.0 / k),
        _ => (CountsOf::All, 1.0),
    };
    // d/dp[s,e] of c·Σ me·counts/S with me = mean_s p is c·counts/S².
    let mut terms = Vec::new();
    if coefs.l_aux != 0.0 {
        terms.push((l_aux_counts, coefs.l_aux * e * l_aux_c / (s * s)));
    }
    if coefs.load_balancing != 0.0 {
        terms.push((CountsOf::All, coefs.load_balancing * e / (s * s)));
    }
    if coefs.expert_balance != 0.0 {
        terms.push((CountsOf::All, coefs.expert_balance * e / (k * s * s)));
    }
    let Some(&(which, _)) = terms.first() else { return Ok(None) };
    if terms.iter().any(|t| t.0 != which) {
        return Err(crate::Error::config(
            "loss coefficients",
            "DeepSpeed top-2's l_aux (first choices) cannot be weighted together with a loss over all routes",
        ));
    }
    Ok(Some((which, terms.iter().map(|t| t.1).sum())))
}

/// DeepSeek-V3 auxiliary-loss-free balancing: after a step, each expert's
/// `e_score_correction_bias` moves by `gamma` towards balance,
/// `bᵢ ← bᵢ + γ · sign(mean load − loadᵢ)` (an expert at the mean load is left alone).
pub fn v3_bias_update(bias: &mut [f32], counts: &[i64], gamma: f32) {
    let mean = counts.iter().sum::<i64>() as f64 / counts.len().max(1) as f64;
    for (b, &c) in bias.iter_mut().zip(counts) {
        let d = mean - c as f64;
        if d > 0.0 {
            *b += gamma;
        } else if d < 0.0 {
            *b -= gamma;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeepSpeedGate, GateSpec};

    #[test]
    fn bias_moves_towards_balance() {
        let mut b = vec![0.0f32; 4];
        v3_bias_update(&mut b, &[10, 2, 4, 4], 0.1);
        // mean load 5: the overloaded expert goes down, the others up.
        assert_eq!(b, vec![-0.1, 0.1, 0.1, 0.1]);
        let mut b = vec![0.5f32; 2];
        v3_bias_update(&mut b, &[3, 3], 0.1);
        assert_eq!(b, vec![0.5, 0.5]);
    }

    #[test]
    fn uniform_routing_gives_textbook_values() {
        // 4 experts, 8 tokens, every expert gets 2 first choices and mean score 1/4.
        let counts = [2i64; 4];
        let means = [0.25f32; 4];
        let top1 = GateSpec::DeepSpeed(DeepSpeedGate { k: 1, ..Default::default() });
        let l = compute(&top1, &counts, &counts, &means, 0.0, 8);
        // E · Σ me·ce = 4 · 4 · (1/4 · 1/4) = 1.
        assert!((l.l_aux - 1.0).abs() < 1e-12);
        assert!((l.load_balancing - 1.0).abs() < 1e-12);
        // k = 2 routes per token: the HF loss of uniform routing is k.
        let soft2 = GateSpec::SoftmaxTopK { k: 2, normalize: true };
        let l = compute(&soft2, &[4i64; 4], &counts, &means, 0.0, 8);
        assert!((l.load_balancing - 2.0).abs() < 1e-12);
        // DeepSeek balance: E/(kS) · count · P summed = 4/(2·8) · 4 · 1/4 · 4 = 1.
        assert!((l.expert_balance - 1.0).abs() < 1e-12);
    }
}
