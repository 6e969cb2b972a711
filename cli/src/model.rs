//! `moe info --model DIR`: what a model folder's MoE layers are (family, which layers,
//! experts, routing, parameters, bytes on disk), read from `config.json` and the
//! safetensors headers only. Also the pieces `moe run --model` shares: opening a folder or
//! a hub repo id, and the layer ranges.

use crate::error::CliResult;
use crate::out;
use moe_engine::config::{ExpertSpec, GateSpec, LayerSpec};
use moe_engine::error::human_bytes;
use moe_engine::import::hf::{HfModel, LayerKind};
use moe_engine::import::hub;
use moe_engine::ExpertKind;
use std::collections::BTreeMap;
use std::process::ExitCode;

/// Opens `spec`: a model folder, or a repo id in the local HF hub cache.
pub fn open(spec: &str) -> CliResult<HfModel> {
    let dir = hub::resolve_model(spec)?;
    Ok(HfModel::open(&dir)?)
}

/// The layers of each kind, in words: `MoE: 3 layers (1-3); dense: layer 0`.
pub fn layer_summary(model: &HfModel) -> String {
    let mut moe = Vec::new();
    let mut dense = Vec::new();
    // Unsupported layers grouped by the reason, which is the same for a family's layers.
    let mut other: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (l, k) in model.layer_kinds().iter().enumerate() {
        match k {
            LayerKind::Moe => moe.push(l),
            LayerKind::Dense => dense.push(l),
            LayerKind::Unsupported(why) => other.entry(why.as_str()).or_default().push(l),
        }
    }
    let mut parts = vec![format!("MoE: {}", if moe.is_empty() { "none".into() } else { layers(&moe) })];
    if !dense.is_empty() {
        parts.push(format!("dense: {}", layers(&dense)));
    }
    for (why, ls) in other {
        parts.push(format!("not run by the engine: {} ({why})", layers(&ls)));
    }
    parts.join("; ")
}

/// `layer 3`, or `4 layers (0-2, 5)`.
fn layers(v: &[usize]) -> String {
    match v {
        [one] => format!("layer {one}"),
        _ => format!("{} layers ({})", v.len(), moe_engine::import::hf::layer_ranges(v)),
    }
}

/// `1 MoE layer`, `3 MoE layers`.
fn moe_layers(n: u64) -> String {
    format!("{n} MoE layer{}", if n == 1 { "" } else { "s" })
}

/// Parameter counts of one MoE block, from its spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// Router: the weight `[E (+ Z), H]`, its logit bias, the selection bias.
    pub router: u64,
    /// One routed expert.
    pub expert: u64,
    /// Routed experts (real ones; zero-compute experts have no weights).
    pub experts: u64,
    /// The shared experts with their gate, DeepSpeed's residual MLP and coefficient, and
    /// the block's output bias: what every token runs besides the routed experts.
    pub dense: u64,
    /// Routes per token.
    pub k: u64,
    /// What `dense` holds, in words (`shared 2,304`), empty when nothing.
    pub dense_words: Vec<String>,
}

impl Params {
    /// Counts the block `spec` describes.
    pub fn of(spec: &LayerSpec) -> Self {
        let m = spec.hidden as u64;
        let scored = (spec.num_experts + spec.gate.identity_experts()) as u64;
        let mut router = scored * m;
        let (logit_bias, selection_bias) = match &spec.gate {
            GateSpec::Router(r) => (r.logit_bias, r.selection_bias),
            GateSpec::DeepSeekV3 { .. } => (false, true),
            _ => (false, false),
        };
        router += scored * (logit_bias as u64 + selection_bias as u64);
        let expert = mlp_params(&spec.expert, m);
        let mut parts = Vec::new();
        if let Some(s) = &spec.shared {
            let gate = if s.gated { m } else { 0 };
            parts.push(("shared", mlp_params(&s.expert, m) + gate));
        }
        if spec.residual {
            // The residual MLP, and the coefficient layer `[2, H]` with its bias.
            parts.push(("residual", expert + 2 * m + 2));
        }
        if spec.output_bias {
            parts.push(("output bias", m));
        }
        Params {
            router,
            expert,
            experts: expert * spec.num_experts as u64,
            dense: parts.iter().map(|p| p.1).sum(),
            k: spec.gate.k() as u64,
            dense_words: parts.iter().map(|(w, n)| format!("{w} {}", thousands(*n))).collect(),
        }
    }

    /// Every parameter of the block.
    pub fn total(&self) -> u64 {
        self.router + self.experts + self.dense
    }

    /// Parameters one token runs through: the router, k routed experts, the rest.
    pub fn active(&self) -> u64 {
        self.router + self.k * self.expert + self.dense
    }
}

/// Weights of one expert-shaped MLP (small configs: no overflow at the sizes a config the
/// importer accepted can have, which `LayerSpec::weight_count` has already checked).
fn mlp_params(s: &ExpertSpec, m: u64) -> u64 {
    let f = s.ffn as u64;
    let bias = s.bias as u64;
    match s.kind {
        ExpertKind::Linear => m * m + bias * m,
        ExpertKind::Mlp { .. } => 2 * f * m + bias * (f + m),
        ExpertKind::Glu { .. } => 3 * f * m + bias * (2 * f + m),
    }
}

/// An expert's form in words: `GLU (silu), intermediate 16`.
fn expert_words(s: &ExpertSpec) -> String {
    let bias = if s.bias { ", with biases" } else { "" };
    match s.kind {
        ExpertKind::Linear => format!("linear{bias}"),
        ExpertKind::Mlp { activation } => format!("MLP ({}), intermediate {}{bias}", activation.name(), s.ffn),
        ExpertKind::Glu { activation, clamp: None } => {
            format!("GLU ({}), intermediate {}{bias}", activation.name(), s.ffn)
        }
        ExpertKind::Glu { activation, clamp: Some(c) } => format!(
            "GLU ({}, gate ≤ {}, up in ±{}{}{}), intermediate {}{bias}",
            activation.name(),
            c.limit,
            c.limit,
            if c.alpha != 1.0 { format!(", σ(α = {} · gate)", c.alpha) } else { String::new() },
            if c.up_offset != 0.0 { format!(", up + {}", c.up_offset) } else { String::new() },
            s.ffn
        ),
    }
}

/// `12345678` as `12,345,678`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `moe info --model SPEC`.
pub fn info(spec: &str) -> CliResult<ExitCode> {
    let model = open(spec)?;
    let fam = model.family();
    out!("model: {}", model.dir().display())?;
    out!("family: {} (model_type {})", fam.title(), fam.model_type())?;
    out!("decoder layers: {}; {}", model.num_layers(), layer_summary(&model))?;
    let moe = model.moe_layers();
    if moe.is_empty() {
        out!("no MoE layer the engine runs")?;
        return Ok(ExitCode::SUCCESS);
    }
    let s = model.spec().map_err(|e| crate::error::CliError::model(format!("the MoE block of {spec}"), e))?;
    let p = Params::of(&s);
    let z = s.gate.identity_experts();
    let mut experts = format!("{} routed ({})", s.num_experts, expert_words(&s.expert));
    if z > 0 {
        experts.push_str(&format!(" + {z} zero-compute (identity) experts"));
    }
    match &s.shared {
        Some(sh) => {
            let how = if sh.gated { "scaled by sigmoid(shared gate · x), then " } else { "" };
            let combine = match sh.combine {
                moe_engine::config::SharedCombine::Add => "added to the routed output",
                moe_engine::config::SharedCombine::Average => "averaged with the routed output",
            };
            experts.push_str(&format!("; shared: one block ({}), {how}{combine}", expert_words(&sh.expert)));
        }
        None => experts.push_str("; no shared expert"),
    }
    if s.residual {
        experts.push_str("; residual MLP mixed by a learned coefficient");
    }
    if s.output_bias {
        experts.push_str("; output bias");
    }
    out!("experts: {experts}")?;
    out!("top-k: {} of {}", s.gate.k(), s.num_experts + z)?;
    out!("routing: {}", s.gate)?;
    let n = moe.len() as u64;
    let rest: String = p.dense_words.iter().map(|w| format!(", {w}")).collect();
    out!(
        "parameters per MoE layer: {} (router {}, {} routed experts × {} = {}{rest})",
        thousands(p.total()),
        thousands(p.router),
        s.num_experts,
        thousands(p.expert),
        thousands(p.experts),
    )?;
    out!("parameters in the {}: {}", moe_layers(n), thousands(n * p.total()))?;
    let bound = if z > 0 { " at most" } else { "" };
    let rest: String = p.dense_words.iter().map(|w| format!(" + {w}")).collect();
    out!(
        "active per token:{bound} {} per MoE layer (router {} + {} routed × {}{rest}), {} over the {}",
        thousands(p.active()),
        thousands(p.router),
        p.k,
        thousands(p.expert),
        thousands(n * p.active()),
        moe_layers(n)
    )?;
    disk_line(&model, &moe)?;
    Ok(ExitCode::SUCCESS)
}

/// Tensors, elements and bytes per dtype of the MoE blocks' tensors, as stored (from the
/// files' headers: nothing is read).
fn disk_line(model: &HfModel, moe: &[usize]) -> CliResult<()> {
    let ck = model.checkpoint()?;
    let mut by_dtype: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let (mut tensors, mut elements) = (0u64, 0u64);
    for &l in moe {
        for name in model.block_tensor_names(&ck, l)? {
            for t in ck.stored(&name) {
                let n: u64 = t.shape.iter().map(|&d| d as u64).product();
                tensors += 1;
                elements += n;
                let e = by_dtype.entry(t.dtype).or_default();
                e.0 += n;
                e.1 += t.bytes;
            }
        }
    }
    let total: u64 = by_dtype.values().map(|v| v.1).sum();
    let dtypes: Vec<String> =
        by_dtype.iter().map(|(d, (n, b))| format!("{d} {} ({} elements)", human_bytes(*b), thousands(*n))).collect();
    out!(
        "on disk (the MoE blocks' tensors, from the safetensors headers): {tensors} tensors, {} elements, {}: {}",
        thousands(elements),
        human_bytes(total),
        dtypes.join(", ")
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_and_ranges_read_as_people_write_them() {
        assert_eq!(super::thousands(1234567), "1,234,567");
        assert_eq!(super::thousands(999), "999");
    }
}
