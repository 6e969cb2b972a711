//! The layer's backward, written once over the [`Backend`] trait from the state the
//! forward kept: the forward's steps in reverse.
//!
//! ```text
//! dy → shared experts' add (gate) → residual mix (coefficient) → combine
//!    → experts (grouped products, activation) → permute → dx
//!    → gate: combine weights → route → logits → router weight, dx
//! ```
//!
//! The objective is `Σ y · dy` plus the router losses weighted by
//! [`BackwardOptions::losses`]; every gradient is f32.

use super::{DeviceMlp, LayerOutput, MoeLayer};
use crate::backend::Backend;
use crate::config::SharedCombine;
use crate::device::Tensor;
use crate::error::{Error, Result};
use crate::expert::ExpertKind;
use crate::losses::LossCoefs;
use crate::ops::{ActGradKind, Offsets};

/// What a backward differentiates besides `Σ y · dy`.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackwardOptions {
    /// The router losses' coefficients (all 0: none).
    pub losses: LossCoefs,
}

/// The gradients of one MLP block, shaped like its weights (an expert stack `[E, ..]`,
/// or a dense block without the expert dimension).
pub struct MlpGrads<B: Backend> {
    /// Of the first projection.
    pub w_in: Tensor<B>,
    /// Of its bias.
    pub b_in: Option<Tensor<B>>,
    /// Of the second projection (absent for linear blocks).
    pub w_out: Option<Tensor<B>>,
    /// Of its bias.
    pub b_out: Option<Tensor<B>>,
}

impl<B: Backend> MlpGrads<B> {
    /// Every gradient, named as [`DeviceMlp`]'s weights are.
    fn into_named(self, prefix: &str, out: &mut Vec<(String, Tensor<B>)>) {
        out.push((format!("{prefix}.w_in"), self.w_in));
        for (name, t) in [("b_in", self.b_in), ("w_out", self.w_out), ("b_out", self.b_out)] {
            if let Some(t) = t {
                out.push((format!("{prefix}.{name}"), t));
            }
        }
    }
}

/// Every gradient of a layer's backward. Tensors stay on the device.
pub struct LayerGrads<B: Backend> {
    /// Of the input, shaped like it.
    pub dx: Tensor<B>,
    /// Of the router weight `[E, M]` (the correction bias takes none).
    pub gate: Tensor<B>,
    /// Of the router's logit bias `[E]` (gpt-oss).
    pub gate_logit_bias: Option<Tensor<B>>,
    /// Of the routed experts this layer holds.
    pub experts: MlpGrads<B>,
    /// Of the residual MLP, the coefficient weight `[2, M]` and bias `[2]`.
    pub residual: Option<(MlpGrads<B>, Tensor<B>, Tensor<B>)>,
    /// Of the shared experts and their gate `[1, M]`.
    pub shared: Option<(MlpGrads<B>, Option<Tensor<B>>)>,
    /// Of the output bias `[M]` (JetMoE).
    pub output_bias: Option<Tensor<B>>,
}

impl<B: Backend> LayerGrads<B> {
    /// The parameter gradients as [`LayerGrads::into_named`] gives them, each marked
    /// whether it is an expert's ([`super::is_expert_param`]): what
    /// [`crate::parallel::GradientSync::reduce`] takes.
    pub fn into_params(self) -> Vec<(String, bool, Tensor<B>)> {
        self.into_named().into_iter().map(|(n, t)| (n.clone(), super::is_expert_param(&n), t)).collect()
    }

    /// The parameter gradients named as [`MoeLayer::params_mut`] names the parameters
    /// (`gate.weight`, `experts.w_in`, ...), in the same order.
    pub fn into_named(self) -> Vec<(String, Tensor<B>)> {
        let mut out = vec![("gate.weight".to_string(), self.gate)];
        if let Some(t) = self.gate_logit_bias {
            out.push(("gate.logit_bias".into(), t));
        }
        self.experts.into_named("experts", &mut out);
        if let Some((mlp, cw, cb)) = self.residual {
            mlp.into_named("residual", &mut out);
            out.push(("coefficient.weight".into(), cw));
            out.push(("coefficient.bias".into(), cb));
        }
        if let Some((mlp, g)) = self.shared {
            mlp.into_named("shared", &mut out);
            if let Some(g) = g {
                out.push(("shared_gate.weight".into(), g));
            }
        }
        if let Some(t) = self.output_bias {
            out.push(("output_bias".into(), t));
        }
        out
    }
}

fn not_kept(what: &str) -> Error {
    Error::Misuse(format!(
        "backward needs the {what} of the forward: run the forward with LayerOptions::keep_activations"
    ))
}

impl<B: Backend> DeviceMlp<B> {
    /// The block's backward from the gradient of its output: its weights' gradients and
    /// its input's. `x` is its input, `pre` the kept pre-activation; `offsets` groups the
    /// rows of an expert stack (None: a dense block).
    pub(crate) fn backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        pre: Option<&Tensor<B>>,
        dy: &Tensor<B>,
        offsets: Option<&Offsets<B>>,
    ) -> Result<(MlpGrads<B>, Tensor<B>)> {
        let (act, glu) = match self.kind {
            ExpertKind::Linear => {
                let g = b.weight_grad(dy, x, offsets, self.b_in.is_some())?;
                let dx = b.linear_dx(dy, &self.w_in, offsets)?;
                return Ok((MlpGrads { w_in: g.dw, b_in: g.db, w_out: None, b_out: None }, dx));
            }
            ExpertKind::Mlp { activation } => (activation, None),
            ExpertKind::Glu { activation, clamp } => (activation, Some(clamp)),
        };
        let pre = pre.ok_or_else(|| not_kept("pre-activations"))?;
        // The activation's output is recomputed from the kept pre-activation (one
        // elementwise pass) rather than kept beside it.
        let a = match glu {
            Some(clamp) => b.glu_clamped(pre, act, clamp)?,
            None => b.activation(pre, act)?,
        };
        let out = b.weight_grad(dy, &a, offsets, self.b_out.is_some())?;
        let da = b.linear_dx(dy, self.w_out()?, offsets)?;
        let kind = match glu {
            Some(clamp) => ActGradKind::glu(act, clamp),
            None => ActGradKind::Activation(act),
        };
        let dpre = b.act_grad(kind, &da, pre)?;
        let inp = b.weight_grad(&dpre, x, offsets, self.b_in.is_some())?;
        let dx = b.linear_dx(&dpre, &self.w_in, offsets)?;
        Ok((MlpGrads { w_in: inp.dw, b_in: inp.db, w_out: Some(out.dw), b_out: out.db }, dx))
    }
}

impl<B: Backend> MoeLayer<B> {
    /// The backward of a forward `out` (run with [`crate::LayerOptions::keep_activations`])
    /// for the objective `Σ y · dy` plus the router losses `opts` weights: the gradient of
    /// the input and of every parameter. An expert that got no token has zero gradients.
    /// Nothing is recomputed but the activations' outputs, and nothing is read back to
    /// the host.
    pub fn backward(
        &self,
        b: &B,
        out: &LayerOutput<B>,
        dy: &Tensor<B>,
        opts: &BackwardOptions,
    ) -> Result<LayerGrads<B>> {
        let x = &out.input;
        let (s, m) = x.dims2("layer input")?;
        dy.expect_shape("dy", out.y.shape())?;
        dy.expect_dtype("dy", crate::DType::F32)?;
        let dy = dy.reshape(&[s, m])?;
        let mut dx_parts = Vec::new();
        // Cohere2-MoE averages: y = (routed + shared) / 2 (the output bias comes after).
        let dy_parts = if self.shared_combine() == SharedCombine::Average { b.scale(&dy, 0.5)? } else { dy.clone() };
        // The output bias: y = y' + bias, so d bias = Σ_tokens dy.
        let output_bias = self.output_bias.as_ref().map(|_| b.sum_rows(&dy)).transpose()?;

        // Shared experts: y = y' + sigmoid(g) · shared(x), or y' + shared(x).
        let shared = match (&self.shared, &out.dense.shared) {
            (Some((mlp, gate_w)), Some(kept)) => {
                let (d_sh, d_g) = match (gate_w, &kept.mix) {
                    (Some(_), Some(g)) => {
                        let gg = b.gated_add_grad(&dy_parts, &kept.out, g)?;
                        (gg.d_shared, Some(gg.d_gate))
                    }
                    (None, None) => (dy_parts.clone(), None),
                    _ => return Err(Error::Internal("shared experts' gate kept inconsistently".into())),
                };
                let (grads, dx_sh) = mlp.backward(b, x, kept.pre.as_ref(), &d_sh, None)?;
                dx_parts.push(dx_sh);
                let d_gate_w = match (gate_w, d_g) {
                    (Some(gw), Some(dg)) => {
                        dx_parts.push(b.linear_dx(&dg, gw, None)?);
                        Some(b.weight_grad(&dg, x, None, false)?.dw)
                    }
                    _ => None,
                };
                Some((grads, d_gate_w))
            }
            (None, None) => None,
            _ => return Err(not_kept("shared experts' output")),
        };

        // Residual MoE: y' = moe · c₀ + mlp · c₁.
        let (d_routed, residual) = match (&self.residual, &out.dense.residual) {
            (Some((mlp, cw, _)), Some(kept)) => {
                let coef = kept.mix.as_ref().ok_or_else(|| not_kept("residual coefficient"))?;
                let mg = b.mix_grad(&dy_parts, &out.dense.routed, &kept.out, coef)?;
                let (grads, dx_r) = mlp.backward(b, x, kept.pre.as_ref(), &mg.d_mlp, None)?;
                dx_parts.push(dx_r);
                let cg = b.weight_grad(&mg.d_coef, x, None, true)?;
                dx_parts.push(b.linear_dx(&mg.d_coef, cw, None)?);
                let db = cg.db.ok_or_else(|| Error::Internal("weight_grad without the bias asked".into()))?;
                (mg.d_moe, Some((grads, cg.dw, db)))
            }
            (None, None) => (dy_parts, None),
            _ => return Err(not_kept("residual MLP's output")),
        };

        // Combine, experts, dispatch: the dispatcher in reverse (local, or the exchange
        // back to the experts' ranks and home again).
        let plan = &out.gate.plan;
        let acts = &out.experts;
        let scaled = self.spec.gate.scales_input();
        let (d_yp, d_weights) =
            self.dispatcher.combine_backward(b, &d_routed, &acts.yp, plan, &out.dispatch, !scaled)?;
        let (experts, mut dxp) =
            self.experts.backward(b, &acts.xp, acts.pre_activation.as_ref(), &d_yp, Some(&acts.offsets))?;
        if self.spec.gate.identity_experts() > 0 {
            // An identity expert's rows pass their gradient straight through.
            dxp = b.pass_rows(&dxp, &d_yp, &acts.offsets, self.spec.num_experts)?;
        }
        // The combine weights' gradient comes from the combine, or (scaled inputs) from the
        // dispatch.
        let (mut dx, d_dispatch) =
            self.dispatcher.dispatch_backward(b, &dxp, plan, &out.dispatch, scaled.then_some(x))?;
        let d_weights = d_weights
            .or(d_dispatch)
            .ok_or_else(|| Error::Internal("neither the combine nor the dispatch gave the weights' gradient".into()))?;

        // The gate.
        let gg = self.gate.backward(b, x, &out.gate, &d_weights, &opts.losses)?;
        dx = b.add_gated(&dx, &gg.x, None)?;
        for part in dx_parts {
            dx = b.add_gated(&dx, &part, None)?;
        }
        Ok(LayerGrads {
            dx: dx.reshape(out.y.shape())?,
            gate: gg.weight,
            gate_logit_bias: gg.logit_bias,
            experts,
            residual,
            shared,
            output_bias,
        })
    }
}
