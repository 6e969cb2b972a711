//! HF transformers MoE blocks: `config.json` for mixtral, qwen2_moe, qwen3_moe, olmoe,
//! deepseek_v2, deepseek_v3 and switch_transformers, and weights from safetensors in the
//! per-expert hub layout (`experts.N.w1/w2/w3`, `experts.N.gate_proj/up_proj/down_proj`,
//! `experts.expert_N.wi/wo`) or transformers-5's fused layout (`experts.gate_up_proj`
//! `[E, 2I, H]` gate rows first, `experts.down_proj` `[E, H, I]`).

use super::checkpoint::{concat_rows, stack, Checkpoint};
use super::{field, field_any, field_opt, field_or};
use crate::config::{DeepSeekV2Method, ExpertSpec, GateSpec, LayerSpec, SharedSpec};
use crate::error::{Error, Result};
use crate::expert::{Activation, ExpertKind};
use crate::tensor::HostTensor;
use crate::weights::{HostLayerWeights, HostMlp};
use serde_json::Value;

/// The model families whose MoE block the engine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Mixtral (`experts.N.w1/w3/w2`).
    Mixtral,
    /// Qwen2-MoE (sigmoid-gated shared expert).
    Qwen2Moe,
    /// Qwen3-MoE.
    Qwen3Moe,
    /// OLMoE.
    Olmoe,
    /// DeepSeek-V2.
    DeepseekV2,
    /// DeepSeek-V3.
    DeepseekV3,
    /// Switch Transformers.
    Switch,
}

impl Family {
    /// From a `model_type`.
    pub fn from_model_type(t: &str) -> Result<Self> {
        Ok(match t {
            "mixtral" => Family::Mixtral,
            "qwen2_moe" => Family::Qwen2Moe,
            "qwen3_moe" => Family::Qwen3Moe,
            "olmoe" => Family::Olmoe,
            "deepseek_v2" => Family::DeepseekV2,
            "deepseek_v3" => Family::DeepseekV3,
            "switch_transformers" => Family::Switch,
            other => {
                return Err(Error::config(
                    "model_type",
                    format!("`{other}` is not supported (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, switch_transformers)"),
                ))
            }
        })
    }

    /// The `model_type` of the family's `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Olmoe => "olmoe",
            Family::DeepseekV2 => "deepseek_v2",
            Family::DeepseekV3 => "deepseek_v3",
            Family::Switch => "switch_transformers",
        }
    }

    /// Per-expert hub names of the gate, up and down projections.
    fn proj_names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Family::Mixtral => ("w1", "w3", "w2"),
            _ => ("gate_proj", "up_proj", "down_proj"),
        }
    }
}

fn activation(cfg: &Value, key: &str, default: &str) -> Result<Activation> {
    let a: String = field_or(cfg, key, default.to_string())?;
    a.parse().map_err(|_| Error::config(key, format!("unsupported activation `{a}`")))
}

/// Builds the MoE block's layer spec from a model `config.json`.
pub fn layer_spec(cfg: &Value) -> Result<(Family, LayerSpec)> {
    let mt: String = field(cfg, "model_type")?;
    let fam = Family::from_model_type(&mt)?;
    let glu = |ffn: usize, act: Activation| ExpertSpec { kind: ExpertKind::Glu { activation: act }, ffn, bias: false };
    let spec = match fam {
        Family::Mixtral => LayerSpec {
            output_bias: false,
            hidden: field(cfg, "hidden_size")?,
            num_experts: field_any(cfg, &["num_local_experts", "num_experts"])?,
            gate: GateSpec::SoftmaxTopK { k: field(cfg, "num_experts_per_tok")?, normalize: true },
            expert: glu(field(cfg, "intermediate_size")?, activation(cfg, "hidden_act", "silu")?),
            residual: false,
            shared: None,
        },
        Family::Qwen2Moe | Family::Qwen3Moe | Family::Olmoe => {
            let act = activation(cfg, "hidden_act", "silu")?;
            let ffn_key = if fam == Family::Olmoe { "intermediate_size" } else { "moe_intermediate_size" };
            let shared = if fam == Family::Qwen2Moe {
                // transformers builds the shared expert whether the key is there or not.
                let n: usize = field_or(cfg, "shared_expert_intermediate_size", 5632)?;
                (n > 0).then(|| SharedSpec { combine: Default::default(), expert: glu(n, act), gated: true })
            } else {
                None
            };
            LayerSpec {
                output_bias: false,
                hidden: field(cfg, "hidden_size")?,
                num_experts: field_any(cfg, &["num_experts", "num_local_experts"])?,
                gate: GateSpec::SoftmaxTopK {
                    k: field(cfg, "num_experts_per_tok")?,
                    normalize: field_or(cfg, "norm_topk_prob", false)?,
                },
                expert: glu(field(cfg, ffn_key)?, act),
                residual: false,
                shared,
            }
        }
        Family::DeepseekV2 | Family::DeepseekV3 => {
            let act = activation(cfg, "hidden_act", "silu")?;
            let ffn: usize = field(cfg, "moe_intermediate_size")?;
            // Absent keys take the defaults of transformers' config classes; a null is
            // Python's None, which the router cannot use except where noted.
            let v3 = fam == Family::DeepseekV3;
            let n_shared: usize = field_or(cfg, "n_shared_experts", if v3 { 1 } else { 2 })?;
            let k: usize =
                if v3 { field_or(cfg, "num_experts_per_tok", 8)? } else { field(cfg, "num_experts_per_tok")? };
            // Group counts: absent takes the default (V3: 8 and 4; V2: None), null is None.
            let group = |key: &str, v3_default: usize| -> Result<Option<usize>> {
                match cfg.get(key) {
                    None => Ok(v3.then_some(v3_default)),
                    Some(_) => field_opt(cfg, key),
                }
            };
            let (n_group, topk_group) = (group("n_group", 8)?, group("topk_group", 4)?);
            let scale: f32 = field_or(cfg, "routed_scaling_factor", if v3 { 2.5 } else { 1.0 })?;
            // Shared experts take `mlp_bias` (V2); routed experts never have biases.
            let shared_bias: bool = field_or(cfg, "mlp_bias", false)?;
            let needed = |v: Option<usize>, key: &str| {
                v.ok_or_else(|| Error::config(key, "is null or missing: the grouped router needs a group count"))
            };
            let gate = if v3 {
                // `bool | None = True`: the router tests it for truth, so null is false.
                let normalize = match cfg.get("norm_topk_prob") {
                    None => true,
                    Some(_) => field_opt(cfg, "norm_topk_prob")?.unwrap_or(false),
                };
                let (n_group, topk_group) = (needed(n_group, "n_group")?, needed(topk_group, "topk_group")?);
                GateSpec::DeepSeekV3 { k, n_group, topk_group, normalize, routed_scaling_factor: scale }
            } else {
                let method: String = field_or(cfg, "topk_method", "greedy".to_string())?;
                let method = match method.as_str() {
                    "greedy" => DeepSeekV2Method::Greedy,
                    "group_limited_greedy" => DeepSeekV2Method::GroupLimitedGreedy,
                    other => {
                        return Err(Error::config(
                            "topk_method",
                            format!("`{other}` is not one of greedy, group_limited_greedy"),
                        ))
                    }
                };
                // transformers 5.23's DeepseekV2 router never reads `norm_topk_prob`: the
                // weights are the top-k softmax scores times the route scale. Its type
                // (`bool | None`) is still checked, as transformers' strict config does.
                let _: Option<bool> = field_opt(cfg, "norm_topk_prob")?;
                // Greedy routing never reads the groups (transformers' default is None).
                let (n_group, topk_group) = match method {
                    DeepSeekV2Method::Greedy => (n_group.unwrap_or(1), topk_group.unwrap_or(1)),
                    DeepSeekV2Method::GroupLimitedGreedy => {
                        (needed(n_group, "n_group")?, needed(topk_group, "topk_group")?)
                    }
                };
                GateSpec::DeepSeekV2 { k, n_group, topk_group, method, normalize: false, routed_scaling_factor: scale }
            };
            LayerSpec {
                output_bias: false,
                hidden: field(cfg, "hidden_size")?,
                num_experts: field(cfg, "n_routed_experts")?,
                gate,
                expert: glu(ffn, act),
                residual: false,
                shared: (n_shared > 0).then(|| SharedSpec {
                    combine: Default::default(),
                    expert: ExpertSpec { bias: shared_bias, ..glu(ffn * n_shared, act) },
                    gated: false,
                }),
            }
        }
        Family::Switch => LayerSpec {
            output_bias: false,
            hidden: field(cfg, "d_model")?,
            num_experts: field(cfg, "num_experts")?,
            gate: GateSpec::Switch { expert_capacity: field(cfg, "expert_capacity")? },
            expert: ExpertSpec {
                kind: ExpertKind::Mlp { activation: activation(cfg, "dense_act_fn", "relu")? },
                ffn: field(cfg, "d_ff")?,
                bias: false,
            },
            residual: false,
            shared: None,
        },
    };
    if fam == Family::Switch {
        if field_or(cfg, "router_bias", false)? {
            return Err(Error::config("router_bias", "a biased Switch router is not supported"));
        }
        let dt: String = field_or(cfg, "router_dtype", "float32".to_string())?;
        if dt != "float32" {
            return Err(Error::config("router_dtype", format!("`{dt}`: the engine routes in float32 only")));
        }
    }
    spec.validate()?;
    Ok((fam, spec))
}

/// Reads a GLU block in hub layout under each prefix (`{prefix}{gate}.weight`, ...), with
/// `.bias` tensors when `bias`.
fn hub_glu(
    ck: &mut Checkpoint,
    fam: Family,
    prefixes: &[String],
    ffn: usize,
    hidden: usize,
    bias: bool,
) -> Result<HostMlp> {
    let (g, u, d) = fam.proj_names();
    let (mut gs, mut us, mut ds) = (Vec::new(), Vec::new(), Vec::new());
    let (mut gb, mut ub, mut db) = (Vec::new(), Vec::new(), Vec::new());
    for p in prefixes {
        gs.push(ck.take_shaped(&format!("{p}{g}.weight"), &[ffn, hidden])?);
        us.push(ck.take_shaped(&format!("{p}{u}.weight"), &[ffn, hidden])?);
        ds.push(ck.take_shaped(&format!("{p}{d}.weight"), &[hidden, ffn])?);
        if bias {
            gb.push(ck.take_shaped(&format!("{p}{g}.bias"), &[ffn])?);
            ub.push(ck.take_shaped(&format!("{p}{u}.bias"), &[ffn])?);
            db.push(ck.take_shaped(&format!("{p}{d}.bias"), &[hidden])?);
        }
    }
    let w_in = concat_rows(&stack(gs, g)?, &stack(us, u)?, u)?;
    let (b_in, b_out) = if bias {
        // [E, ffn] gate biases then up biases, as the fused input projection's rows.
        let n = gb.len();
        let (g2, u2) = (stack(gb, g)?.reshape(&[n, ffn, 1])?, stack(ub, u)?.reshape(&[n, ffn, 1])?);
        (Some(concat_rows(&g2, &u2, u)?.reshape(&[n, 2 * ffn])?), Some(stack(db, d)?))
    } else {
        (None, None)
    };
    Ok(HostMlp { w_in, b_in, w_out: Some(stack(ds, d)?), b_out })
}

/// Reads the MoE block's weights, keys under `prefix` (e.g. `""`, or
/// `"model.layers.3.mlp."`); either expert layout is accepted. Unused keys under the prefix
/// are an error.
pub fn layer_weights(ck: &mut Checkpoint, fam: Family, spec: &LayerSpec, prefix: &str) -> Result<HostLayerWeights> {
    spec.validate()?;
    let (e, m, f) = (spec.num_experts, spec.hidden, spec.expert.ffn);
    // The router first: its [E, M] shape checks the config's expert count against the
    // checkpoint before any per-expert name is built.
    let gate_name = if fam == Family::Switch { "router.classifier.weight" } else { "gate.weight" };
    let gate = ck.take_shaped(&format!("{prefix}{gate_name}"), &[e, m])?;
    let experts = if fam == Family::Switch {
        let prefixes: Vec<String> = (0..e).map(|i| format!("{prefix}experts.expert_{i}.")).collect();
        let mut wi = Vec::new();
        let mut wo = Vec::new();
        for p in &prefixes {
            wi.push(ck.take_shaped(&format!("{p}wi.weight"), &[f, m])?);
            wo.push(ck.take_shaped(&format!("{p}wo.weight"), &[m, f])?);
        }
        HostMlp { w_in: stack(wi, "wi")?, b_in: None, w_out: Some(stack(wo, "wo")?), b_out: None }
    } else {
        let fused = format!("{prefix}experts.gate_up_proj");
        if ck.contains(&fused) {
            let w_in = ck.take_shaped(&fused, &[e, 2 * f, m])?;
            let w_out = ck.take_shaped(&format!("{prefix}experts.down_proj"), &[e, m, f])?;
            HostMlp { w_in, b_in: None, w_out: Some(w_out), b_out: None }
        } else {
            let prefixes: Vec<String> = (0..e).map(|i| format!("{prefix}experts.{i}.")).collect();
            hub_glu(ck, fam, &prefixes, f, m, false)?
        }
    };
    let gate_bias = if fam == Family::DeepseekV3 {
        Some(ck.take_shaped(&format!("{prefix}gate.e_score_correction_bias"), &[e])?)
    } else {
        None
    };
    let shared = match &spec.shared {
        Some(s) => {
            let (block, gate_w) = if fam == Family::Qwen2Moe {
                (
                    format!("{prefix}shared_expert."),
                    Some(ck.take_shaped(&format!("{prefix}shared_expert_gate.weight"), &[1, m])?),
                )
            } else {
                (format!("{prefix}shared_experts."), None)
            };
            let mlp = hub_glu(ck, fam, &[block], s.expert.ffn, m, s.expert.bias)?;
            Some((mlp, gate_w))
        }
        None => {
            // With zero shared experts HF still writes zero-size shared MLP tensors (and
            // Qwen2-MoE its shared_expert_gate); they contribute nothing.
            let empty: Vec<String> = ck
                .names()
                .filter(|n| n.starts_with(&format!("{prefix}shared_expert")) && ck.get(n).is_ok_and(|t| t.numel() == 0))
                .map(String::from)
                .collect();
            if !empty.is_empty() {
                for n in &empty {
                    ck.take(n)?;
                }
                ck.take_opt(&format!("{prefix}shared_expert_gate.weight"));
            }
            None
        }
    };
    ck.finish(prefix)?;
    let w = HostLayerWeights { output_bias: None, router_bias: None, gate, gate_bias, experts, residual: None, shared };
    w.validate(spec)?;
    Ok(w)
}

/// Splits a fused `[E, 2I, H]` gate_up tensor back into per-expert `(gate, up)` matrices
/// (for writers and tests of the hub layout).
pub fn split_gate_up(t: &HostTensor) -> Result<Vec<(HostTensor, HostTensor)>> {
    let (e, two_i, h) = match t.shape()[..] {
        [a, b, c] if b % 2 == 0 => (a, b, c),
        _ => return Err(Error::shape("experts.gate_up_proj", "[E, 2I, H]", t.shape())),
    };
    let i = two_i / 2;
    let d = t.as_f32("experts.gate_up_proj")?;
    (0..e)
        .map(|x| {
            let base = x * two_i * h;
            Ok((
                HostTensor::f32(&[i, h], d[base..base + i * h].to_vec())?,
                HostTensor::f32(&[i, h], d[base + i * h..base + two_i * h].to_vec())?,
            ))
        })
        .collect()
}

/// Where a family keeps the MoE block of decoder layer `layer` in a full model checkpoint
/// (Switch: the encoder's feed-forward of block `layer`).
pub fn block_prefix(fam: Family, layer: usize) -> String {
    match fam {
        Family::Mixtral => format!("model.layers.{layer}.block_sparse_moe."),
        Family::Switch => format!("encoder.block.{layer}.layer.1.mlp."),
        _ => format!("model.layers.{layer}.mlp."),
    }
}

/// Loads the MoE block of layer `layer` from a model folder holding `config.json` and one
/// or more `*.safetensors` files (tensors of other layers are left alone).
pub fn load_block(dir: &std::path::Path, layer: usize) -> Result<(Family, LayerSpec, HostLayerWeights)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| Error::Io { path: cfg_path.display().to_string(), source: e })?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: cfg_path.display().to_string(),
        msg: "not valid JSON".into(),
        source: Some(Box::new(e)),
    })?;
    let (fam, spec) = layer_spec(&cfg)?;
    let mut ck = Checkpoint::load_dir(dir)?;
    let prefix = block_prefix(fam, layer);
    if !ck.names().any(|n| n.starts_with(&prefix)) {
        return Err(Error::MissingTensor(format!("{prefix}* (layer {layer} has no MoE block in {})", dir.display())));
    }
    let w = layer_weights(&mut ck, fam, &spec, &prefix)?;
    tracing::debug!(family = ?fam, layer, experts = spec.num_experts, "loaded HF MoE block");
    Ok((fam, spec, w))
}
