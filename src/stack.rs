//! The built-in demo model: a small PR-MoE-shaped stack (DeepSpeed-MoE, Rajbhandari et al.
//! 2022: residual MoE, with more experts in the deeper layers), random weights from the
//! Philox generator, used by the README's first command.

use crate::config::{DeepSpeedGate, ExpertSpec, GateSpec, LayerSpec};
use crate::error::Result;
use crate::expert::{Activation, ExpertKind};
use crate::philox;
use crate::tensor::HostTensor;
use crate::weights::{HostLayerWeights, HostMlp};

/// The shape of the demo stack.
#[derive(Clone, Debug)]
pub struct PrMoeShape {
    /// Hidden size.
    pub hidden: usize,
    /// Expert intermediate size.
    pub ffn: usize,
    /// Experts per layer, shallow to deep (PR-MoE's pyramid).
    pub experts: Vec<usize>,
    /// Routes per token.
    pub k: usize,
}

impl Default for PrMoeShape {
    fn default() -> Self {
        PrMoeShape { hidden: 256, ffn: 512, experts: vec![4, 4, 8, 8, 16, 16], k: 1 }
    }
}

/// Layer specs of the stack: residual MoE (PR-MoE's fixed MLP plus a routed expert),
/// DeepSpeed top-k gating with capacity factor 1.0 so dropped tokens show up.
pub fn specs(shape: &PrMoeShape) -> Vec<LayerSpec> {
    shape
        .experts
        .iter()
        .map(|&e| LayerSpec {
            output_bias: false,
            hidden: shape.hidden,
            num_experts: e,
            gate: GateSpec::DeepSpeed(DeepSpeedGate {
                k: shape.k,
                min_capacity: 4,
                use_rts: false,
                ..DeepSpeedGate::default()
            }),
            expert: ExpertSpec { kind: ExpertKind::Mlp { activation: Activation::Gelu }, ffn: shape.ffn, bias: true },
            residual: true,
            shared: None,
        })
        .collect()
}

fn rand(shape: &[usize], seed: u64, stream: u32, scale: f32) -> Result<HostTensor> {
    let n = crate::tensor::numel("random weight", shape)?;
    let v = philox::noise(philox::NoiseKind::Uniform, seed, stream, n)
        .into_iter()
        .map(|u| (2.0 * u - 1.0) * scale)
        .collect();
    HostTensor::f32(shape, v)
}

/// Random weights for one layer spec (uniform ±1/√fan_in, like PyTorch's default init),
/// every part the spec has: experts, residual MLP and coefficient, shared experts and
/// their gate, DeepSeek-V3's correction bias. The spec is validated first, and the host
/// must have room for the f32 values.
pub fn random_weights(spec: &LayerSpec, seed: u64) -> Result<HostLayerWeights> {
    spec.validate()?;
    let bytes = spec.weight_count()?.saturating_mul(4);
    crate::memory::check_host("the layer's random f32 weights", bytes)?;
    let (m, e) = (spec.hidden, spec.num_experts);
    let mut stream = 0u32;
    let mut next = |shape: &[usize], fan_in: usize| {
        stream += 1;
        rand(shape, seed, stream, 1.0 / (fan_in as f32).sqrt())
    };
    let mlp = |next: &mut dyn FnMut(&[usize], usize) -> Result<HostTensor>, n: usize, expert: &ExpertSpec| {
        let f = expert.ffn;
        let n_in = expert.kind.first_rows(f, m).ok_or_else(|| crate::Error::config("ffn", "2 · ffn overflows"))?;
        let linear = matches!(expert.kind, ExpertKind::Linear);
        Ok::<_, crate::Error>(HostMlp {
            w_in: next(&[n, n_in, m], m)?,
            b_in: if expert.bias { Some(next(&[n, n_in], m)?) } else { None },
            w_out: if linear { None } else { Some(next(&[n, m, f], f)?) },
            b_out: if expert.bias && !linear { Some(next(&[n, m], f)?) } else { None },
        })
    };
    let experts = mlp(&mut next, e, &spec.expert)?;
    let residual =
        if spec.residual { Some((mlp(&mut next, 1, &spec.expert)?, next(&[2, m], m)?, next(&[2], m)?)) } else { None };
    let shared = match &spec.shared {
        Some(s) => Some((mlp(&mut next, 1, &s.expert)?, if s.gated { Some(next(&[1, m], m)?) } else { None })),
        None => None,
    };
    let gate = next(&[e, m], m)?;
    let gate_bias = match spec.gate {
        GateSpec::DeepSeekV3 { .. } => Some(next(&[e], 16)?),
        _ => None,
    };
    Ok(HostLayerWeights { output_bias: None, router_bias: None, gate, gate_bias, experts, residual, shared })
}
