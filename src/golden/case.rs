//! A golden case folder as typed data: `case.json` (see `tests/golden/FORMAT.md`) parsed
//! into [`CaseMeta`] with every key known, its tensors, and the checks that make a
//! malformed case an error naming what is wrong instead of a run that compares nothing.

use crate::config::Mode;
use crate::error::{Error, Result};
use crate::import::hf::Family;
use crate::import::Checkpoint;
use crate::tensor::HostTensor;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The case format this engine reads.
pub const FORMAT: u32 = 1;

/// What a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaseKind {
    /// DeepSpeed `TopKGate` on its own (`deepspeed.gate`).
    DeepSpeedGate,
    /// A DeepSpeed `MoE` layer (`deepspeed.moe`).
    DeepSpeedMoe,
    /// A DeepSpeed `MoE` layer read from a DeepSpeed checkpoint folder
    /// (`deepspeed.checkpoint`, see [`super::ds_checkpoint`]).
    DeepSpeedCheckpoint,
    /// An HF transformers MoE block (`hf.<model_type>`).
    Hf(Family),
    /// The MoE block of one layer of a model folder transformers wrote (`hf.model`).
    HfModel,
}

impl TryFrom<String> for CaseKind {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        match s.as_str() {
            "deepspeed.gate" => Ok(CaseKind::DeepSpeedGate),
            "deepspeed.moe" => Ok(CaseKind::DeepSpeedMoe),
            "hf.model" => Ok(CaseKind::HfModel),
            "deepspeed.checkpoint" => Ok(CaseKind::DeepSpeedCheckpoint),
            _ => match s.strip_prefix("hf.").map(Family::from_model_type) {
                Some(Ok(f)) => Ok(CaseKind::Hf(f)),
                _ => Err(format!(
                    "unknown case kind `{s}` (deepspeed.gate, deepspeed.moe, deepspeed.checkpoint, hf.model, hf.<model_type> of a supported family)"
                )),
            },
        }
    }
}

impl<'de> Deserialize<'de> for CaseKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        CaseKind::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl CaseKind {
    /// The kind as `case.json` writes it.
    pub fn name(self) -> String {
        match self {
            CaseKind::DeepSpeedGate => "deepspeed.gate".into(),
            CaseKind::DeepSpeedMoe => "deepspeed.moe".into(),
            CaseKind::DeepSpeedCheckpoint => "deepspeed.checkpoint".into(),
            CaseKind::Hf(f) => format!("hf.{}", f.model_type()),
            CaseKind::HfModel => "hf.model".into(),
        }
    }

    /// The outputs a run of this kind produces.
    pub fn outputs(self) -> &'static [Output] {
        match self {
            CaseKind::DeepSpeedGate => {
                &[Output::Indices, Output::Locations, Output::Gates, Output::Capacity, Output::ExpCounts, Output::LAux]
            }
            CaseKind::HfModel => &[Output::Y, Output::RouterLogits],
            _ => &[Output::Y, Output::RouterLogits, Output::LAux, Output::ExpCounts],
        }
    }
}

/// An output a case may compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// Layer output.
    Y,
    /// `x · Wgᵀ` in f32.
    RouterLogits,
    /// The auxiliary loss.
    LAux,
    /// Routes per expert before capacity.
    ExpCounts,
    /// DeepSpeed sparse routes: expert per route, −1 where dropped.
    Indices,
    /// Slot of every route (compared where kept).
    Locations,
    /// Combine weight of every route (compared where kept).
    Gates,
    /// The capacity in force.
    Capacity,
}

impl Output {
    /// The name `case.json` uses.
    pub fn name(self) -> &'static str {
        match self {
            Output::Y => "y",
            Output::RouterLogits => "router_logits",
            Output::LAux => "l_aux",
            Output::ExpCounts => "exp_counts",
            Output::Indices => "indices",
            Output::Locations => "locations",
            Output::Gates => "gates",
            Output::Capacity => "capacity",
        }
    }
}

/// The case's inputs: tensor keys.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inputs {
    /// Tokens × hidden, or batch × seq × hidden.
    pub x: String,
    /// DeepSpeed `used_token` mask.
    #[serde(default)]
    pub used_token: Option<String>,
}

/// The reference's random draws, replayed: tensor keys.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Noise {
    /// Multiplicative gate-input jitter.
    #[serde(default)]
    pub jitter: Option<String>,
    /// Gumbel noise on the logits.
    #[serde(default)]
    pub gumbel: Option<String>,
    /// Random-token-selection priorities.
    #[serde(default)]
    pub rts_uniform: Option<String>,
}

/// How outputs are compared.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tolerance {
    /// Bound on ‖out − ref‖₂ / ‖ref‖₂ for float outputs.
    pub rel_l2: f64,
    /// Outputs that must match exactly.
    #[serde(default)]
    pub exact: Vec<Output>,
}

/// The loss whose gradients a case's `backward` block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Loss {
    /// `Σ y·dy`.
    #[serde(rename = "sum(y * dy)")]
    Dot,
    /// `Σ y·dy + aux_coef · l_aux`.
    #[serde(rename = "sum(y * dy) + aux_coef * l_aux")]
    DotPlusAux,
}

/// Expected gradients of a loss (FORMAT.md `backward`): tensor keys.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backward {
    /// The loss differentiated.
    pub loss: Loss,
    /// The weight of `l_aux` in the loss (needed by, and only by, [`Loss::DotPlusAux`]).
    #[serde(default)]
    pub aux_coef: Option<f64>,
    /// The upstream gradient of `y` (the shape of `x`).
    pub dy: String,
    /// The expected gradient of `x`.
    pub dx: String,
    /// Parameter name (without `param/`) → its expected gradient.
    pub params: BTreeMap<String, String>,
}

/// `case.json`, every key typed. Unknown keys are errors, except in `hf.model` cases,
/// whose other keys describe the model (family, notes, tensor lists) for people.
#[derive(Clone, Debug, Deserialize)]
pub struct CaseMeta {
    /// The format version ([`FORMAT`]).
    pub format: u32,
    /// What the case runs.
    pub kind: CaseKind,
    /// Case name (the folder name when absent).
    #[serde(default)]
    pub name: Option<String>,
    /// The reference function or class and its version.
    #[serde(default)]
    pub source: Option<String>,
    /// Which capacity factor applies and whether noise applies.
    pub mode: Mode,
    /// The reference's own configuration (`MoE(...)` keyword arguments or HF
    /// `config.json` fields), read by the importers.
    pub config: serde_json::Value,
    /// Input tensors.
    pub inputs: Inputs,
    /// Replayed noise.
    #[serde(default)]
    pub noise: Noise,
    /// Output → tensor key of the expected value.
    pub expected: BTreeMap<Output, String>,
    /// How outputs are compared.
    pub tolerance: Tolerance,
    /// Expected gradients (checked when the case loads; compared once the engine has a
    /// backward pass, reported as not compared until then).
    #[serde(default)]
    pub backward: Option<Backward>,
    /// A remark on how the values were computed.
    #[serde(default)]
    pub note: Option<String>,
    /// How the case's weights are laid out (documentation only).
    #[serde(default)]
    pub weights_layout: Option<String>,
    /// Where a `deepspeed.checkpoint` case's weights are.
    #[serde(default)]
    pub checkpoint: Option<super::ds_checkpoint::CheckpointRef>,
    /// `hf.model`: the model folder, relative to the case's.
    #[serde(default)]
    pub model_dir: Option<String>,
    /// `hf.model`: the decoder layer whose MoE block runs.
    #[serde(default)]
    pub layer: Option<usize>,
    /// Every other key: descriptions in `hf.model` cases, an error elsewhere.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl CaseMeta {
    /// Checks what the types cannot: the format, a non-empty set of outputs this kind
    /// produces, exact outputs among them, a sensible tolerance.
    pub fn validate(&self, case: &str) -> Result<()> {
        let bad = |msg: String| Err(Error::case(case, msg));
        if self.format != FORMAT {
            return bad(format!("format {} is not the format {FORMAT} this engine reads", self.format));
        }
        let model_case = self.kind == CaseKind::HfModel;
        if let Some(k) = self.other.keys().next().filter(|_| !model_case) {
            return bad(format!(
                "unknown key `{k}` in case.json (FORMAT.md lists the keys of a {} case)",
                self.kind.name()
            ));
        }
        match (model_case, &self.model_dir, self.layer) {
            (true, Some(_), Some(_)) | (false, None, None) => {}
            (true, _, _) => return bad("an hf.model case needs `model_dir` and `layer`".into()),
            (false, _, _) => {
                return bad(format!("`model_dir` / `layer` belong to hf.model cases, not {}", self.kind.name()))
            }
        }
        if self.expected.is_empty() {
            return bad("`expected` names no outputs: nothing would be compared".into());
        }
        let produced = self.kind.outputs();
        if let Some(o) = self.expected.keys().find(|o| !produced.contains(o)) {
            return bad(format!("`expected.{}`: a {} case produces no such output", o.name(), self.kind.name()));
        }
        if let Some(o) = self.tolerance.exact.iter().find(|o| !self.expected.contains_key(o)) {
            return bad(format!("`tolerance.exact` names `{}`, which `expected` does not list", o.name()));
        }
        let tol = self.tolerance.rel_l2;
        if !(tol.is_finite() && (0.0..1.0).contains(&tol)) {
            return bad(format!("`tolerance.rel_l2` must be in [0, 1), got {tol}"));
        }
        if let Some(b) = &self.backward {
            match (b.loss, b.aux_coef) {
                (Loss::DotPlusAux, Some(c)) if c.is_finite() => {}
                (Loss::DotPlusAux, c) => return bad(format!("`backward.aux_coef` must be a finite number, got {c:?}")),
                (Loss::Dot, Some(_)) => return bad("`backward.aux_coef` is given but the loss has no aux term".into()),
                (Loss::Dot, None) => {}
            }
            if b.params.is_empty() {
                return bad("`backward.params` names no parameters".into());
            }
        }
        super::ds_checkpoint::validate(self, case)?;
        let masked = [Output::Locations, Output::Gates].iter().any(|o| self.expected.contains_key(o));
        if masked && !self.expected.contains_key(&Output::Indices) {
            return bad(
                "`expected.locations` / `gates` are compared where routes were kept: `indices` is needed".into()
            );
        }
        Ok(())
    }
}

/// A loaded case: its metadata and tensors.
pub struct Case {
    /// Case name.
    pub name: String,
    /// The case's folder.
    pub dir: std::path::PathBuf,
    /// The metadata.
    pub meta: CaseMeta,
    /// Every tensor of `tensors.safetensors`.
    pub tensors: Checkpoint,
}

impl Case {
    /// Reads and checks `dir/case.json` and `dir/tensors.safetensors`; every tensor the
    /// metadata names must be there.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("case.json");
        let folder = dir.display().to_string();
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
        let not_format = |e: serde_json::Error| Error::Case {
            case: folder.clone(),
            msg: "case.json does not follow FORMAT.md".into(),
            source: Some(Box::new(e)),
        };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(not_format)?;
        // serde reads a struct from a JSON array too; FORMAT.md's sections are objects.
        for key in ["inputs", "noise", "tolerance", "expected", "config", "backward"] {
            if value.get(key).is_some_and(|v| !v.is_object()) {
                return Err(Error::case(&folder, format!("`{key}` must be a JSON object")));
            }
        }
        let meta: CaseMeta = serde_json::from_value(value).map_err(not_format)?;
        let name = meta.name.clone().unwrap_or_else(|| folder.clone());
        meta.validate(&name)?;
        let tensors = Checkpoint::load(&dir.join("tensors.safetensors"))?;
        let case = Case { name, dir: dir.to_path_buf(), meta, tensors };
        case.check_tensors()?;
        Ok(case)
    }

    /// Every tensor the metadata names is there and finite (a NaN in an expected value
    /// would otherwise hide where routes are masked); every other tensor is a parameter;
    /// the backward block's tensors have the shapes of what they are gradients of.
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
        let x = self.checked_x()?.shape();
        if let Some(b) = &self.meta.backward {
            for (what, key) in [("backward.dy", &b.dy), ("backward.dx", &b.dx)] {
                self.tensor(key)?.expect_shape(what, x)?;
            }
            for (param, grad) in &b.params {
                let p = self.tensors.get(&format!("param/{param}")).map_err(|_| {
                    Error::case(&self.name, format!("`backward.params` names `{param}`, which is no parameter"))
                })?;
                self.tensor(grad)?.expect_shape(&format!("backward.params.{param}"), p.shape())?;
            }
        }
        Ok(())
    }

    /// Every tensor the metadata names: the case.json field (as errors name it) and the key.
    fn named(&self) -> Vec<(String, &str)> {
        let m = &self.meta;
        let mut out: Vec<(String, &str)> = vec![("inputs.x".into(), &m.inputs.x)];
        let optional = [
            ("used_token", &m.inputs.used_token),
            ("noise.jitter", &m.noise.jitter),
            ("noise.gumbel", &m.noise.gumbel),
            ("noise.rts_uniform", &m.noise.rts_uniform),
        ];
        out.extend(optional.into_iter().filter_map(|(f, k)| k.as_deref().map(|k| (f.to_string(), k))));
        out.extend(m.expected.iter().map(|(o, k)| (format!("expected.{}", o.name()), k.as_str())));
        if let Some(b) = &m.backward {
            out.push(("backward.dy".into(), &b.dy));
            out.push(("backward.dx".into(), &b.dx));
            out.extend(b.params.iter().map(|(p, k)| (format!("backward.params.{p}"), k.as_str())));
        }
        out
    }

    /// The tensor under `key`.
    pub fn tensor(&self, key: &str) -> Result<&HostTensor> {
        self.tensors.get(key)
    }

    /// The input tokens: f32, `[S, M]` or `[B, T, M]`, finite (M is checked against the
    /// layer when it runs).
    pub fn x(&self) -> Result<HostTensor> {
        self.checked_x().cloned()
    }

    /// `inputs.x` checked as [`Case::x`] describes, borrowed.
    fn checked_x(&self) -> Result<&HostTensor> {
        let x = self.tensor(&self.meta.inputs.x)?;
        x.as_f32("inputs.x")?;
        if !(2..=3).contains(&x.shape().len()) {
            return Err(Error::shape("inputs.x", "[tokens, hidden] or [batch, seq, hidden]", x.shape()));
        }
        x.check_finite("inputs.x")?;
        Ok(x)
    }

    /// The case's parameters under their reference names (without `param/`).
    pub fn params(&self) -> Checkpoint {
        self.tensors.renamed(|n| n.strip_prefix("param/").map(str::to_string), &format!("{} params", self.name))
    }
}
