//! What each HF transformers family's `config.json` and modeling file say about its MoE
//! block: the [`LayerSpec`] (routing and experts, from the config keys the family's
//! router and experts read, with its config class's defaults where a key is absent), the
//! tensors' layout, and which decoder layers hold the block. Each entry names the
//! transformers 5.23 module it follows.

use super::layout::{BlockLayout, ExpertLayout, SharedLayout};
use super::Family;
use crate::config::{
    DeepSeekV2Method, ExpertSpec, GateSpec, LayerSpec, RouterNorm, RouterScore, RouterSpec, SharedCombine, SharedSpec,
};
use crate::error::{Error, Result};
use crate::expert::{Activation, ExpertKind, GluClamp};

use crate::import::{field, field_any, field_opt, field_or};
use serde_json::Value;

/// What a decoder layer's feed-forward is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// A dense MLP (no router).
    Dense,
    /// The family's MoE block.
    Moe,
    /// An MoE block the engine does not run, and why (DeepSeek-V4's hash-routed layers
    /// choose experts from a token-id table, not from hidden states).
    Unsupported(String),
}

fn activation(cfg: &Value, key: &str, default: &str) -> Result<Activation> {
    let a: String = field_or(cfg, key, default.to_string())?;
    a.parse().map_err(|_| Error::config(key, format!("unsupported activation `{a}`")))
}

fn glu(ffn: usize, act: Activation) -> ExpertSpec {
    ExpertSpec { kind: ExpertKind::Glu { activation: act, clamp: None }, ffn, bias: false }
}

/// A router with every option off but those given.
fn router(k: usize, score: RouterScore, normalize: RouterNorm, scale: f32) -> RouterSpec {
    RouterSpec {
        k,
        score,
        groups: None,
        selection_bias: false,
        normalize,
        scale,
        sparse_mixer: None,
        logit_bias: false,
        scale_input: false,
        identity_experts: 0,
    }
}

fn shared(ffn: usize, act: Activation, gated: bool) -> Option<SharedSpec> {
    (ffn > 0).then(|| SharedSpec { expert: glu(ffn, act), gated, combine: SharedCombine::Add })
}

fn spec(hidden: usize, num_experts: usize, gate: GateSpec, expert: ExpertSpec) -> LayerSpec {
    LayerSpec { hidden, num_experts, gate, expert, residual: false, shared: None, output_bias: false }
}

/// `norm_topk_prob` with the family's default; the routers test it for truth, so null is
/// false where the config class allows `None`.
fn norm_topk(cfg: &Value, default: bool) -> Result<bool> {
    match cfg.get("norm_topk_prob") {
        None => Ok(default),
        Some(_) => Ok(field_opt(cfg, "norm_topk_prob")?.unwrap_or(false)),
    }
}

/// The DeepSeek-V3 router (DeepSeek-V3, GLM-4.5, dots.llm1, DeepSeek-V3.2, EXAONE-MoE):
/// sigmoid scores, choice on score + correction bias in the `topk_group` best groups
/// (sum of each group's top 2), weights the chosen scores renormalised iff
/// `norm_topk_prob` (+1e-20), times `routed_scaling_factor`.
fn deepseek_v3_like(cfg: &Value, fam: Family) -> Result<LayerSpec> {
    // Defaults of each config class (transformers 5.23).
    let (k_default, group_default, scale_default, norm_default) = match fam {
        Family::DeepseekV3 | Family::DeepseekV32 => (Some(8), Some((8, 4)), 2.5, true),
        Family::Glm4Moe => (Some(8), Some((1, 1)), 1.0, true),
        Family::Dots1 => (Some(6), Some((1, 1)), 1.0, false),
        _ => (Some(8), Some((1, 1)), 2.5, true),
    };
    let k: usize = match k_default {
        Some(d) => field_or(cfg, "num_experts_per_tok", d)?,
        None => field(cfg, "num_experts_per_tok")?,
    };
    let group = |key: &str, default: Option<usize>| -> Result<usize> {
        let v = match cfg.get(key) {
            None => default,
            Some(_) => field_opt(cfg, key)?,
        };
        v.ok_or_else(|| Error::config(key, "is null or missing: the grouped router needs a group count"))
    };
    let (n_group, topk_group) =
        (group("n_group", group_default.map(|g| g.0))?, group("topk_group", group_default.map(|g| g.1))?);
    let scale: f32 = field_or(cfg, "routed_scaling_factor", scale_default)?;
    let normalize = norm_topk(cfg, norm_default)?;
    let act = activation(cfg, "hidden_act", "silu")?;
    let ffn: usize = field(cfg, "moe_intermediate_size")?;
    let (experts_key, shared_key): (&[&str], &str) = match fam {
        Family::ExaoneMoe => (&["num_experts", "n_routed_experts"], "num_shared_experts"),
        _ => (&["n_routed_experts", "num_local_experts"], "n_shared_experts"),
    };
    let n_shared: usize = match fam {
        // Dots1's default is None, which its block multiplies: a config must give it.
        Family::Dots1 => field(cfg, shared_key)?,
        _ => field_or(cfg, shared_key, 1)?,
    };
    let mut s = spec(
        field(cfg, "hidden_size")?,
        field_any(cfg, experts_key)?,
        GateSpec::DeepSeekV3 { k, n_group, topk_group, normalize, routed_scaling_factor: scale },
        glu(ffn, act),
    );
    s.shared = shared(ffn * n_shared, act, false);
    Ok(s)
}

/// The DeepSeek-V2 router (`modeling_deepseek_v2.py`).
fn deepseek_v2(cfg: &Value) -> Result<LayerSpec> {
    let act = activation(cfg, "hidden_act", "silu")?;
    let ffn: usize = field(cfg, "moe_intermediate_size")?;
    let n_shared: usize = field_or(cfg, "n_shared_experts", 2)?;
    let k: usize = field(cfg, "num_experts_per_tok")?;
    let n_group: Option<usize> = field_opt(cfg, "n_group")?;
    let topk_group: Option<usize> = field_opt(cfg, "topk_group")?;
    let scale: f32 = field_or(cfg, "routed_scaling_factor", 1.0)?;
    // Shared experts take `mlp_bias` (V2); routed experts never have biases.
    let shared_bias: bool = field_or(cfg, "mlp_bias", false)?;
    let needed = |v: Option<usize>, key: &str| {
        v.ok_or_else(|| Error::config(key, "is null or missing: the grouped router needs a group count"))
    };
    let method: String = field_or(cfg, "topk_method", "greedy".to_string())?;
    let method = match method.as_str() {
        "greedy" => DeepSeekV2Method::Greedy,
        "group_limited_greedy" => DeepSeekV2Method::GroupLimitedGreedy,
        other => {
            return Err(Error::config("topk_method", format!("`{other}` is not one of greedy, group_limited_greedy")))
        }
    };
    // transformers 5.23's DeepseekV2 router never reads `norm_topk_prob`: the weights are
    // the top-k softmax scores times the route scale. Its type (`bool | None`) is still
    // checked, as transformers' strict config does.
    let _: Option<bool> = field_opt(cfg, "norm_topk_prob")?;
    // Greedy routing never reads the groups (transformers' default is None).
    let (n_group, topk_group) = match method {
        DeepSeekV2Method::Greedy => (n_group.unwrap_or(1), topk_group.unwrap_or(1)),
        DeepSeekV2Method::GroupLimitedGreedy => (needed(n_group, "n_group")?, needed(topk_group, "topk_group")?),
    };
    let mut s = spec(
        field(cfg, "hidden_size")?,
        field(cfg, "n_routed_experts")?,
        GateSpec::DeepSeekV2 { k, n_group, topk_group, method, normalize: false, routed_scaling_factor: scale },
        glu(ffn, act),
    );
    s.shared = (n_shared > 0).then(|| SharedSpec {
        expert: ExpertSpec { bias: shared_bias, ..glu(ffn * n_shared, act) },
        gated: false,
        combine: SharedCombine::Add,
    });
    Ok(s)
}

/// The block's layer spec for family `fam` from its (text) config.
pub(crate) fn layer_spec(fam: Family, cfg: &Value) -> Result<LayerSpec> {
    let hidden = || field::<usize>(cfg, "hidden_size");
    let act = || activation(cfg, "hidden_act", "silu");
    let k = || field::<usize>(cfg, "num_experts_per_tok");
    let softmax_top_k = |normalize: bool| -> Result<GateSpec> { Ok(GateSpec::SoftmaxTopK { k: k()?, normalize }) };
    Ok(match fam {
        // modeling_mixtral.py, modeling_minimax.py: softmax, top-k, always renormalised.
        Family::Mixtral | Family::MiniMax => spec(
            hidden()?,
            field_any(cfg, &["num_local_experts", "num_experts"])?,
            softmax_top_k(true)?,
            glu(field(cfg, "intermediate_size")?, act()?),
        ),
        // Qwen2/3-MoE, Qwen3-Next, Qwen3.5-MoE, OLMoE, FlexOlmo: softmax, top-k,
        // renormalised iff norm_topk_prob (Qwen3.5-MoE always); Qwen2-MoE, Qwen3-Next and
        // Qwen3.5-MoE add a sigmoid-gated shared expert.
        Family::Qwen2Moe
        | Family::Qwen3Moe
        | Family::Qwen3Next
        | Family::Qwen3_5Moe
        | Family::Olmoe
        | Family::FlexOlmo => {
            let a = act()?;
            let ffn_key = if matches!(fam, Family::Olmoe | Family::FlexOlmo) {
                "intermediate_size"
            } else {
                "moe_intermediate_size"
            };
            let normalize = match fam {
                Family::Qwen3_5Moe => true,
                Family::Qwen3Next => field_or(cfg, "norm_topk_prob", true)?,
                _ => field_or(cfg, "norm_topk_prob", false)?,
            };
            let mut s = spec(
                hidden()?,
                field_any(cfg, &["num_experts", "num_local_experts"])?,
                softmax_top_k(normalize)?,
                glu(field(cfg, ffn_key)?, a),
            );
            let shared_default = match fam {
                Family::Qwen2Moe => Some(5632),
                Family::Qwen3Next | Family::Qwen3_5Moe => Some(512),
                _ => None,
            };
            if let Some(d) = shared_default {
                // transformers builds the shared expert whether the key is there or not.
                s.shared = shared(field_or(cfg, "shared_expert_intermediate_size", d)?, a, true);
            }
            s
        }
        // modeling_jamba.py: softmax, top-k, never renormalised.
        Family::Jamba => spec(
            hidden()?,
            field_any(cfg, &["num_experts", "num_local_experts"])?,
            softmax_top_k(false)?,
            glu(field(cfg, "intermediate_size")?, act()?),
        ),
        // modeling_hunyuan_v1_moe.py: softmax in f32, top-k (`moe_topk`), renormalised;
        // an ungated shared MLP of `intermediate_size`.
        Family::HunyuanV1Moe => {
            let a = act()?;
            let ffn: usize = field(cfg, "intermediate_size")?;
            let mut s = spec(
                hidden()?,
                field_any(cfg, &["num_experts", "num_local_experts"])?,
                GateSpec::SoftmaxTopK { k: field_any(cfg, &["moe_topk", "num_experts_per_tok"])?, normalize: true },
                glu(ffn, a),
            );
            s.shared = shared(ffn, a, false);
            s
        }
        Family::DeepseekV2 => deepseek_v2(cfg)?,
        Family::DeepseekV3 | Family::Glm4Moe | Family::Dots1 | Family::DeepseekV32 | Family::ExaoneMoe => {
            deepseek_v3_like(cfg, fam)?
        }
        // modeling_minimax_m2.py: sigmoid, choice on sigmoid + the block's correction
        // bias, the chosen scores renormalised (no epsilon).
        Family::MiniMaxM2 => spec(
            hidden()?,
            field_any(cfg, &["num_local_experts", "num_experts"])?,
            GateSpec::Router(RouterSpec {
                selection_bias: true,
                ..router(k()?, RouterScore::Sigmoid, RouterNorm::Sum, 1.0)
            }),
            glu(field(cfg, "intermediate_size")?, act()?),
        ),
        // modeling_lfm2_moe.py: sigmoid, choice on sigmoid + expert_bias when
        // use_expert_bias, renormalised iff norm_topk_prob (+1e-6), × routed_scaling_factor.
        Family::Lfm2Moe => {
            let normalize =
                if field_or(cfg, "norm_topk_prob", true)? { RouterNorm::SumPlus(1e-6) } else { RouterNorm::None };
            let r = RouterSpec {
                selection_bias: field_or(cfg, "use_expert_bias", true)?,
                ..router(k()?, RouterScore::Sigmoid, normalize, field_or(cfg, "routed_scaling_factor", 1.0)?)
            };
            // LFM2's experts use SiLU whatever the config says.
            spec(
                hidden()?,
                field(cfg, "num_experts")?,
                GateSpec::Router(r),
                glu(field(cfg, "moe_intermediate_size")?, Activation::Silu),
            )
        }
        // modeling_afmoe.py: sigmoid in f32, choice on sigmoid + expert_bias, always
        // renormalised (+1e-20), × route_scale; shared experts ungated.
        Family::Afmoe => {
            let a = act()?;
            let ffn: usize = field(cfg, "moe_intermediate_size")?;
            let r = RouterSpec {
                selection_bias: true,
                ..router(k()?, RouterScore::Sigmoid, RouterNorm::SumPlus(1e-20), field_or(cfg, "route_scale", 1.0)?)
            };
            let mut s = spec(hidden()?, field(cfg, "num_experts")?, GateSpec::Router(r), glu(ffn, a));
            s.shared = shared(ffn * field_or::<usize>(cfg, "num_shared_experts", 2)?, a, false);
            s
        }
        // modeling_ernie4_5_moe.py: softmax in f32, choice on softmax + moe_statics'
        // correction bias, the chosen probabilities / max(sum, moe_norm_min); shared
        // experts with `use_bias`.
        Family::Ernie4_5Moe => {
            let a = act()?;
            let ffn: usize = field(cfg, "moe_intermediate_size")?;
            let floor: f32 = field_or(cfg, "moe_norm_min", 1e-12)?;
            let r = RouterSpec {
                selection_bias: true,
                ..router(
                    field_any(cfg, &["moe_k", "num_experts_per_tok"])?,
                    RouterScore::Softmax,
                    RouterNorm::SumFloor(floor),
                    1.0,
                )
            };
            let mut s =
                spec(hidden()?, field_any(cfg, &["moe_num_experts", "num_experts"])?, GateSpec::Router(r), glu(ffn, a));
            let n_shared: usize = field_or(cfg, "moe_num_shared_experts", 2)?;
            let bias: bool = field_or(cfg, "use_bias", false)?;
            s.shared = shared(ffn * n_shared, a, false).map(|mut sh| {
                sh.expert.bias = bias;
                sh
            });
            s
        }
        // modeling_longcat_flash.py: softmax in f32 over the routed and zero-compute
        // experts, choice on softmax + correction bias, the chosen probabilities
        // (never renormalised) × routed_scaling_factor; a zero expert returns its input.
        Family::LongcatFlash => {
            let r = RouterSpec {
                selection_bias: true,
                identity_experts: field_opt(cfg, "zero_expert_num")?.unwrap_or(0),
                ..router(
                    field_any(cfg, &["moe_topk", "num_experts_per_tok"])?,
                    RouterScore::Softmax,
                    RouterNorm::None,
                    field_or(cfg, "routed_scaling_factor", 6.0)?,
                )
            };
            spec(
                hidden()?,
                field_any(cfg, &["n_routed_experts", "num_local_experts"])?,
                GateSpec::Router(r),
                glu(field_any(cfg, &["expert_ffn_hidden_size", "moe_intermediate_size"])?, act()?),
            )
        }
        // modeling_gpt_oss.py: logits = x Wᵀ + b, top-k of the logits, softmax over the k
        // (= softmax, top-k, renormalised); experts with biases and the clamped
        // `(up + 1) · gate · σ(α · gate)`.
        Family::GptOss => {
            let r = RouterSpec { logit_bias: true, ..router(k()?, RouterScore::Softmax, RouterNorm::Sum, 1.0) };
            let clamp = GluClamp::gpt_oss(field_or(cfg, "swiglu_limit", 7.0)?, field_or(cfg, "swiglu_alpha", 1.702)?);
            let expert = ExpertSpec {
                kind: ExpertKind::Glu { activation: Activation::Silu, clamp: Some(clamp) },
                ffn: field(cfg, "intermediate_size")?,
                bias: true,
            };
            spec(hidden()?, field_any(cfg, &["num_local_experts", "num_experts"])?, GateSpec::Router(r), expert)
        }
        // modeling_llama4.py: top-k of the logits, sigmoid of the chosen (= sigmoid,
        // top-k), the expert input scaled by it, the outputs summed; an ungated shared
        // expert of `intermediate_size`.
        Family::Llama4 => {
            let a = act()?;
            let ffn: usize = field(cfg, "intermediate_size")?;
            let r = RouterSpec { scale_input: true, ..router(k()?, RouterScore::Sigmoid, RouterNorm::None, 1.0) };
            let mut s = spec(hidden()?, field(cfg, "num_local_experts")?, GateSpec::Router(r), glu(ffn, a));
            s.shared = shared(ffn, a, false);
            s
        }
        // modeling_granitemoe.py, modeling_granitemoeshared.py, modeling_jetmoe.py: top-k
        // of the logits, softmax over the k (= softmax, top-k, renormalised); Granite's
        // shared MLP beside the block, JetMoE's output bias.
        Family::GraniteMoe | Family::GraniteMoeShared | Family::JetMoe => {
            let a = if fam == Family::JetMoe { activation(cfg, "activation_function", "silu")? } else { act()? };
            let mut s = spec(
                hidden()?,
                field_any(cfg, &["num_local_experts", "num_experts"])?,
                softmax_top_k(true)?,
                glu(field(cfg, "intermediate_size")?, a),
            );
            if fam == Family::GraniteMoeShared {
                s.shared = shared(field_or(cfg, "shared_intermediate_size", 0)?, a, false);
            }
            s.output_bias = fam == Family::JetMoe;
            s
        }
        // modeling_dbrx.py: softmax, top-k, divided by the p-norm (p =
        // moe_normalize_expert_weights; None: not normalised).
        Family::Dbrx => {
            let ffn_cfg = cfg.get("ffn_config").ok_or_else(|| Error::config("ffn_config", "missing"))?;
            let p: Option<f32> = match ffn_cfg.get("moe_normalize_expert_weights") {
                None => Some(1.0),
                Some(_) => field_opt(ffn_cfg, "moe_normalize_expert_weights")?,
            };
            let act_name =
                ffn_cfg.get("ffn_act_fn").and_then(|a| a.get("name")).and_then(Value::as_str).unwrap_or("silu");
            let act: Activation = act_name.parse().map_err(|_| {
                Error::config("ffn_config.ffn_act_fn.name", format!("unsupported activation `{act_name}`"))
            })?;
            let normalize = p.map_or(RouterNorm::None, RouterNorm::PNorm);
            let r = router(field_or(ffn_cfg, "moe_top_k", 1)?, RouterScore::Softmax, normalize, 1.0);
            spec(
                field_any(cfg, &["d_model", "hidden_size"])?,
                field_or(ffn_cfg, "moe_num_experts", 4)?,
                GateSpec::Router(r),
                glu(field_or(ffn_cfg, "ffn_hidden_size", 3584)?, act),
            )
        }
        // modeling_phimoe.py: sparsemixer (eval) with router_jitter_noise, two experts.
        Family::PhiMoe => {
            let r = RouterSpec {
                sparse_mixer: Some(field_or(cfg, "router_jitter_noise", 0.01)?),
                ..router(field_or(cfg, "num_experts_per_tok", 2)?, RouterScore::Softmax, RouterNorm::None, 1.0)
            };
            spec(
                hidden()?,
                field(cfg, "num_local_experts")?,
                GateSpec::Router(r),
                glu(field(cfg, "intermediate_size")?, act()?),
            )
        }
        // modeling_deepseek_v4.py: scoring_func scores, choice on score + correction
        // bias, renormalised (+1e-20) × routed_scaling_factor; SwiGLU clamped at
        // swiglu_limit in the routed and the shared expert.
        Family::DeepseekV4 => {
            let score = match field_or(cfg, "scoring_func", "sqrtsoftplus".to_string())?.as_str() {
                "sqrtsoftplus" => RouterScore::SqrtSoftplus,
                "sigmoid" => RouterScore::Sigmoid,
                "softmax" => RouterScore::Softmax,
                other => {
                    return Err(Error::config("scoring_func", format!("`{other}` (sqrtsoftplus, sigmoid, softmax)")))
                }
            };
            let r = RouterSpec {
                selection_bias: true,
                ..router(k()?, score, RouterNorm::SumPlus(1e-20), field_or(cfg, "routed_scaling_factor", 1.5)?)
            };
            let ffn: usize = field_any(cfg, &["moe_intermediate_size", "intermediate_size"])?;
            let clamp =
                field_opt::<f32>(cfg, "swiglu_limit")?.map(|limit| GluClamp { limit, alpha: 1.0, up_offset: 0.0 });
            let expert = ExpertSpec { kind: ExpertKind::Glu { activation: act()?, clamp }, ffn, bias: false };
            let mut s = spec(
                hidden()?,
                field_any(cfg, &["n_routed_experts", "num_local_experts"])?,
                GateSpec::Router(r),
                expert,
            );
            // One shared MLP of the expert's width (DeepseekV4MLP reads intermediate_size,
            // an alias of moe_intermediate_size), clamped alike, biased by mlp_bias.
            s.shared = Some(SharedSpec {
                expert: ExpertSpec { bias: field_or(cfg, "mlp_bias", false)?, ..expert },
                gated: false,
                combine: SharedCombine::Add,
            });
            s
        }
        // modeling_cohere2_moe.py: top-k of the logits; softmax over the k, or their
        // sigmoid renormalised iff norm_topk_prob; shared experts summed or averaged in.
        Family::Cohere2Moe => {
            let a = act()?;
            let ffn: usize = field(cfg, "intermediate_size")?;
            let r = match field_or(cfg, "expert_selection_fn", "softmax".to_string())?.as_str() {
                "softmax" => router(k()?, RouterScore::Softmax, RouterNorm::Sum, 1.0),
                "sigmoid" => {
                    let n = if field_or(cfg, "norm_topk_prob", true)? { RouterNorm::Sum } else { RouterNorm::None };
                    router(k()?, RouterScore::Sigmoid, n, 1.0)
                }
                other => return Err(Error::config("expert_selection_fn", format!("`{other}` (softmax, sigmoid)"))),
            };
            let combine = match field_or(cfg, "shared_expert_combination_strategy", "average".to_string())?.as_str() {
                "sum" => SharedCombine::Add,
                "average" => SharedCombine::Average,
                other => {
                    return Err(Error::config(
                        "shared_expert_combination_strategy",
                        format!("`{other}` (sum, average)"),
                    ))
                }
            };
            let mut s = spec(hidden()?, field(cfg, "num_experts")?, GateSpec::Router(r), glu(ffn, a));
            s.shared = shared(ffn * field_or::<usize>(cfg, "num_shared_experts", 0)?, a, false).map(|mut sh| {
                sh.combine = combine;
                sh
            });
            s
        }
        Family::Switch => {
            let s = LayerSpec {
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
            };
            if field_or(cfg, "router_bias", false)? {
                return Err(Error::config("router_bias", "a biased Switch router is not supported"));
            }
            let dt: String = field_or(cfg, "router_dtype", "float32".to_string())?;
            if dt != "float32" {
                return Err(Error::config("router_dtype", format!("`{dt}`: the engine routes in float32 only")));
            }
            s
        }
    })
}

const HUB: (&str, &str, &str) = ("gate_proj", "up_proj", "down_proj");
const MIXTRAL: (&str, &str, &str) = ("w1", "w3", "w2");

/// Where family `fam` keeps its block inside a decoder layer (the path after
/// `layers.{L}.`), and the block's tensors.
pub(crate) fn layout(fam: Family, cfg: &Value) -> Result<(&'static str, BlockLayout)> {
    let per_expert = |names| ExpertLayout::PerExpert { names };
    let base = |router: &'static str, experts: ExpertLayout| BlockLayout {
        router,
        router_bias: None,
        ignored: None,
        selection_bias: None,
        experts,
        shared: None,
        output_bias: None,
    };
    let shared_hub = |dir: &'static str, gate: Option<&'static str>| {
        Some(SharedLayout { dir, outside: false, names: Some(HUB), gate })
    };
    Ok(match fam {
        Family::Mixtral | Family::MiniMax | Family::PhiMoe => {
            ("block_sparse_moe.", base("gate.weight", per_expert(MIXTRAL)))
        }
        Family::MiniMaxM2 => (
            "block_sparse_moe.",
            BlockLayout { selection_bias: Some("e_score_correction_bias"), ..base("gate.weight", per_expert(MIXTRAL)) },
        ),
        Family::Qwen2Moe | Family::Qwen3Next | Family::Qwen3_5Moe => (
            "mlp.",
            BlockLayout {
                shared: shared_hub("shared_expert.", Some("shared_expert_gate.weight")),
                ..base("gate.weight", per_expert(HUB))
            },
        ),
        Family::Qwen3Moe | Family::Olmoe | Family::FlexOlmo => ("mlp.", base("gate.weight", per_expert(HUB))),
        Family::Jamba => ("feed_forward.", base("router.weight", per_expert(HUB))),
        Family::HunyuanV1Moe => {
            ("mlp.", BlockLayout { shared: shared_hub("shared_mlp.", None), ..base("gate.wg.weight", per_expert(HUB)) })
        }
        Family::DeepseekV2 => (
            "mlp.",
            BlockLayout { shared: shared_hub("shared_experts.", None), ..base("gate.weight", per_expert(HUB)) },
        ),
        Family::DeepseekV3 | Family::Glm4Moe | Family::Dots1 | Family::DeepseekV32 => (
            "mlp.",
            BlockLayout {
                selection_bias: Some("gate.e_score_correction_bias"),
                shared: shared_hub("shared_experts.", None),
                ..base("gate.weight", per_expert(HUB))
            },
        ),
        Family::ExaoneMoe => (
            "mlp.",
            BlockLayout {
                selection_bias: Some("e_score_correction_bias"),
                shared: shared_hub("shared_experts.", None),
                ..base("gate.weight", per_expert(HUB))
            },
        ),
        Family::Ernie4_5Moe => (
            "mlp.",
            BlockLayout {
                selection_bias: Some("moe_statics.e_score_correction_bias"),
                shared: shared_hub("shared_experts.", None),
                ..base("gate.weight", per_expert(HUB))
            },
        ),
        Family::Lfm2Moe => {
            let bias = field_or(cfg, "use_expert_bias", true)?;
            (
                "feed_forward.",
                BlockLayout {
                    selection_bias: bias.then_some("expert_bias"),
                    ..base("gate.weight", per_expert(MIXTRAL))
                },
            )
        }
        Family::Afmoe => (
            "mlp.",
            BlockLayout {
                selection_bias: Some("expert_bias"),
                shared: shared_hub("shared_experts.", None),
                ..base("router.gate.weight", per_expert(HUB))
            },
        ),
        Family::LongcatFlash => {
            let biased = field_or(cfg, "router_bias", false)?;
            (
                "mlp.",
                BlockLayout {
                    selection_bias: Some("router.e_score_correction_bias"),
                    ignored: biased.then_some("router.classifier.bias"),
                    ..base("router.classifier.weight", per_expert(HUB))
                },
            )
        }
        Family::GptOss => (
            "mlp.",
            BlockLayout {
                router_bias: Some("router.bias"),
                ..base("router.weight", ExpertLayout::FusedColumns { interleaved: true, bias: true })
            },
        ),
        Family::Llama4 => (
            "feed_forward.",
            BlockLayout {
                shared: shared_hub("shared_expert.", None),
                ..base("router.weight", ExpertLayout::FusedColumns { interleaved: false, bias: false })
            },
        ),
        Family::GraniteMoe | Family::GraniteMoeShared => (
            "block_sparse_moe.",
            BlockLayout {
                shared: (fam == Family::GraniteMoeShared).then_some(SharedLayout {
                    dir: "shared_mlp.",
                    outside: true,
                    names: None,
                    gate: None,
                }),
                ..base(
                    "router.layer.weight",
                    ExpertLayout::FusedRows { input: "input_linear.weight", output: "output_linear.weight" },
                )
            },
        ),
        Family::JetMoe => (
            "mlp.",
            BlockLayout {
                output_bias: Some("bias"),
                ..base(
                    "router.layer.weight",
                    ExpertLayout::FusedRows { input: "input_linear.weight", output: "output_linear.weight" },
                )
            },
        ),
        Family::Dbrx => ("ffn.", base("router.layer.weight", ExpertLayout::Dbrx)),
        Family::DeepseekV4 => (
            "ffn.",
            BlockLayout {
                selection_bias: Some("gate.bias"),
                shared: Some(SharedLayout { dir: "shared_experts.", outside: false, names: Some(MIXTRAL), gate: None }),
                ..base("gate.weight", per_expert(MIXTRAL))
            },
        ),
        Family::Cohere2Moe => (
            "mlp.",
            BlockLayout { shared: shared_hub("shared_experts.", None), ..base("gate.weight", per_expert(HUB)) },
        ),
        Family::Switch => {
            return Err(Error::Internal("Switch Transformers blocks are read by their own importer".into()))
        }
    })
}

/// Decoder layers in the (text) config.
pub(crate) fn num_layers(fam: Family, cfg: &Value) -> Result<usize> {
    match fam {
        Family::Dbrx => field_any(cfg, &["n_layers", "num_hidden_layers"]),
        Family::LongcatFlash => field_any(cfg, &["num_layers", "num_hidden_layers"]),
        Family::Switch => field(cfg, "num_layers"),
        _ => field(cfg, "num_hidden_layers"),
    }
}

/// Which feed-forward each decoder layer has, as the family's decoder layer decides.
pub(crate) fn layer_kinds(fam: Family, cfg: &Value) -> Result<Vec<LayerKind>> {
    let n = num_layers(fam, cfg)?;
    let kind = |moe: bool| if moe { LayerKind::Moe } else { LayerKind::Dense };
    let from_types = |key: &str, sparse: &str| -> Result<Vec<LayerKind>> {
        let types: Vec<String> = field(cfg, key)?;
        if types.len() != n {
            return Err(Error::config(key, format!("{} entries for {n} layers", types.len())));
        }
        Ok(types
            .iter()
            .map(|t| match t.as_str() {
                t if t == sparse => LayerKind::Moe,
                "hash_moe" => LayerKind::Unsupported(
                    "a hash-routed MoE layer: its experts come from a token-id table (tid2eid), not from hidden states"
                        .into(),
                ),
                _ => LayerKind::Dense,
            })
            .collect())
    };
    Ok(match fam {
        // (layer ∉ mlp_only_layers) ∧ num_experts > 0 ∧ (layer + 1) % decoder_sparse_step == 0.
        Family::Qwen2Moe | Family::Qwen3Moe | Family::Qwen3Next => {
            let only: Vec<usize> = field_or(cfg, "mlp_only_layers", Vec::new())?;
            let step: usize = field_or(cfg, "decoder_sparse_step", 1)?;
            if step == 0 {
                return Err(Error::config("decoder_sparse_step", "must be > 0"));
            }
            let e: usize = field_any(cfg, &["num_experts", "num_local_experts"])?;
            (0..n).map(|l| kind(!only.contains(&l) && e > 0 && (l + 1) % step == 0)).collect()
        }
        Family::DeepseekV2 | Family::DeepseekV3 | Family::Glm4Moe | Family::Dots1 => {
            let default = match fam {
                Family::DeepseekV3 => 3,
                Family::Glm4Moe => 1,
                _ => 0,
            };
            let first: usize = field_or(cfg, "first_k_dense_replace", default)?;
            (0..n).map(|l| kind(l >= first)).collect()
        }
        Family::DeepseekV32 | Family::ExaoneMoe | Family::Cohere2Moe => from_types("mlp_layer_types", "sparse")?,
        Family::DeepseekV4 => from_types("mlp_layer_types", "moe")?,
        Family::Llama4 => {
            let layers: Vec<usize> = match field_opt::<Vec<usize>>(cfg, "moe_layers")? {
                Some(v) => v,
                None => {
                    let step: usize = field_or(cfg, "interleave_moe_layer_step", 1)?;
                    if step == 0 {
                        return Err(Error::config("interleave_moe_layer_step", "must be > 0"));
                    }
                    (step - 1..n).step_by(step).collect()
                }
            };
            (0..n).map(|l| kind(layers.contains(&l))).collect()
        }
        // ((layer + 1) % moe_layer_interval == 0) ∧ start ≤ layer ≤ end.
        Family::Ernie4_5Moe => {
            let interval: usize = field_or(cfg, "moe_layer_interval", 1)?;
            if interval == 0 {
                return Err(Error::config("moe_layer_interval", "must be > 0"));
            }
            let start: i64 = field_or(cfg, "moe_layer_start_index", 1)?;
            let end: i64 = field_or(cfg, "moe_layer_end_index", 27)?;
            (0..n).map(|l| kind((l + 1) % interval == 0 && l as i64 >= start && l as i64 <= end)).collect()
        }
        // layers_num_experts: an MoE block where layer % period == offset.
        Family::Jamba => {
            let period: usize = field_or(cfg, "expert_layer_period", 2)?;
            let offset: usize = field_or(cfg, "expert_layer_offset", 1)?;
            if period == 0 || offset >= period {
                return Err(Error::config(
                    "expert_layer_offset",
                    format!("{offset} must be below the period {period}"),
                ));
            }
            (0..n).map(|l| kind(l % period == offset)).collect()
        }
        Family::Lfm2Moe | Family::Afmoe => {
            let dense: usize = field_or(cfg, "num_dense_layers", if fam == Family::Lfm2Moe { 2 } else { 1 })?;
            (0..n).map(|l| kind(l >= dense)).collect()
        }
        // SwitchTransformersStack: sparse where i % step == 1 (every layer for step 1).
        Family::Switch => {
            let step: usize = field_or(cfg, "encoder_sparse_step", 1)?;
            (0..n).map(|l| kind(step > 0 && (step == 1 || l % step == 1))).collect()
        }
        _ => vec![LayerKind::Moe; n],
    })
}
