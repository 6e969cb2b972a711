//! Host-side weights of a layer in the engine's layout (stacked per expert, `[out, in]`
//! matrices), produced by the importers and uploaded once by [`crate::layer::MoeLayer::new`].

use crate::config::{ExpertSpec, LayerSpec};
use crate::error::{Error, Result};
use crate::expert::ExpertKind;
use crate::tensor::HostTensor;

/// One MLP block (an expert stack with E matrices, or a dense MLP with E = 1).
///
/// `w_in` is `[E, N, M]` where N is `ffn` (MLP), `2·ffn` with the gate rows first (GLU) or
/// M (linear experts); `w_out` is `[E, M, ffn]` (absent for linear experts).
#[derive(Clone, Debug)]
pub struct HostMlp {
    /// Input projection(s), `[E, N, M]`.
    pub w_in: HostTensor,
    /// Input bias, `[E, N]`.
    pub b_in: Option<HostTensor>,
    /// Output projection, `[E, M, ffn]`.
    pub w_out: Option<HostTensor>,
    /// Output bias, `[E, M]`.
    pub b_out: Option<HostTensor>,
}

impl HostMlp {
    /// Experts `range` of the stack (every tensor sliced on its first dimension).
    pub fn slice_experts(&self, range: std::ops::Range<usize>) -> Result<HostMlp> {
        self.gather_experts(&range.collect::<Vec<_>>())
    }

    /// The stack of experts `ids`, in that order (an expert may repeat: replicas).
    pub fn gather_experts(&self, ids: &[usize]) -> Result<HostMlp> {
        let cut = |t: &HostTensor| -> Result<HostTensor> {
            let e = *t.shape().first().unwrap_or(&0);
            if let Some(&bad) = ids.iter().find(|&&i| i >= e) {
                return Err(Error::shape(
                    "expert stack",
                    format!("expert {bad} of at least {} experts", bad + 1),
                    t.shape(),
                ));
            }
            let per: usize = t.shape()[1..].iter().product();
            let v = t.as_f32("expert stack")?;
            let mut shape = t.shape().to_vec();
            shape[0] = ids.len();
            HostTensor::f32(&shape, ids.iter().flat_map(|&i| v[i * per..(i + 1) * per].iter().copied()).collect())
        };
        Ok(HostMlp {
            w_in: cut(&self.w_in)?,
            b_in: self.b_in.as_ref().map(cut).transpose()?,
            w_out: self.w_out.as_ref().map(cut).transpose()?,
            b_out: self.b_out.as_ref().map(cut).transpose()?,
        })
    }

    /// Checks the shapes against the expert spec and that every value is finite; `what`
    /// prefixes tensor names in errors.
    pub fn validate(&self, what: &str, spec: &ExpertSpec, experts: usize, hidden: usize) -> Result<()> {
        let n_in = spec
            .kind
            .first_rows(spec.ffn, hidden)
            .ok_or_else(|| Error::config(format!("{what}.ffn_hidden"), format!("2 · {} overflows", spec.ffn)))?;
        for (name, t) in [
            ("w_in", Some(&self.w_in)),
            ("b_in", self.b_in.as_ref()),
            ("w_out", self.w_out.as_ref()),
            ("b_out", self.b_out.as_ref()),
        ] {
            if let Some(t) = t {
                let name = format!("{what}.{name}");
                t.as_f32(&name)?;
                t.check_finite(&name)?;
            }
        }
        self.w_in.expect_shape(&format!("{what}.w_in"), &[experts, n_in, hidden])?;
        check_opt(&self.b_in, spec.bias, &format!("{what}.b_in"), &[experts, n_in])?;
        match spec.kind {
            ExpertKind::Linear => {
                if self.w_out.is_some() || self.b_out.is_some() {
                    return Err(Error::UnexpectedTensors(vec![format!(
                        "{what}.w_out (linear experts have one layer)"
                    )]));
                }
            }
            _ => {
                let w_out = self.w_out.as_ref().ok_or_else(|| Error::MissingTensor(format!("{what}.w_out")))?;
                w_out.expect_shape(&format!("{what}.w_out"), &[experts, hidden, spec.ffn])?;
                check_opt(&self.b_out, spec.bias, &format!("{what}.b_out"), &[experts, hidden])?;
            }
        }
        Ok(())
    }
}

fn check_opt(t: &Option<HostTensor>, want: bool, name: &str, shape: &[usize]) -> Result<()> {
    match (t, want) {
        (Some(t), true) => t.expect_shape(name, shape),
        (None, false) => Ok(()),
        (None, true) => Err(Error::MissingTensor(name.into())),
        (Some(_), false) => Err(Error::UnexpectedTensors(vec![format!("{name} (the config says bias = false)")])),
    }
}

/// All weights of one MoE layer.
#[derive(Clone, Debug)]
pub struct HostLayerWeights {
    /// Router weight `[E + Z, M]` (Z identity experts, usually none).
    pub gate: HostTensor,
    /// The selection bias `[E + Z]` (DeepSeek-V3's `e_score_correction_bias` and its
    /// namesakes): added to the scores for the choice only.
    pub gate_bias: Option<HostTensor>,
    /// The router's logit bias `[E + Z]` (gpt-oss `router.bias`).
    pub router_bias: Option<HostTensor>,
    /// The bias `[M]` added to every token's output (JetMoE).
    pub output_bias: Option<HostTensor>,
    /// Routed experts.
    pub experts: HostMlp,
    /// Residual MoE: the dense MLP, then the coefficient weight `[2, M]` and bias `[2]`.
    pub residual: Option<(HostMlp, HostTensor, HostTensor)>,
    /// Shared experts: the dense MLP and the optional `shared_expert_gate` weight `[1, M]`.
    pub shared: Option<(HostMlp, Option<HostTensor>)>,
}

impl HostMlp {
    fn named<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a HostTensor)>) {
        out.push((format!("{prefix}.w_in"), &self.w_in));
        for (name, t) in [("b_in", &self.b_in), ("w_out", &self.w_out), ("b_out", &self.b_out)] {
            if let Some(t) = t {
                out.push((format!("{prefix}.{name}"), t));
            }
        }
    }
}

impl HostLayerWeights {
    /// Every tensor under the engine's own name: `gate.weight`, `gate.bias` (DeepSeek-V3's
    /// correction bias), `experts.{w_in,b_in,w_out,b_out}`, `residual.*`,
    /// `coefficient.{weight,bias}`, `shared.*`, `shared_gate.weight`: the names a
    /// layer's parameters and gradients go by (`MoeLayer::params_mut`).
    pub fn named(&self) -> Vec<(String, &HostTensor)> {
        let mut out = vec![("gate.weight".to_string(), &self.gate)];
        if let Some(b) = &self.gate_bias {
            out.push(("gate.bias".into(), b));
        }
        if let Some(b) = &self.router_bias {
            out.push(("gate.logit_bias".into(), b));
        }
        if let Some(b) = &self.output_bias {
            out.push(("output_bias".into(), b));
        }
        self.experts.named("experts", &mut out);
        if let Some((mlp, cw, cb)) = &self.residual {
            mlp.named("residual", &mut out);
            out.push(("coefficient.weight".into(), cw));
            out.push(("coefficient.bias".into(), cb));
        }
        if let Some((mlp, g)) = &self.shared {
            mlp.named("shared", &mut out);
            if let Some(g) = g {
                out.push(("shared_gate.weight".into(), g));
            }
        }
        out
    }

    /// Checks every tensor's presence, shape and finiteness against the spec.
    pub fn validate(&self, spec: &LayerSpec) -> Result<()> {
        self.validate_holding(spec, spec.num_experts)
    }

    /// [`HostLayerWeights::validate`] for weights whose routed experts are `experts` of
    /// the spec's (one expert-parallel rank's share); the router still scores them all.
    pub fn validate_holding(&self, spec: &LayerSpec, experts: usize) -> Result<()> {
        let (e, m) = (spec.num_experts, spec.hidden);
        let scored = e + spec.gate.identity_experts();
        self.gate.expect_shape("gate.weight", &[scored, m])?;
        for (name, t) in [
            ("gate.weight", Some(&self.gate)),
            ("gate.e_score_correction_bias", self.gate_bias.as_ref()),
            ("router.bias", self.router_bias.as_ref()),
            ("output_bias", self.output_bias.as_ref()),
            ("coefficient.weight", self.residual.as_ref().map(|r| &r.1)),
            ("coefficient.bias", self.residual.as_ref().map(|r| &r.2)),
            ("shared_expert_gate.weight", self.shared.as_ref().and_then(|s| s.1.as_ref())),
        ] {
            if let Some(t) = t {
                t.as_f32(name)?;
                t.check_finite(name)?;
            }
        }
        self.experts.validate("experts", &spec.expert, experts, m)?;
        use crate::config::GateSpec;
        let needs_bias = match &spec.gate {
            GateSpec::DeepSeekV3 { .. } => true,
            GateSpec::Router(r) => r.selection_bias,
            _ => false,
        };
        match (&self.gate_bias, needs_bias) {
            (Some(b), true) => b.expect_shape("gate.e_score_correction_bias", &[scored])?,
            (None, true) => return Err(Error::MissingTensor("gate.e_score_correction_bias".into())),
            (Some(_), false) => return Err(Error::UnexpectedTensors(vec!["gate.e_score_correction_bias".into()])),
            (None, false) => {}
        }
        let logit_bias = matches!(&spec.gate, GateSpec::Router(r) if r.logit_bias);
        check_opt(&self.router_bias, logit_bias, "router.bias", &[scored])?;
        check_opt(&self.output_bias, spec.output_bias, "output_bias", &[m])?;
        match (&self.residual, spec.residual) {
            (Some((mlp, cw, cb)), true) => {
                mlp.validate("mlp", &spec.expert, 1, m)?;
                cw.expect_shape("coefficient.weight", &[2, m])?;
                cb.expect_shape("coefficient.bias", &[2])?;
            }
            (None, true) => return Err(Error::MissingTensor("mlp / coefficient (use_residual = true)".into())),
            (Some(_), false) => return Err(Error::UnexpectedTensors(vec!["mlp.*, coefficient.*".into()])),
            (None, false) => {}
        }
        match (&self.shared, &spec.shared) {
            (Some((mlp, g)), Some(s)) => {
                mlp.validate("shared_experts", &s.expert, 1, m)?;
                match (g, s.gated) {
                    (Some(g), true) => g.expect_shape("shared_expert_gate.weight", &[1, m])?,
                    (None, true) => return Err(Error::MissingTensor("shared_expert_gate.weight".into())),
                    (Some(_), false) => return Err(Error::UnexpectedTensors(vec!["shared_expert_gate.weight".into()])),
                    (None, false) => {}
                }
            }
            (None, Some(_)) => return Err(Error::MissingTensor("shared_experts.*".into())),
            (Some(_), None) => return Err(Error::UnexpectedTensors(vec!["shared_experts.*".into()])),
            (None, None) => {}
        }
        Ok(())
    }
}
