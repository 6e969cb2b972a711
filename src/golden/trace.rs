//! Training traces (`tests/golden/FORMAT.md`, "Training traces"): a short training run of
//! one MoE layer by DeepSpeed or an HF block with torch.optim, replayed step by step on a
//! backend and compared: the loss and auxiliary loss of every step, the routes per expert
//! of every step (exactly), and every parameter after the last step.
//!
//! Each step t follows FORMAT.md: forward on `x[t]` (DeepSpeed layers in training mode
//! with the step's replayed noise, HF blocks in the routing mode the trace names), the
//! loss `mean((y - target[t])²)` plus `aux_coef` times DeepSpeed's `l_aux` or the HF
//! load-balancing loss, the layer's backward for it (the gradient of the mean squared
//! error, `2 (y − target) / numel`, is formed on the host), one optimizer step over
//! DeepSpeed's parameter groups (or torch's one group for HF blocks), and the
//! DeepSeek-V3 bias update where the trace has one. Everything runs through the
//! [`Backend`] trait, so a backend with a backward and an optimizer step runs the whole
//! trace; on one without (it answers [`Error::Unsupported`]) and on expert-parallel
//! ranks, only the first step's forward is compared and the rest is reported as not
//! compared.

use super::case::Noise;
use super::{rel_l2, CaseResult, OutputCheck};
use crate::backend::Backend;
use crate::config::{LayerSpec, Mode};
use crate::error::{Error, Result};
use crate::import::hf::Family;
use crate::import::{deepspeed, hf, Checkpoint, NameMap};
use crate::layer::{BackwardOptions, MoeLayer};
use crate::losses::LossCoefs;
use crate::options::{GateOptions, LayerOptions, NoiseOverrides};
use crate::parallel::{ExpertParallel, TokenLayout, Transport};
use crate::report::Report;
use crate::tensor::{DType, HostTensor};
use crate::train::{Grouping, Hyper, Optimizer, OptimizerSpec, StepReport};
use crate::weights::HostLayerWeights;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The format version of traces.
pub const FORMAT: u32 = 1;

/// What a trace trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceKind {
    /// A DeepSpeed `MoE` layer (`deepspeed.moe.train`).
    DeepSpeed,
    /// An HF transformers MoE block (`hf.<model_type>.train`).
    Hf(Family),
}

impl TryFrom<String> for TraceKind {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        if s == "deepspeed.moe.train" {
            return Ok(TraceKind::DeepSpeed);
        }
        match s.strip_prefix("hf.").and_then(|r| r.strip_suffix(".train")).map(Family::from_model_type) {
            Some(Ok(f)) => Ok(TraceKind::Hf(f)),
            _ => Err(format!(
                "unknown trace kind `{s}` (deepspeed.moe.train, hf.<model_type>.train of a supported family)"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for TraceKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        TraceKind::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl TraceKind {
    /// The kind as `case.json` writes it.
    pub fn name(self) -> String {
        match self {
            TraceKind::DeepSpeed => "deepspeed.moe.train".into(),
            TraceKind::Hf(f) => format!("hf.{}.train", f.model_type()),
        }
    }
}

/// The loss a trace trains on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum TraceLoss {
    /// `mean((y - target)^2)`.
    #[serde(rename = "mean((y - target)^2)")]
    Mse,
    /// `mean((y - target)^2) + aux_coef * l_aux` (DeepSpeed's `l_aux`).
    #[serde(rename = "mean((y - target)^2) + aux_coef * l_aux")]
    MsePlusLAux,
    /// `mean((y - target)^2) + aux_coef * load_balancing_loss(router_logits, num_experts, top_k)`
    /// (the HF Switch-style loss).
    #[serde(rename = "mean((y - target)^2) + aux_coef * load_balancing_loss(router_logits, num_experts, top_k)")]
    MsePlusLoadBalancing,
}

/// Which torch.optim class the trace used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TorchOptim {
    /// `torch.optim.SGD`.
    Sgd,
    /// `torch.optim.Adam` (L2 weight decay).
    Adam,
    /// `torch.optim.AdamW`.
    Adamw,
}

/// `train.optimizer`: a torch.optim class and its arguments (torch's defaults where
/// absent).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorchOptimizer {
    /// The class.
    #[serde(rename = "type")]
    pub kind: TorchOptim,
    /// Learning rate.
    pub lr: f64,
    /// Adam betas.
    #[serde(default)]
    pub betas: Option<[f64; 2]>,
    /// Adam eps.
    #[serde(default)]
    pub eps: Option<f64>,
    /// Weight decay.
    #[serde(default)]
    pub weight_decay: Option<f64>,
    /// SGD momentum.
    #[serde(default)]
    pub momentum: Option<f64>,
    /// SGD dampening.
    #[serde(default)]
    pub dampening: Option<f64>,
    /// SGD Nesterov momentum.
    #[serde(default)]
    pub nesterov: Option<bool>,
}

impl TorchOptimizer {
    /// The hyperparameters, as torch's constructor fills them in. Arguments the class
    /// does not take are errors naming them.
    pub fn hyper(&self) -> Result<Hyper> {
        let f = |name: &str| format!("train.optimizer.{name}");
        let base = match self.kind {
            TorchOptim::Sgd => Hyper::sgd(self.lr),
            TorchOptim::Adam => Hyper::adam(self.lr),
            TorchOptim::Adamw => Hyper::adamw(self.lr),
        };
        let sgd = self.kind == TorchOptim::Sgd;
        for (name, given, for_sgd) in [
            ("betas", self.betas.is_some(), false),
            ("eps", self.eps.is_some(), false),
            ("momentum", self.momentum.is_some(), true),
            ("dampening", self.dampening.is_some(), true),
            ("nesterov", self.nesterov.is_some(), true),
        ] {
            if given && sgd != for_sgd {
                return Err(Error::config(f(name), format!("not an argument of torch.optim {:?}", self.kind)));
            }
        }
        let h = Hyper {
            betas: self.betas.map_or(base.betas, |b| (b[0], b[1])),
            eps: self.eps.unwrap_or(base.eps),
            weight_decay: self.weight_decay.unwrap_or(base.weight_decay),
            momentum: self.momentum.unwrap_or(base.momentum),
            dampening: self.dampening.unwrap_or(base.dampening),
            nesterov: self.nesterov.unwrap_or(base.nesterov),
            ..base
        };
        h.validate().map_err(|e| match e {
            Error::Config { field, msg } => Error::config(f(&field), msg),
            other => other,
        })?;
        Ok(h)
    }
}

/// `train.inputs`: tensor keys.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceInputs {
    /// The batches `[steps, B, T, M]` (or `[steps, S, M]`).
    pub x: String,
    /// The targets, shaped like `x`.
    pub target: String,
}

/// `train.bias_update`: DeepSeek-V3's auxiliary-loss-free balancing after every step.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BiasUpdate {
    /// The rule in words (documentation).
    #[serde(default)]
    pub rule: Option<String>,
    /// γ of `bias += γ · sign(mean(c) − c)`.
    pub rate: f64,
}

/// `train`: how the reference trained.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Train {
    /// Optimizer steps.
    pub steps: usize,
    /// The loss.
    pub loss: TraceLoss,
    /// The auxiliary loss's weight (0 with the plain loss).
    pub aux_coef: f64,
    /// The torch.optim optimizer.
    pub optimizer: TorchOptimizer,
    /// DeepSpeed traces: how the parameter groups were made (documentation).
    #[serde(default)]
    pub param_groups: Option<String>,
    /// HF traces: the routing mode (`eval (no router jitter)`).
    #[serde(default)]
    pub routing_mode: Option<String>,
    /// Input tensors.
    pub inputs: TraceInputs,
    /// Replayed noise, each tensor indexed by step first.
    #[serde(default)]
    pub noise: Noise,
    /// How far every step's routing stayed from a tie in the reference run.
    pub min_topk_margin: f64,
    /// DeepSeek-V3's bias update.
    #[serde(default)]
    pub bias_update: Option<BiasUpdate>,
}

/// `expected`: tensor keys.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceExpected {
    /// The loss of every step `[steps]`.
    pub loss: String,
    /// DeepSpeed's `l_aux` of every step `[steps]`.
    #[serde(default)]
    pub l_aux: Option<String>,
    /// The HF load-balancing loss of every step `[steps]`.
    #[serde(default)]
    pub aux_loss: Option<String>,
    /// Routes per expert of every step `[steps, E]`.
    pub exp_counts: String,
    /// Parameter name → its value after the last step.
    pub final_params: BTreeMap<String, String>,
}

/// A compared output of a trace, as `tolerance.exact` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceOutput {
    /// The loss.
    Loss,
    /// DeepSpeed's `l_aux`.
    LAux,
    /// The HF load-balancing loss.
    AuxLoss,
    /// Routes per expert.
    ExpCounts,
}

/// How a trace's outputs are compared.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceTolerance {
    /// Bound on the relative L2 error of the float outputs and of every final parameter.
    pub rel_l2: f64,
    /// Outputs compared exactly (must include `exp_counts`).
    #[serde(default)]
    pub exact: Vec<TraceOutput>,
}

/// A trace's `case.json`, every key typed. Unknown keys are errors.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceMeta {
    /// The format version ([`FORMAT`]).
    pub format: u32,
    /// What the trace trains.
    pub kind: TraceKind,
    /// Trace name (the folder name when absent).
    #[serde(default)]
    pub name: Option<String>,
    /// The references and their versions.
    #[serde(default)]
    pub source: Option<String>,
    /// `train`.
    pub mode: Mode,
    /// The reference's configuration, read by the importers.
    pub config: serde_json::Value,
    /// How the reference trained.
    pub train: Train,
    /// Expected values.
    pub expected: TraceExpected,
    /// How they are compared.
    pub tolerance: TraceTolerance,
    /// How the weights are laid out (documentation).
    #[serde(default)]
    pub weights_layout: Option<String>,
    /// A remark on how the values were computed.
    #[serde(default)]
    pub note: Option<String>,
}

impl TraceMeta {
    /// Checks what the types cannot (errors name the key).
    pub fn validate(&self, trace: &str) -> Result<()> {
        let bad = |msg: String| Err(Error::case(trace, msg));
        let t = &self.train;
        if self.format != FORMAT {
            return bad(format!("`format` {} is not the format {FORMAT} this engine reads", self.format));
        }
        if self.mode != Mode::Train {
            return bad("`mode` of a training trace is `train`".into());
        }
        if t.steps == 0 {
            return bad("`train.steps` must be at least 1".into());
        }
        let ds = self.kind == TraceKind::DeepSpeed;
        match (ds, t.loss) {
            (true, TraceLoss::MsePlusLAux) | (false, TraceLoss::Mse | TraceLoss::MsePlusLoadBalancing) => {}
            _ => return bad(format!("`train.loss` {:?} is not a loss of a {} trace", t.loss, self.kind.name())),
        }
        if !(t.aux_coef.is_finite() && t.aux_coef >= 0.0) {
            return bad(format!("`train.aux_coef` must be finite and >= 0, got {}", t.aux_coef));
        }
        if t.loss == TraceLoss::Mse && t.aux_coef != 0.0 {
            return bad("`train.aux_coef` is not 0 but `train.loss` has no auxiliary term".into());
        }
        if !(t.min_topk_margin.is_finite() && t.min_topk_margin >= 0.0) {
            return bad(format!("`train.min_topk_margin` must be finite and >= 0, got {}", t.min_topk_margin));
        }
        match (ds, &t.routing_mode, &t.param_groups) {
            (true, Some(_), _) => return bad("`train.routing_mode`: DeepSpeed traces route in training mode".into()),
            (true, None, None) => return bad("`train.param_groups` is missing".into()),
            (false, None, _) => return bad("`train.routing_mode` is missing".into()),
            (false, _, Some(_)) => return bad("`train.param_groups`: HF traces train one torch.optim group".into()),
            _ => {}
        }
        self.routing_mode(trace)?;
        if !ds && [&t.noise.jitter, &t.noise.gumbel, &t.noise.rts_uniform].iter().any(|n| n.is_some()) {
            return bad("`train.noise`: HF traces route without noise".into());
        }
        if let Some(b) = &t.bias_update {
            if !(b.rate.is_finite() && b.rate > 0.0) {
                return bad(format!("`train.bias_update.rate` must be finite and > 0, got {}", b.rate));
            }
        }
        t.optimizer.hyper().map_err(|e| Error::case(trace, e.to_string()))?;
        let e = &self.expected;
        match (t.loss, &e.l_aux, &e.aux_loss) {
            (TraceLoss::MsePlusLAux, _, None) | (TraceLoss::MsePlusLoadBalancing, None, _) => {}
            (TraceLoss::Mse, None, None) => {}
            (_, Some(_), _) => return bad("`expected.l_aux`: only DeepSpeed's loss has l_aux".into()),
            (_, _, Some(_)) => return bad("`expected.aux_loss`: only the load-balancing loss has aux_loss".into()),
        }
        if e.final_params.is_empty() {
            return bad("`expected.final_params` names no parameters".into());
        }
        let tol = self.tolerance.rel_l2;
        if !(tol.is_finite() && (0.0..1.0).contains(&tol)) {
            return bad(format!("`tolerance.rel_l2` must be in [0, 1), got {tol}"));
        }
        if !self.tolerance.exact.contains(&TraceOutput::ExpCounts) {
            return bad("`tolerance.exact` must list `exp_counts` (routes per expert are compared exactly)".into());
        }
        for o in &self.tolerance.exact {
            let listed = match o {
                TraceOutput::Loss | TraceOutput::ExpCounts => true,
                TraceOutput::LAux => e.l_aux.is_some(),
                TraceOutput::AuxLoss => e.aux_loss.is_some(),
            };
            if !listed {
                return bad(format!("`tolerance.exact` names `{o:?}`, which `expected` does not list"));
            }
        }
        Ok(())
    }

    /// The routing mode of the forwards: training for DeepSpeed layers; for HF blocks what
    /// `train.routing_mode` names (`eval ...` or `train ...`).
    pub fn routing_mode(&self, trace: &str) -> Result<Mode> {
        match (&self.kind, &self.train.routing_mode) {
            (TraceKind::DeepSpeed, _) => Ok(Mode::Train),
            (_, Some(m)) if m == "eval" || m.starts_with("eval ") => Ok(Mode::Eval),
            (_, Some(m)) if m == "train" || m.starts_with("train ") => Ok(Mode::Train),
            (_, m) => {
                Err(Error::case(trace, format!("`train.routing_mode` {m:?} is neither `eval ...` nor `train ...`")))
            }
        }
    }
}

/// Whether the folder's `case.json` is a training trace (its `kind` ends in `.train`).
/// Unreadable metadata is no trace: the case reader reports what is wrong with it.
pub fn is_trace(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("case.json")) else { return false };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    v.get("kind").and_then(|k| k.as_str()).is_some_and(|k| k.ends_with(".train"))
}

/// What one step of a run gave.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    /// The step's loss (before its update).
    pub loss: f64,
    /// Its auxiliary loss: DeepSpeed's `l_aux`, or the HF load-balancing loss.
    pub aux: f64,
    /// Routes per expert.
    pub exp_counts: Vec<i64>,
}

/// A loaded trace: its metadata and tensors.
pub struct Trace {
    /// Trace name.
    pub name: String,
    /// The metadata.
    pub meta: TraceMeta,
    /// Every tensor of `tensors.safetensors`.
    pub tensors: Checkpoint,
}

/// The innermost key whose value ends at (1-based) `line`:`column` of JSON `text`: the
/// last `"key":` before that position.
fn key_at(text: &str, line: usize, column: usize) -> Option<&str> {
    let start: usize = text.split_inclusive('\n').take(line.saturating_sub(1)).map(str::len).sum();
    let before = text.get(..(start + column).min(text.len()))?;
    let mut end = before.len();
    loop {
        let colon = before[..end].rfind(':')?;
        if let Some(quoted) = before[..colon].trim_end().strip_suffix('"') {
            if let Some(open) = quoted.rfind('"') {
                return Some(&quoted[open + 1..]);
            }
        }
        end = colon;
    }
}

/// Tensor `t`'s slice `i` along its first dimension.
fn index0(t: &HostTensor, i: usize, what: &str) -> Result<HostTensor> {
    let shape = t.shape();
    let n = *shape.first().ok_or_else(|| Error::shape(what, "[steps, ...]", shape))?;
    if i >= n {
        return Err(Error::shape(what, format!("[at least {}, ...]", i + 1), shape));
    }
    let per: usize = shape[1..].iter().product();
    let v = t.as_f32(what)?;
    HostTensor::f32(&shape[1..], v[i * per..(i + 1) * per].to_vec())
}

impl Trace {
    /// Reads and checks `dir/case.json` and `dir/tensors.safetensors`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("case.json");
        let folder = dir.display().to_string();
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
        let not_format = |e: serde_json::Error| Error::Case {
            case: folder.clone(),
            msg: format!("case.json does not follow FORMAT.md's training traces: {e}"),
            source: Some(Box::new(e)),
        };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(not_format)?;
        // serde reads a struct from a JSON array too; FORMAT.md's sections are objects.
        let sections = [
            ("config", value.get("config")),
            ("train", value.get("train")),
            ("expected", value.get("expected")),
            ("tolerance", value.get("tolerance")),
            ("train.optimizer", value.get("train").and_then(|t| t.get("optimizer"))),
            ("train.inputs", value.get("train").and_then(|t| t.get("inputs"))),
            ("train.noise", value.get("train").and_then(|t| t.get("noise"))),
            ("train.bias_update", value.get("train").and_then(|t| t.get("bias_update"))),
            ("expected.final_params", value.get("expected").and_then(|t| t.get("final_params"))),
        ];
        for (key, v) in sections {
            if v.is_some_and(|v| !v.is_object()) {
                return Err(Error::case(&folder, format!("`{key}` must be a JSON object")));
            }
        }
        // Parsed from the text (not the value) so that errors carry a line and column,
        // from which the key is found (serde names unknown and missing keys itself, not
        // the key of a mistyped value).
        let meta: TraceMeta = serde_json::from_str(&text).map_err(|e| match key_at(&text, e.line(), e.column()) {
            Some(key) if e.is_data() => Error::Case {
                case: folder.clone(),
                msg: format!("case.json does not follow FORMAT.md's training traces: key `{key}`: {e}"),
                source: Some(Box::new(e)),
            },
            _ => not_format(e),
        })?;
        let name = meta.name.clone().unwrap_or_else(|| folder.clone());
        meta.validate(&name)?;
        let tensors = Checkpoint::load(&dir.join("tensors.safetensors"))?;
        let trace = Trace { name, meta, tensors };
        trace.check_tensors()?;
        Ok(trace)
    }

    /// Every tensor the metadata names: the case.json key (as errors name it) and the
    /// tensor key.
    fn named(&self) -> Vec<(String, &str)> {
        let t = &self.meta.train;
        let e = &self.meta.expected;
        let mut out: Vec<(String, &str)> =
            vec![("train.inputs.x".into(), &t.inputs.x), ("train.inputs.target".into(), &t.inputs.target)];
        let optional = [
            ("train.noise.jitter", &t.noise.jitter),
            ("train.noise.gumbel", &t.noise.gumbel),
            ("train.noise.rts_uniform", &t.noise.rts_uniform),
            ("expected.l_aux", &e.l_aux),
            ("expected.aux_loss", &e.aux_loss),
        ];
        out.extend(optional.into_iter().filter_map(|(f, k)| k.as_deref().map(|k| (f.to_string(), k))));
        out.push(("expected.loss".into(), &e.loss));
        out.push(("expected.exp_counts".into(), &e.exp_counts));
        out.extend(e.final_params.iter().map(|(p, k)| (format!("expected.final_params.{p}"), k.as_str())));
        out
    }

    /// Every named tensor is there and finite, every other is a `param/`, and the shapes
    /// agree with `train.steps` and the parameters.
    fn check_tensors(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::case(&self.name, msg));
        let named = self.named();
        for (field, key) in &named {
            if !self.tensors.contains(key) {
                return bad(format!("`{field}` names tensor `{key}`, which tensors.safetensors lacks"));
            }
            self.tensors.get(key)?.check_finite(field)?;
        }
        if let Some(extra) =
            self.tensors.names().find(|n| !n.starts_with("param/") && !named.iter().any(|(_, k)| k == n))
        {
            return bad(format!("tensor `{extra}` is neither a `param/` nor named by case.json"));
        }
        let steps = self.meta.train.steps;
        let x = self.tensor(&self.meta.train.inputs.x)?;
        x.as_f32("train.inputs.x")?;
        if !(3..=4).contains(&x.shape().len()) || x.shape()[0] != steps {
            return Err(Error::shape("train.inputs.x", format!("[{steps}, B, T, M] or [{steps}, S, M]"), x.shape()));
        }
        self.tensor(&self.meta.train.inputs.target)?.expect_shape("train.inputs.target", x.shape())?;
        let n = &self.meta.train.noise;
        for (field, key) in [("jitter", &n.jitter), ("gumbel", &n.gumbel), ("rts_uniform", &n.rts_uniform)] {
            if let Some(k) = key {
                let t = self.tensor(k)?;
                if t.shape().len() < 2 || t.shape()[0] != steps {
                    return Err(Error::shape(
                        format!("train.noise.{field}"),
                        format!("[{steps}, rows, cols]"),
                        t.shape(),
                    ));
                }
            }
        }
        let e = &self.meta.expected;
        for (field, key) in [("loss", Some(&e.loss)), ("l_aux", e.l_aux.as_ref()), ("aux_loss", e.aux_loss.as_ref())] {
            if let Some(k) = key {
                self.tensor(k)?.expect_shape(&format!("expected.{field}"), &[steps])?;
            }
        }
        let counts = self.tensor(&e.exp_counts)?;
        if counts.shape().len() != 2 || counts.shape()[0] != steps {
            return Err(Error::shape("expected.exp_counts", format!("[{steps}, num_experts]"), counts.shape()));
        }
        let params = self.params();
        if let Some(p) = params.names().find(|p| !e.final_params.contains_key(*p)) {
            return bad(format!("`expected.final_params` lacks parameter `{p}`"));
        }
        for (p, key) in &e.final_params {
            let have = params.get(p).map_err(|_| {
                Error::case(&self.name, format!("`expected.final_params` names `{p}`, which is no `param/`"))
            })?;
            self.tensor(key)?.expect_shape(&format!("expected.final_params.{p}"), have.shape())?;
        }
        Ok(())
    }

    /// The tensor under `key`.
    pub fn tensor(&self, key: &str) -> Result<&HostTensor> {
        self.tensors.get(key)
    }

    /// Optimizer steps.
    pub fn steps(&self) -> usize {
        self.meta.train.steps
    }

    /// The initial parameters under their reference names (without `param/`).
    pub fn params(&self) -> Checkpoint {
        self.tensors.renamed(|n| n.strip_prefix("param/").map(str::to_string), &format!("{} params", self.name))
    }

    /// The layer spec and weights from checkpoint tensors under the reference's names,
    /// through the importer of the trace's kind (`ck`: the trace's own [`Trace::params`],
    /// or weights saved under those names).
    pub fn import(&self, ck: &mut Checkpoint) -> Result<(LayerSpec, HostLayerWeights)> {
        let cfg = &self.meta.config;
        match self.meta.kind {
            TraceKind::Hf(family) => {
                let (fam, spec) = hf::layer_spec(cfg)?;
                if fam != family {
                    return Err(Error::config(
                        "model_type",
                        format!("does not match trace kind `{}`", self.meta.kind.name()),
                    ));
                }
                let w = hf::layer_weights(ck, fam, &spec, "")?;
                Ok((spec, w))
            }
            TraceKind::DeepSpeed => {
                let spec = deepspeed::layer_spec(cfg)?;
                let w = deepspeed::layer_weights(ck, &spec, "")?;
                Ok((spec, w))
            }
        }
    }

    /// The importer as a function of the checkpoint alone (for [`NameMap::build`] and
    /// [`crate::train::CheckpointNames`]).
    pub fn importer(&self) -> impl Fn(&mut Checkpoint) -> Result<HostLayerWeights> + '_ {
        move |ck| Ok(self.import(ck)?.1)
    }

    /// Where every reference parameter is in the engine's layout.
    pub fn names(&self) -> Result<NameMap> {
        NameMap::build(&self.params(), self.importer())
    }

    /// The layer to train, from the trace's initial parameters: on this device, or
    /// (with `ep`) one rank of a tensor-parallel expert-parallel group holding its share
    /// of the experts.
    pub fn layer<B: Backend>(&self, b: &B, ep: Option<Arc<dyn Transport<B>>>) -> Result<MoeLayer<B>> {
        let (spec, w) = self.import(&mut self.params())?;
        match ep {
            None => MoeLayer::new_trainable(b, spec, &w),
            Some(transport) => {
                let ep = ExpertParallel::deepspeed(transport, spec.num_experts, TokenLayout::Replicated)?;
                MoeLayer::new_ep_trainable(b, spec, &w, ep)
            }
        }
    }

    /// The optimizer of the trace over `layer`: `train.optimizer` as torch.optim defines
    /// it, over DeepSpeed's parameter groups (DeepSpeed traces, with the config's
    /// `ep_size`) or torch's one group (HF blocks); no gradient clipping.
    pub fn optimizer<B: Backend>(&self, layer: &mut MoeLayer<B>) -> Result<Optimizer<B>> {
        let hyper = self.meta.train.optimizer.hyper()?;
        let grouping = match self.meta.kind {
            TraceKind::DeepSpeed => {
                let ep_size = match self.meta.config.get("ep_size") {
                    None => 1,
                    Some(v) => serde_json::from_value(v.clone())
                        .map_err(|e| Error::config("ep_size", format!("{e} (got {v})")))?,
                };
                Grouping::DeepSpeed { ep_size }
            }
            TraceKind::Hf(_) => Grouping::Single,
        };
        Optimizer::new(layer, &OptimizerSpec::new(hyper), grouping)
    }

    /// The forward options of step `t`: the routing mode, the step's replayed noise (each
    /// flattened to `[rows, last dim]`), and the activations kept for the backward.
    pub fn options(&self, t: usize) -> Result<LayerOptions> {
        let n = &self.meta.train.noise;
        let at = |field: &str, key: &Option<String>| -> Result<Option<HostTensor>> {
            key.as_ref()
                .map(|k| {
                    let s = index0(self.tensor(k)?, t, &format!("train.noise.{field}"))?;
                    let cols = s.shape().last().copied().unwrap_or(1).max(1);
                    let rows = s.numel() / cols;
                    s.reshape(&[rows, cols])
                })
                .transpose()
        };
        let noise = NoiseOverrides {
            jitter: at("jitter", &n.jitter)?,
            gumbel: at("gumbel", &n.gumbel)?,
            rts: at("rts_uniform", &n.rts_uniform)?,
        };
        let mode = self.meta.routing_mode(&self.name)?;
        Ok(LayerOptions {
            gate: GateOptions { mode, seed: 0, noise, used_token: None },
            keep_activations: true,
            ..Default::default()
        })
    }

    /// The auxiliary loss of a forward as the trace counts it, and its coefficients for
    /// the backward.
    fn aux(&self, rep: &Report) -> (f64, LossCoefs) {
        let c = self.meta.train.aux_coef;
        match self.meta.train.loss {
            TraceLoss::Mse => (0.0, LossCoefs::default()),
            TraceLoss::MsePlusLAux => (rep.losses.l_aux, LossCoefs { l_aux: c, ..Default::default() }),
            TraceLoss::MsePlusLoadBalancing => {
                (rep.losses.load_balancing, LossCoefs { load_balancing: c, ..Default::default() })
            }
        }
    }

    /// The forward of step `t` on `layer`: its output and what the trace records of it.
    fn forward<B: Backend>(
        &self,
        b: &B,
        layer: &MoeLayer<B>,
        t: usize,
    ) -> Result<(crate::LayerOutput<B>, HostTensor, StepRecord, LossCoefs)> {
        let x = index0(self.tensor(&self.meta.train.inputs.x)?, t, "train.inputs.x")?;
        let target = index0(self.tensor(&self.meta.train.inputs.target)?, t, "train.inputs.target")?;
        let out = layer.forward(b, &b.upload(&x)?, &self.options(t)?)?;
        let rep = out.report(b)?;
        let y = b.download(&out.y)?;
        let (y, target) = (y.as_f32("y")?, target.as_f32("train.inputs.target")?);
        let numel = y.len().max(1);
        let mse = y.iter().zip(target).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>() / numel as f64;
        // torch's backward of mean((y - t)²): the mean's 1/numel times pow's 2·(y − t), in f32.
        let inv = 1.0f32 / numel as f32;
        let dy: Vec<f32> = y.iter().zip(target).map(|(&a, &b)| inv * (2.0 * (a - b))).collect();
        let dy = HostTensor::f32(out.y.shape(), dy)?;
        let (aux, coefs) = self.aux(&rep);
        let loss = mse + self.meta.train.aux_coef * aux;
        Ok((out, dy, StepRecord { loss, aux, exp_counts: rep.exp_counts }, coefs))
    }

    /// Step `t` of the trace on `layer` with `opt`: forward, loss, backward, optimizer
    /// step, and the bias update where the trace has one.
    pub fn step<B: Backend>(
        &self,
        b: &B,
        layer: &mut MoeLayer<B>,
        opt: &mut Optimizer<B>,
        t: usize,
    ) -> Result<StepRecord> {
        Ok(self.step_reported(b, layer, opt, t)?.0)
    }

    /// [`Trace::step`], also returning what the optimizer step did. With a loss scaler on
    /// `opt` the loss gradient is multiplied by its scale before the backward (the
    /// router losses' coefficients with it, so every gradient carries the scale); a step
    /// the scaler skips (overflowing gradients) leaves the layer as it was, its bias
    /// update included.
    pub fn step_reported<B: Backend>(
        &self,
        b: &B,
        layer: &mut MoeLayer<B>,
        opt: &mut Optimizer<B>,
        t: usize,
    ) -> Result<(StepRecord, StepReport)> {
        let (out, dy, record, mut coefs) = self.forward(b, layer, t)?;
        let mut dy = b.upload(&dy)?;
        let scale = opt.loss_scale();
        if scale != 1.0 {
            dy = b.scale(&dy, scale as f32)?;
            coefs = coefs.scaled(scale);
        }
        let grads = layer.backward(b, &out, &dy, &BackwardOptions { losses: coefs })?;
        drop(out);
        let report = opt.step(b, layer, grads)?;
        if let (Some(bu), false) = (&self.meta.train.bias_update, report.skipped) {
            layer.update_correction_bias(b, &record.exp_counts, bu.rate as f32)?;
        }
        Ok((record, report))
    }

    /// Runs the whole trace on `b` (with `ep`, as one rank of an expert-parallel group:
    /// every rank steps its own experts and the replicated rest) and compares it. On a
    /// backend without a backward or an optimizer step, compares the first step's forward
    /// alone (and says so).
    pub fn run<B: Backend>(&self, b: &B, ep: Option<Arc<dyn Transport<B>>>) -> Result<CaseResult> {
        let mut layer = self.layer(b, ep.clone())?;
        let mut opt = self.optimizer(&mut layer)?;
        let mut records = Vec::with_capacity(self.steps());
        for t in 0..self.steps() {
            match self.step(b, &mut layer, &mut opt, t) {
                Ok(r) => records.push(r),
                Err(e @ Error::Unsupported { .. }) if t == 0 => {
                    return self.run_first_forward(b, ep, &format!("{e}"));
                }
                Err(e) => return Err(e),
            }
        }
        self.compare(b, &layer, &records)
    }

    /// The first step's forward alone, on this backend (`ep` None) or as one rank of an
    /// expert-parallel group; `why` says why the rest is not compared.
    pub fn run_first_forward<B: Backend>(
        &self,
        b: &B,
        ep: Option<Arc<dyn Transport<B>>>,
        why: &str,
    ) -> Result<CaseResult> {
        let (spec, w) = self.import(&mut self.params())?;
        let layer = match ep {
            None => MoeLayer::new(b, spec, &w, DType::F32)?,
            Some(transport) => {
                let ep = ExpertParallel::deepspeed(transport, spec.num_experts, TokenLayout::Replicated)?;
                MoeLayer::new_ep(b, spec, &w, DType::F32, ep)?
            }
        };
        let (_, _, record, _) = self.forward(b, &layer, 0)?;
        let mut outputs = Vec::new();
        let tol = &self.meta.tolerance;
        let e = &self.meta.expected;
        let aux_key = e.l_aux.as_ref().map(|k| ("l_aux", TraceOutput::LAux, k));
        let aux_key = aux_key.or(e.aux_loss.as_ref().map(|k| ("aux_loss", TraceOutput::AuxLoss, k)));
        for (name, which, key, got) in std::iter::once(("loss", TraceOutput::Loss, &e.loss, record.loss))
            .chain(aux_key.map(|(n, w, k)| (n, w, k, record.aux)))
        {
            let want = self.tensor(key)?.to_f64()[0];
            outputs.push(float_check(&format!("{name}[0]"), &[got], &[want], tol, tol.exact.contains(&which)));
        }
        let counts = self.tensor(&e.exp_counts)?;
        let per = counts.shape().get(1).copied().unwrap_or(0);
        outputs.push(counts_check("exp_counts[0]", &[record.exp_counts], &counts.to_f64()[..per], &self.name)?);
        let rest = format!("the {} steps after the first and the final parameters ({why})", self.steps() - 1);
        Ok(self.result(outputs, vec![rest]))
    }

    /// Compares a whole run: the per-step records and `layer`'s final parameters.
    pub fn compare<B: Backend>(&self, b: &B, layer: &MoeLayer<B>, records: &[StepRecord]) -> Result<CaseResult> {
        if records.len() != self.steps() {
            return Err(Error::Misuse(format!("{} step records for a trace of {} steps", records.len(), self.steps())));
        }
        let tol = &self.meta.tolerance;
        let e = &self.meta.expected;
        let mut outputs = Vec::new();
        let losses: Vec<f64> = records.iter().map(|r| r.loss).collect();
        let auxes: Vec<f64> = records.iter().map(|r| r.aux).collect();
        let floats = [
            ("loss", TraceOutput::Loss, Some(&e.loss), &losses),
            ("l_aux", TraceOutput::LAux, e.l_aux.as_ref(), &auxes),
        ];
        let floats = floats.into_iter().chain([("aux_loss", TraceOutput::AuxLoss, e.aux_loss.as_ref(), &auxes)]);
        for (name, which, key, got) in floats {
            if let Some(k) = key {
                let want = self.tensor(k)?.to_f64();
                outputs.push(float_check(name, got, &want, tol, tol.exact.contains(&which)));
            }
        }
        let counts: Vec<Vec<i64>> = records.iter().map(|r| r.exp_counts.clone()).collect();
        outputs.push(counts_check("exp_counts", &counts, &self.tensor(&e.exp_counts)?.to_f64(), &self.name)?);
        let names = self.names()?;
        let weights = layer.download_weights(b)?;
        let num_experts = layer.spec().num_experts;
        let mut engine = BTreeMap::new();
        for (n, t) in weights.named() {
            // An expert-parallel rank holds its own experts: the others are NaN here and
            // compared on their ranks.
            let t = match layer.local_experts() {
                Some(ids) if crate::layer::is_expert_param(&n) => super::run::scatter_experts(t, ids, num_experts)?,
                _ => t.clone(),
            };
            engine.insert(n, t);
        }
        for (p, key) in &e.final_params {
            let have = names.gather(&engine, p)?;
            if layer.local_experts().is_some() && have.as_f32(p)?.iter().all(|v| v.is_nan()) && have.numel() > 0 {
                continue;
            }
            let want = self.tensor(key)?;
            if have.shape() != want.shape() {
                return Err(Error::case(
                    &self.name,
                    format!("final parameter `{p}` has shape {:?}; the run produced {:?}", want.shape(), have.shape()),
                ));
            }
            outputs.push(float_check(&format!("final/{p}"), &have.to_f64(), &want.to_f64(), tol, false));
        }
        Ok(self.result(outputs, Vec::new()))
    }

    fn result(&self, outputs: Vec<OutputCheck>, not_compared: Vec<String>) -> CaseResult {
        let worst = outputs.iter().filter(|o| !o.exact).map(|o| o.error).fold(0.0, f64::max);
        let pass = !outputs.is_empty() && outputs.iter().all(|o| o.pass);
        CaseResult {
            name: self.name.clone(),
            kind: self.meta.kind.name(),
            outputs,
            worst_rel_l2: worst,
            worst_grad_rel_l2: None,
            pass,
            not_compared,
        }
    }
}

/// A float output compared by relative L2 (or exactly).
fn float_check(name: &str, got: &[f64], want: &[f64], tol: &TraceTolerance, exact: bool) -> OutputCheck {
    let (error, pass) = if exact {
        let bad = got.iter().zip(want).filter(|(a, b)| a != b).count() + got.len().abs_diff(want.len());
        (bad as f64, bad == 0)
    } else {
        let e = rel_l2(got, want);
        (e, e <= tol.rel_l2)
    };
    OutputCheck { name: name.into(), error, exact, pass, backward: false }
}

/// Routes per expert of every step, compared exactly with `want` (`[steps, E]` flat).
fn counts_check(name: &str, got: &[Vec<i64>], want: &[f64], trace: &str) -> Result<OutputCheck> {
    let flat: Vec<f64> = got.iter().flatten().map(|&c| c as f64).collect();
    if flat.len() != want.len() {
        return Err(Error::case(
            trace,
            format!("expected `{name}` has {} values; the run produced {} (steps × experts)", want.len(), flat.len()),
        ));
    }
    let bad = flat.iter().zip(want).filter(|(a, b)| a != b).count();
    Ok(OutputCheck { name: name.into(), error: bad as f64, exact: true, pass: bad == 0, backward: false })
}

/// Runs one trace folder on backend `b` and compares it.
pub fn run_trace<B: Backend>(b: &B, dir: &Path) -> Result<CaseResult> {
    Trace::load(dir)?.run(b, None)
}
