//! HF transformers MoE blocks: every MoE family transformers 5.23 ships (and Switch
//! Transformers), read from `config.json` and the safetensors a model folder holds, in the
//! family's own tensor names and layout (per-expert hub names, fused stacks, DBRX's flat
//! matrices, gpt-oss's interleaved columns).
//!
//! [`families`] holds what each family's config and modeling file say; [`layout`] turns
//! its tensors into the engine's weights; [`HfModel`] is a model folder: which layers are
//! MoE, where the text config is, and each layer's block.

mod families;
mod layout;
mod model;

pub use families::LayerKind;
pub use model::{layer_ranges, HfModel};

use super::checkpoint::{stack, Checkpoint};
use crate::config::LayerSpec;
use crate::error::{Error, Result};
use crate::tensor::HostTensor;
use crate::weights::{HostLayerWeights, HostMlp};
use serde_json::Value;

macro_rules! families {
    ($($(#[$m:meta])* $name:ident = $mt:literal, $title:literal;)*) => {
        /// The model families whose MoE block the engine reads.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Family {
            $($(#[$m])* $name,)*
        }

        impl Family {
            /// Every family, in the order the docs list them.
            pub const ALL: &'static [Family] = &[$(Family::$name),*];

            /// The `model_type` of the family's `config.json` (its text model's, for the
            /// multimodal ones).
            pub fn model_type(self) -> &'static str {
                match self { $(Family::$name => $mt,)* }
            }

            /// The family's name as its model cards write it.
            pub fn title(self) -> &'static str {
                match self { $(Family::$name => $title,)* }
            }
        }
    };
}

families! {
    /// Mixtral.
    Mixtral = "mixtral", "Mixtral";
    /// Qwen2-MoE.
    Qwen2Moe = "qwen2_moe", "Qwen2-MoE";
    /// Qwen3-MoE.
    Qwen3Moe = "qwen3_moe", "Qwen3-MoE";
    /// OLMoE.
    Olmoe = "olmoe", "OLMoE";
    /// DeepSeek-V2.
    DeepseekV2 = "deepseek_v2", "DeepSeek-V2";
    /// DeepSeek-V3.
    DeepseekV3 = "deepseek_v3", "DeepSeek-V3";
    /// GLM-4.5 / GLM-4-MoE.
    Glm4Moe = "glm4_moe", "GLM-4.5 (glm4_moe)";
    /// Qwen3-Next.
    Qwen3Next = "qwen3_next", "Qwen3-Next";
    /// Qwen3.5-MoE (its text model).
    Qwen3_5Moe = "qwen3_5_moe", "Qwen3.5-MoE";
    /// gpt-oss.
    GptOss = "gpt_oss", "gpt-oss";
    /// Llama 4 (its text model).
    Llama4 = "llama4", "Llama 4";
    /// MiniMax-01.
    MiniMax = "minimax", "MiniMax-01";
    /// MiniMax-M2.
    MiniMaxM2 = "minimax_m2", "MiniMax-M2";
    /// dots.llm1.
    Dots1 = "dots1", "dots.llm1";
    /// ERNIE 4.5 MoE.
    Ernie4_5Moe = "ernie4_5_moe", "ERNIE 4.5 MoE";
    /// Hunyuan-A13B (HunYuan MoE v1).
    HunyuanV1Moe = "hunyuan_v1_moe", "Hunyuan MoE";
    /// Granite-MoE.
    GraniteMoe = "granitemoe", "Granite-MoE";
    /// Granite-MoE with a shared MLP.
    GraniteMoeShared = "granitemoeshared", "Granite-MoE shared";
    /// Jamba.
    Jamba = "jamba", "Jamba";
    /// DBRX.
    Dbrx = "dbrx", "DBRX";
    /// Phi-3.5-MoE (PhiMoE).
    PhiMoe = "phimoe", "PhiMoE";
    /// DeepSeek-V3.2.
    DeepseekV32 = "deepseek_v32", "DeepSeek-V3.2";
    /// DeepSeek-V4.
    DeepseekV4 = "deepseek_v4", "DeepSeek-V4";
    /// LongCat-Flash.
    LongcatFlash = "longcat_flash", "LongCat-Flash";
    /// FlexOlmo.
    FlexOlmo = "flex_olmo", "FlexOlmo";
    /// LFM2-MoE.
    Lfm2Moe = "lfm2_moe", "LFM2-MoE";
    /// EXAONE-MoE.
    ExaoneMoe = "exaone_moe", "EXAONE-MoE";
    /// AFMoE (Arcee).
    Afmoe = "afmoe", "AFMoE";
    /// Cohere2-MoE.
    Cohere2Moe = "cohere2_moe", "Cohere2-MoE";
    /// JetMoE.
    JetMoe = "jetmoe", "JetMoE";
    /// Switch Transformers.
    Switch = "switch_transformers", "Switch Transformers";
}

impl Family {
    /// From a `model_type`; a text model's type (`llama4_text`, `qwen3_5_moe_text`) names
    /// its family.
    pub fn from_model_type(t: &str) -> Result<Self> {
        let base = t.strip_suffix("_text").unwrap_or(t);
        Family::ALL.iter().copied().find(|f| f.model_type() == base).ok_or_else(|| {
            let known: Vec<&str> = Family::ALL.iter().map(|f| f.model_type()).collect();
            Error::config("model_type", format!("`{t}` is not an MoE family the engine reads ({})", known.join(", ")))
        })
    }
}

/// The config a multimodal model keeps its text model's settings in (`text_config`), or
/// the config itself.
pub fn text_config(cfg: &Value) -> &Value {
    match cfg.get("text_config") {
        Some(t) if t.is_object() => t,
        _ => cfg,
    }
}

/// The family of a `config.json`: its text model's `model_type` (`llama4_text`), else its
/// own (`llama4`).
pub fn family(cfg: &Value) -> Result<Family> {
    let text = text_config(cfg);
    let mt: String = crate::import::field(if text.get("model_type").is_some() { text } else { cfg }, "model_type")?;
    Family::from_model_type(&mt)
}

/// Builds the MoE block's layer spec from a model `config.json` (the text config of a
/// multimodal one).
pub fn layer_spec(cfg: &Value) -> Result<(Family, LayerSpec)> {
    let fam = family(cfg)?;
    let spec = families::layer_spec(fam, text_config(cfg))?;
    spec.validate()?;
    Ok((fam, spec))
}

/// Reads the MoE block's weights, keys under `prefix` (e.g. `""`, or
/// `"model.layers.3.mlp."`), in the family's layout. Unused keys under the prefix are an
/// error. Granite-MoE-shared's `shared_mlp` sits beside the block: with a prefix it is
/// read from the decoder layer's (the prefix without the block's last path part).
pub fn layer_weights(ck: &mut Checkpoint, fam: Family, spec: &LayerSpec, prefix: &str) -> Result<HostLayerWeights> {
    layer_weights_in(ck, fam, &Value::Null, spec, prefix)
}

/// [`layer_weights`] with the (text) config, for the layouts that depend on it.
fn layer_weights_in(
    ck: &mut Checkpoint,
    fam: Family,
    cfg: &Value,
    spec: &LayerSpec,
    prefix: &str,
) -> Result<HostLayerWeights> {
    spec.validate()?;
    if fam == Family::Switch {
        return switch_weights(ck, spec, prefix);
    }
    let (block, layout) = families::layout(fam, cfg)?;
    let layer_prefix = prefix.strip_suffix(block).unwrap_or(prefix);
    layout::read_block(ck, &layout, spec, prefix, layer_prefix)
}

fn switch_weights(ck: &mut Checkpoint, spec: &LayerSpec, prefix: &str) -> Result<HostLayerWeights> {
    let (e, m, f) = (spec.num_experts, spec.hidden, spec.expert.ffn);
    let gate = ck.take_shaped(&format!("{prefix}router.classifier.weight"), &[e, m])?;
    let mut wi = Vec::new();
    let mut wo = Vec::new();
    for i in 0..e {
        let p = format!("{prefix}experts.expert_{i}.");
        wi.push(ck.take_shaped(&format!("{p}wi.weight"), &[f, m])?);
        wo.push(ck.take_shaped(&format!("{p}wo.weight"), &[m, f])?);
    }
    let experts = HostMlp { w_in: stack(wi, "wi")?, b_in: None, w_out: Some(stack(wo, "wo")?), b_out: None };
    ck.finish(prefix)?;
    let w = HostLayerWeights {
        gate,
        gate_bias: None,
        router_bias: None,
        output_bias: None,
        experts,
        residual: None,
        shared: None,
    };
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

/// Where a family keeps the MoE block of decoder layer `layer` in a text model's
/// checkpoint (Switch: the encoder's feed-forward of block `layer`). A multimodal
/// checkpoint nests it deeper: [`HfModel`] finds it by the router's name.
pub fn block_prefix(fam: Family, layer: usize) -> String {
    match fam {
        Family::Switch => format!("encoder.block.{layer}.layer.1.mlp."),
        Family::Dbrx => format!("transformer.blocks.{layer}.ffn."),
        _ => {
            let block = families::layout(fam, &Value::Null).map(|(b, _)| b).unwrap_or("mlp.");
            format!("model.layers.{layer}.{block}")
        }
    }
}

/// Loads the MoE block of layer `layer` from a model folder holding `config.json` and one
/// or more `*.safetensors` files (tensors of other layers are left alone).
pub fn load_block(dir: &std::path::Path, layer: usize) -> Result<(Family, LayerSpec, HostLayerWeights)> {
    let model = HfModel::open(dir)?;
    let (spec, w) = model.load_layer(layer)?;
    Ok((model.family(), spec, w))
}
