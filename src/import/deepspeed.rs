//! DeepSpeed: `deepspeed.moe.layer.MoE(...)` keyword arguments (plus an `expert`
//! description, since DeepSpeed takes an arbitrary module) and its state dict names:
//! `deepspeed_moe.gate.wg.weight`, `deepspeed_moe.experts.deepspeed_experts.{e}.*`,
//! `mlp.*`, `coefficient.*`.
//!
//! Expert modules recognised (`expert.type`): `linear` (`nn.Linear(M, M)`: `{e}.weight`),
//! `mlp_<act>` (`nn.Sequential(Linear, Act, Linear)`: `{e}.0.*`, `{e}.2.*`) with act one of
//! gelu, gelu_tanh, relu, silu, and `glu_<act>` (a module with `gate_proj`, `up_proj`,
//! `down_proj` children).

use super::checkpoint::{concat_rows, stack, Checkpoint};
use super::{field, field_opt, field_or};
use crate::config::{DeepSpeedGate, DropPolicy, ExpertSpec, GateSpec, LayerSpec, NoisyGatePolicy};
use crate::error::{Error, Result};
use crate::expert::{Activation, ExpertKind};
use crate::tensor::HostTensor;
use crate::weights::{HostLayerWeights, HostMlp};
use serde_json::Value;
use std::collections::BTreeMap;

/// Parses the `expert` description `{type, ffn_hidden, bias}`.
pub fn expert_spec(v: &Value) -> Result<ExpertSpec> {
    let ty: String = field(v, "type")
        .map_err(|_| Error::config("expert.type", "missing (linear, mlp_gelu, mlp_relu, glu_silu, ...)"))?;
    let bias: bool = field_or(v, "bias", true)?;
    // Linear experts have no hidden width: null or absent.
    let ffn: usize = field_opt(v, "ffn_hidden")?.unwrap_or(0);
    let act = |s: &str| {
        s.parse::<Activation>().map_err(|_| Error::config("expert.type", format!("unknown activation in `{ty}`")))
    };
    let kind = if ty == "linear" {
        ExpertKind::Linear
    } else if let Some(a) = ty.strip_prefix("mlp_") {
        ExpertKind::Mlp { activation: act(a)? }
    } else if let Some(a) = ty.strip_prefix("glu_") {
        ExpertKind::Glu { activation: act(a)?, clamp: None }
    } else {
        return Err(Error::config("expert.type", format!("unknown expert type `{ty}` (linear, mlp_<act>, glu_<act>)")));
    };
    if !matches!(kind, ExpertKind::Linear) && ffn == 0 {
        return Err(Error::config("expert.ffn_hidden", format!("required for `{ty}` experts")));
    }
    Ok(ExpertSpec { kind, ffn, bias })
}

/// Parses gate settings from `MoE(...)` keyword arguments (`MoE`'s defaults for absent
/// ones: min_capacity 4).
pub fn gate_spec(cfg: &Value) -> Result<DeepSpeedGate> {
    gate_spec_with(cfg, DeepSpeedGate::default())
}

/// Parses `TopKGate(...)` keyword arguments (`TopKGate`'s own defaults for absent ones:
/// min_capacity 8).
pub fn topk_gate_spec(cfg: &Value) -> Result<DeepSpeedGate> {
    gate_spec_with(cfg, DeepSpeedGate { min_capacity: 8, ..DeepSpeedGate::default() })
}

fn gate_spec_with(cfg: &Value, d: DeepSpeedGate) -> Result<DeepSpeedGate> {
    let noisy: Option<String> = field_opt(cfg, "noisy_gate_policy")?;
    let noisy_gate_policy = match noisy.as_deref() {
        None | Some("None") | Some("none") => None,
        Some("Jitter") => Some(NoisyGatePolicy::Jitter),
        Some("RSample") => Some(NoisyGatePolicy::RSample),
        Some(other) => {
            return Err(Error::config("noisy_gate_policy", format!("`{other}` is not one of None, Jitter, RSample")))
        }
    };
    let policy: String = field_or(cfg, "drop_policy", "probs".to_string())?;
    let drop_policy = match policy.as_str() {
        "probs" => DropPolicy::Probs,
        "position" => DropPolicy::Position,
        other => return Err(Error::config("drop_policy", format!("`{other}` is not one of probs, position"))),
    };
    let min_capacity: i64 = field_or(cfg, "min_capacity", d.min_capacity as i64)?;
    if min_capacity < 0 {
        return Err(Error::config("min_capacity", "must be >= 0"));
    }
    Ok(DeepSpeedGate {
        k: field_or(cfg, "k", d.k)?,
        capacity_factor: field_or(cfg, "capacity_factor", d.capacity_factor)?,
        eval_capacity_factor: field_or(cfg, "eval_capacity_factor", d.eval_capacity_factor)?,
        min_capacity: min_capacity as usize,
        noisy_gate_policy,
        drop_tokens: field_or(cfg, "drop_tokens", d.drop_tokens)?,
        use_rts: field_or(cfg, "use_rts", d.use_rts)?,
        top2_2nd_expert_sampling: field_or(cfg, "top2_2nd_expert_sampling", d.top2_2nd_expert_sampling)?,
        drop_policy,
    })
}

/// Builds a layer spec from `MoE(...)` keyword arguments with an `expert` description.
pub fn layer_spec(cfg: &Value) -> Result<LayerSpec> {
    let ep_size: usize = field_or(cfg, "ep_size", 1)?;
    let num_experts: usize = field(cfg, "num_experts")?;
    if ep_size == 0 || !num_experts.is_multiple_of(ep_size) {
        return Err(Error::config("ep_size", format!("{ep_size} must divide num_experts = {num_experts}")));
    }
    let expert = expert_spec(
        cfg.get("expert")
            .ok_or_else(|| Error::config("expert", "missing: describe the expert module {type, ffn_hidden, bias}"))?,
    )?;
    let spec = LayerSpec {
        output_bias: false,
        hidden: field(cfg, "hidden_size")?,
        num_experts,
        gate: GateSpec::DeepSpeed(gate_spec(cfg)?),
        expert,
        residual: field_or(cfg, "use_residual", false)?,
        shared: None,
    };
    spec.validate()?;
    Ok(spec)
}

/// The parameters of one MLP block, by what they are in the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    /// The input projection of linear and MLP experts.
    In,
    /// Its bias.
    InBias,
    /// The gate projection of GLU experts.
    Gate,
    /// Its bias.
    GateBias,
    /// The up projection of GLU experts.
    Up,
    /// Its bias.
    UpBias,
    /// The output projection.
    Out,
    /// Its bias.
    OutBias,
}

impl Role {
    fn is_bias(self) -> bool {
        matches!(self, Role::InBias | Role::GateBias | Role::UpBias | Role::OutBias)
    }

    /// The shape of this parameter for one expert of `spec` in a model of width `hidden`.
    fn shape(self, spec: &ExpertSpec, hidden: usize) -> Vec<usize> {
        let linear = matches!(spec.kind, ExpertKind::Linear);
        match self {
            Role::In if linear => vec![hidden, hidden],
            Role::InBias if linear => vec![hidden],
            Role::In | Role::Gate | Role::Up => vec![spec.ffn, hidden],
            Role::InBias | Role::GateBias | Role::UpBias => vec![spec.ffn],
            Role::Out => vec![hidden, spec.ffn],
            Role::OutBias => vec![hidden],
        }
    }
}

/// Names of one MLP block's parameters under `prefix` for DeepSpeed module layouts.
fn block_names(kind: ExpertKind, prefix: &str) -> Vec<(Role, String)> {
    match kind {
        ExpertKind::Linear => vec![(Role::In, format!("{prefix}weight")), (Role::InBias, format!("{prefix}bias"))],
        ExpertKind::Mlp { .. } => vec![
            (Role::In, format!("{prefix}0.weight")),
            (Role::InBias, format!("{prefix}0.bias")),
            (Role::Out, format!("{prefix}2.weight")),
            (Role::OutBias, format!("{prefix}2.bias")),
        ],
        ExpertKind::Glu { .. } => vec![
            (Role::Gate, format!("{prefix}gate_proj.weight")),
            (Role::GateBias, format!("{prefix}gate_proj.bias")),
            (Role::Up, format!("{prefix}up_proj.weight")),
            (Role::UpBias, format!("{prefix}up_proj.bias")),
            (Role::Out, format!("{prefix}down_proj.weight")),
            (Role::OutBias, format!("{prefix}down_proj.bias")),
        ],
    }
}

/// Reads E blocks (`prefixes[e]`) into one stacked [`HostMlp`].
pub(crate) fn read_blocks(
    ck: &mut Checkpoint,
    spec: &ExpertSpec,
    prefixes: &[String],
    hidden: usize,
) -> Result<HostMlp> {
    let mut parts: std::collections::BTreeMap<Role, Vec<HostTensor>> = Default::default();
    for p in prefixes {
        for (role, name) in block_names(spec.kind, p) {
            if role.is_bias() && !spec.bias {
                continue;
            }
            parts.entry(role).or_default().push(ck.take_shaped(&name, &role.shape(spec, hidden))?);
        }
    }
    let mut take = |r: Role| parts.remove(&r).map(|v| stack(v, &format!("{r:?}"))).transpose();
    let mut need =
        |r: Role| take(r)?.ok_or_else(|| Error::MissingTensor(format!("{r:?} projection (no expert blocks given)")));
    let (w_in, b_in) = match spec.kind {
        ExpertKind::Glu { .. } => {
            let (g, u) = (need(Role::Gate)?, need(Role::Up)?);
            let w = concat_rows(&g, &u, "up_proj")?;
            // Biases [E, ffn] each: gate rows first, as in the fused input projection.
            let b = match (take(Role::GateBias)?, take(Role::UpBias)?) {
                (Some(gb), Some(ub)) => {
                    let (n, f) = (gb.shape()[0], gb.shape()[1]);
                    let both = concat_rows(&gb.reshape(&[n, f, 1])?, &ub.reshape(&[n, f, 1])?, "up_proj.bias")?;
                    Some(both.reshape(&[n, 2 * f])?)
                }
                _ => None,
            };
            (w, b)
        }
        _ => (need(Role::In)?, take(Role::InBias)?),
    };
    Ok(HostMlp { w_in, b_in, w_out: take(Role::Out)?, b_out: take(Role::OutBias)? })
}

/// Reads a DeepSpeed `MoE` state dict (keys under `prefix`, e.g. `""` or
/// `"layers.3.mlp."`). Unused keys under the prefix are an error.
pub fn layer_weights(ck: &mut Checkpoint, spec: &LayerSpec, prefix: &str) -> Result<HostLayerWeights> {
    layer_weights_holding(ck, spec, prefix, spec.num_experts)
}

/// [`layer_weights`] of one expert-parallel rank's state dict, which holds `experts` of
/// the layer's experts (`deepspeed_experts.0 ..` are the rank's own, DeepSpeed's local
/// numbering) beside the whole router.
pub fn layer_weights_holding(
    ck: &mut Checkpoint,
    spec: &LayerSpec,
    prefix: &str,
    holding: usize,
) -> Result<HostLayerWeights> {
    spec.validate()?;
    let (e, m) = (spec.num_experts, spec.hidden);
    // The router first: its [E, M] shape checks the config's expert count against the
    // checkpoint before any per-expert name is built.
    let gate = ck.take_shaped(&format!("{prefix}deepspeed_moe.gate.wg.weight"), &[e, m])?;
    let prefixes: Vec<String> = (0..holding).map(|i| expert_prefix(prefix, i)).collect();
    let experts = read_blocks(ck, &spec.expert, &prefixes, m)?;
    let residual = if spec.residual {
        let mlp = read_blocks(ck, &spec.expert, &[format!("{prefix}mlp.")], m)?;
        let cw = ck.take_shaped(&format!("{prefix}coefficient.weight"), &[2, m])?;
        let cb = ck.take_shaped(&format!("{prefix}coefficient.bias"), &[2])?;
        Some((mlp, cw, cb))
    } else {
        None
    };
    ck.finish(prefix)?;
    let w = HostLayerWeights {
        output_bias: None,
        router_bias: None,
        gate,
        gate_bias: None,
        experts,
        residual,
        shared: None,
    };
    w.validate_holding(spec, holding)?;
    Ok(w)
}

fn expert_prefix(prefix: &str, i: usize) -> String {
    format!("{prefix}deepspeed_moe.experts.deepspeed_experts.{i}.")
}

/// One expert's (or the dense block's) matrices of a stacked [`HostMlp`], under its
/// DeepSpeed names: the inverse of [`read_blocks`] for expert `i`.
fn write_block(
    mlp: &HostMlp,
    spec: &ExpertSpec,
    i: usize,
    prefix: &str,
    out: &mut BTreeMap<String, HostTensor>,
) -> Result<()> {
    let pick = |t: &HostTensor, what: &str| -> Result<HostTensor> {
        let per: usize = t.shape()[1..].iter().product();
        let v = t.as_f32(what)?;
        let part = v.get(i * per..(i + 1) * per).ok_or_else(|| Error::Internal(format!("{what}: no expert {i}")))?;
        HostTensor::f32(&t.shape()[1..], part.to_vec())
    };
    let glu = matches!(spec.kind, ExpertKind::Glu { .. });
    for (role, name) in block_names(spec.kind, prefix) {
        let t = match role {
            Role::In | Role::Gate | Role::Up => Some(&mlp.w_in),
            Role::InBias | Role::GateBias | Role::UpBias => mlp.b_in.as_ref(),
            Role::Out => mlp.w_out.as_ref(),
            Role::OutBias => mlp.b_out.as_ref(),
        };
        let Some(t) = t else { continue };
        let mut one = pick(t, &name)?;
        if glu && role != Role::Out && role != Role::OutBias {
            // The fused input projection (and its bias) holds the gate rows, then the up rows.
            let v = one.as_f32(&name)?;
            let half = v.len() / 2;
            let part = if matches!(role, Role::Gate | Role::GateBias) { &v[..half] } else { &v[half..] };
            one = HostTensor::f32(&role.shape(spec, mlp.w_in.shape()[2]), part.to_vec())?;
        }
        out.insert(name, one);
    }
    Ok(())
}

/// A DeepSpeed `MoE` state dict (keys under `prefix`) from the engine's weights: the
/// inverse of [`layer_weights_holding`], so the gradients or trained weights of a layer
/// read back under the names the torch module gives its parameters. `weights.experts`
/// holds `experts` of the layer's experts (all of them, or one rank's own).
pub fn state_dict(spec: &LayerSpec, weights: &HostLayerWeights, prefix: &str) -> Result<BTreeMap<String, HostTensor>> {
    let experts = weights.experts.w_in.shape().first().copied().unwrap_or(0);
    let mut out = BTreeMap::new();
    out.insert(format!("{prefix}deepspeed_moe.gate.wg.weight"), weights.gate.clone());
    for i in 0..experts {
        write_block(&weights.experts, &spec.expert, i, &expert_prefix(prefix, i), &mut out)?;
    }
    if let Some((mlp, cw, cb)) = &weights.residual {
        write_block(mlp, &spec.expert, 0, &format!("{prefix}mlp."), &mut out)?;
        out.insert(format!("{prefix}coefficient.weight"), cw.clone());
        out.insert(format!("{prefix}coefficient.bias"), cb.clone());
    }
    Ok(out)
}
