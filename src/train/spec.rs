//! What an optimizer runs: the update rule and its hyperparameters ([`Hyper`], one
//! parameter group's), and the optimizer as a DeepSpeed config asks for it
//! ([`OptimizerSpec`]).
//!
//! # DeepSpeed's `optimizer` section
//!
//! ```json
//! "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}},
//! "gradient_clipping": 1.0
//! ```
//!
//! Read as DeepSpeed 0.19.8's `DeepSpeedEngine._configure_basic_optimizer` reads it, for
//! the three types the engine steps (names case-insensitive):
//!
//! - `Adam`: AdamW unless `params.adam_w_mode` is false (DeepSpeed's default is true, so
//!   its "Adam" decouples the weight decay); then Adam with L2 weight decay added to the
//!   gradient, as `torch.optim.Adam`.
//! - `AdamW`: AdamW whatever `adam_w_mode` says (DeepSpeed ignores it for this type).
//! - `SGD`: `torch.optim.SGD` (`momentum`, `dampening`, `nesterov`, `weight_decay`).
//!   DeepSpeed itself looks this one up as `getattr(torch.optim, type)`, so it needs the
//!   exact spelling `SGD`; here any case is accepted.
//!
//! Defaults for absent parameters are those of the class DeepSpeed would build: for Adam
//! and AdamW its `FusedAdam` (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0), or
//! with `torch_adam: true` torch's own classes (the same, except `torch.optim.AdamW`'s
//! weight decay 0.01); for SGD torch's (lr 1e-3, no momentum, dampening or decay).
//!
//! What is computed is torch.optim's arithmetic ([`crate::ops::StepRule`]) whichever class
//! DeepSpeed would pick: `FusedAdam` and `DeepSpeedCPUAdam` compute the same update with
//! other f32 roundings. Settings that only choose an implementation (`torch_adam`,
//! `foreach`, `fused`, `capturable`, `differentiable`) are accepted and change nothing
//! else; settings the engine does not implement (`amsgrad`, `maximize`, no
//! `bias_correction`, bf16 optimizer states) are errors, as is `max_grad_norm`, which
//! DeepSpeed refuses in favour of the top-level `gradient_clipping`.

use crate::error::{Error, Result};
use crate::ops::{StepKind, StepRule};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// DeepSpeed 0.19.8's `gradient_clipping` when the config leaves it out
/// (`GRADIENT_CLIPPING_DEFAULT`: clipping is on by default).
pub const DEEPSPEED_GRADIENT_CLIPPING: f64 = 1.0;

/// One parameter group's update rule and hyperparameters: a torch.optim `param_groups`
/// entry less its parameters. Fields a rule does not use are ignored by it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyper {
    /// SGD, Adam (L2 weight decay) or AdamW (decoupled weight decay).
    pub kind: StepKind,
    /// Learning rate.
    pub lr: f64,
    /// Adam β₁, β₂.
    pub betas: (f64, f64),
    /// Adam ε (outside the square root).
    pub eps: f64,
    /// Weight decay: added to the gradient (SGD, Adam) or decoupled (AdamW).
    pub weight_decay: f64,
    /// SGD momentum (0: none).
    pub momentum: f64,
    /// SGD dampening.
    pub dampening: f64,
    /// SGD Nesterov momentum.
    pub nesterov: bool,
}

impl Hyper {
    /// `torch.optim.SGD(lr=lr)`: no momentum, dampening or weight decay.
    pub fn sgd(lr: f64) -> Self {
        Hyper {
            kind: StepKind::Sgd,
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
        }
    }

    /// `torch.optim.Adam(lr=lr)`: betas (0.9, 0.999), eps 1e-8, no weight decay.
    pub fn adam(lr: f64) -> Self {
        Hyper { kind: StepKind::Adam, ..Hyper::sgd(lr) }
    }

    /// `torch.optim.AdamW(lr=lr)`: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    pub fn adamw(lr: f64) -> Self {
        Hyper { kind: StepKind::AdamW, weight_decay: 0.01, ..Hyper::sgd(lr) }
    }

    /// The rule of step `step` (from 1) with the gradient multiplied by `grad_scale`.
    pub fn rule(&self, step: u64, grad_scale: f64) -> StepRule {
        StepRule {
            kind: self.kind,
            lr: self.lr,
            weight_decay: self.weight_decay,
            momentum: self.momentum,
            dampening: self.dampening,
            nesterov: self.nesterov,
            beta1: self.betas.0,
            beta2: self.betas.1,
            eps: self.eps,
            step,
            grad_scale,
        }
    }

    /// Checks the hyperparameters as torch.optim's constructors do (errors name the
    /// field).
    pub fn validate(&self) -> Result<()> {
        self.rule(1, 1.0).validate()
    }

    /// Whether the rule keeps a first moment (Adam's `exp_avg`) or momentum buffer.
    pub fn has_m(&self) -> bool {
        self.rule(1, 1.0).has_m()
    }

    /// Whether the rule keeps a second moment (Adam's `exp_avg_sq`).
    pub fn has_v(&self) -> bool {
        self.rule(1, 1.0).has_v()
    }
}

/// An optimizer as a training config describes it: the hyperparameters every group
/// starts with (DeepSpeed copies the base group's into its expert group), and gradient
/// clipping by global norm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimizerSpec {
    /// The base group's rule and hyperparameters.
    pub hyper: Hyper,
    /// `max_norm` of `torch.nn.utils.clip_grad_norm_` over every parameter (0: no
    /// clipping).
    pub gradient_clipping: f64,
}

impl OptimizerSpec {
    /// An optimizer without gradient clipping.
    pub fn new(hyper: Hyper) -> Self {
        OptimizerSpec { hyper, gradient_clipping: 0.0 }
    }

    /// Checks the hyperparameters and the clipping norm.
    pub fn validate(&self) -> Result<()> {
        self.hyper.validate()?;
        let c = self.gradient_clipping;
        if !c.is_finite() || c < 0.0 {
            return Err(Error::config("gradient_clipping", format!("must be finite and >= 0, got {c}")));
        }
        Ok(())
    }

    /// Reads a whole DeepSpeed config (the JSON of `ds_config.json`): its `optimizer`
    /// section and its top-level `gradient_clipping` (DeepSpeed's default
    /// [`DEEPSPEED_GRADIENT_CLIPPING`] when absent; 0 turns it off). Other keys of the
    /// config are not this reader's business and are left alone.
    pub fn from_deepspeed_config(config: &Value) -> Result<Self> {
        let obj = config.as_object().ok_or_else(|| Error::config("(config)", "a DeepSpeed config is a JSON object"))?;
        let section = obj.get("optimizer").ok_or_else(|| Error::config("optimizer", "missing"))?;
        let mut spec = Self::from_deepspeed_optimizer(section)?;
        spec.gradient_clipping = match obj.get("gradient_clipping") {
            None => DEEPSPEED_GRADIENT_CLIPPING,
            Some(v) => typed(v, "gradient_clipping")?,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Reads a DeepSpeed `optimizer` section `{"type": ..., "params": {...}}` (see the
    /// module docs), without gradient clipping (a top-level key of the config).
    pub fn from_deepspeed_optimizer(section: &Value) -> Result<Self> {
        let sec = section.as_object().ok_or_else(|| Error::config("optimizer", "must be a JSON object"))?;
        if let Some(k) = sec.keys().find(|k| !["type", "params", "legacy_fusion"].contains(&k.as_str())) {
            return Err(Error::config(format!("optimizer.{k}"), "unknown key (type, params, legacy_fusion)"));
        }
        let ty: String =
            typed(sec.get("type").ok_or_else(|| Error::config("optimizer.type", "missing"))?, "optimizer.type")?;
        if let Some(v) = sec.get("legacy_fusion") {
            typed::<bool>(v, "optimizer.legacy_fusion")?;
        }
        let empty = Map::new();
        let params = match sec.get("params") {
            None => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => return Err(Error::config("optimizer.params", "must be a JSON object")),
        };
        let p = Params(params);
        if params.contains_key("max_grad_norm") {
            return Err(Error::config(
                "optimizer.params.max_grad_norm",
                "not supported as an optimizer parameter (as in DeepSpeed): use the top-level `gradient_clipping`",
            ));
        }
        let hyper = match ty.to_ascii_lowercase().as_str() {
            name @ ("adam" | "adamw") => {
                p.only(&[
                    "lr",
                    "betas",
                    "eps",
                    "weight_decay",
                    "adam_w_mode",
                    "torch_adam",
                    "bias_correction",
                    "amsgrad",
                    "maximize",
                    "foreach",
                    "fused",
                    "capturable",
                    "differentiable",
                    "fp32_optimizer_states",
                ])?;
                let adam_w_mode: bool = p.get("adam_w_mode")?.unwrap_or(true);
                let torch_adam: bool = p.get("torch_adam")?.unwrap_or(false);
                p.require("bias_correction", true, "the engine always corrects the moments' bias")?;
                p.require("amsgrad", false, "AMSGrad is not implemented")?;
                p.require("maximize", false, "maximizing is not implemented")?;
                p.require("fp32_optimizer_states", true, "optimizer states are kept in f32")?;
                for k in ["foreach", "fused", "capturable", "differentiable"] {
                    p.flag(k)?;
                }
                let kind = if name == "adamw" || adam_w_mode { StepKind::AdamW } else { StepKind::Adam };
                // FusedAdam's default decay is 0; torch.optim.AdamW's is 0.01.
                let wd_default = if torch_adam && kind == StepKind::AdamW { 0.01 } else { 0.0 };
                let betas: [f64; 2] = p.get("betas")?.unwrap_or([0.9, 0.999]);
                Hyper {
                    kind,
                    lr: p.get("lr")?.unwrap_or(1e-3),
                    betas: (betas[0], betas[1]),
                    eps: p.get("eps")?.unwrap_or(1e-8),
                    weight_decay: p.get("weight_decay")?.unwrap_or(wd_default),
                    ..Hyper::sgd(0.0)
                }
            }
            "sgd" => {
                p.only(&[
                    "lr",
                    "momentum",
                    "dampening",
                    "weight_decay",
                    "nesterov",
                    "maximize",
                    "foreach",
                    "fused",
                    "differentiable",
                ])?;
                p.require("maximize", false, "maximizing is not implemented")?;
                for k in ["foreach", "fused", "differentiable"] {
                    p.flag(k)?;
                }
                Hyper {
                    lr: p.get("lr")?.unwrap_or(1e-3),
                    momentum: p.get("momentum")?.unwrap_or(0.0),
                    dampening: p.get("dampening")?.unwrap_or(0.0),
                    weight_decay: p.get("weight_decay")?.unwrap_or(0.0),
                    nesterov: p.get("nesterov")?.unwrap_or(false),
                    ..Hyper::sgd(0.0)
                }
            }
            _ => {
                return Err(Error::config(
                    "optimizer.type",
                    format!("`{ty}` is not an optimizer the engine steps (Adam, AdamW, SGD)"),
                ))
            }
        };
        hyper.validate().map_err(|e| match e {
            Error::Config { field, msg } => Error::config(format!("optimizer.params.{field}"), msg),
            other => other,
        })?;
        Ok(OptimizerSpec::new(hyper))
    }
}

/// `v` as `T`, naming `field` when it is null or mistyped.
fn typed<T: DeserializeOwned>(v: &Value, field: &str) -> Result<T> {
    if v.is_null() {
        return Err(Error::config(field, "is null: give a value or leave the key out for the default"));
    }
    serde_json::from_value(v.clone()).map_err(|e| Error::config(field, format!("{e} (got {v})")))
}

/// An optimizer's `params` object; errors name `optimizer.params.<key>`.
struct Params<'a>(&'a Map<String, Value>);

impl Params<'_> {
    /// Errors on the first key not in `known`.
    fn only(&self, known: &[&str]) -> Result<()> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => {
                Err(Error::config(format!("optimizer.params.{k}"), format!("unknown key ({})", known.join(", "))))
            }
            None => Ok(()),
        }
    }

    /// The value of `key` as `T`, None when absent.
    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.0.get(key).map(|v| typed(v, &format!("optimizer.params.{key}"))).transpose()
    }

    /// Checks an implementation choice: absent, null (torch's `None`: its default) or a
    /// bool.
    fn flag(&self, key: &str) -> Result<()> {
        match self.0.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(_)) => Ok(()),
            Some(v) => {
                Err(Error::config(format!("optimizer.params.{key}"), format!("must be true, false or null, got {v}")))
            }
        }
    }

    /// Errors unless `key` is absent or `want`.
    fn require(&self, key: &str, want: bool, why: &str) -> Result<()> {
        match self.get::<bool>(key)? {
            Some(v) if v != want => Err(Error::config(format!("optimizer.params.{key}"), format!("{v}: {why}"))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<OptimizerSpec> {
        OptimizerSpec::from_deepspeed_config(&v)
    }

    #[test]
    fn deepspeed_adam_is_adamw_unless_adam_w_mode_is_false() {
        let s = parse(json!({"optimizer": {"type": "Adam", "params": {"lr": 0.01}}})).unwrap();
        assert_eq!(s.hyper.kind, StepKind::AdamW);
        assert_eq!(s.hyper.lr, 0.01);
        assert_eq!(s.hyper.weight_decay, 0.0);
        assert_eq!(s.gradient_clipping, DEEPSPEED_GRADIENT_CLIPPING);
        let s = parse(json!({"optimizer": {"type": "adam", "params": {"adam_w_mode": false}}, "gradient_clipping": 0}))
            .unwrap();
        assert_eq!(s.hyper.kind, StepKind::Adam);
        assert_eq!(s.gradient_clipping, 0.0);
        let s = parse(json!({"optimizer": {"type": "ADAMW", "params": {"adam_w_mode": false}}})).unwrap();
        assert_eq!(s.hyper.kind, StepKind::AdamW);
        let s = parse(json!({"optimizer": {"type": "AdamW", "params": {"torch_adam": true}}})).unwrap();
        assert_eq!(s.hyper.weight_decay, 0.01);
        let s = parse(json!({"optimizer": {"type": "AdamW", "params": {"betas": [0.8, 0.95], "eps": 1e-6}}})).unwrap();
        assert_eq!((s.hyper.betas, s.hyper.eps), ((0.8, 0.95), 1e-6));
    }

    #[test]
    fn deepspeed_sgd_reads_torch_arguments() {
        let s = parse(json!({"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": true}}}))
            .unwrap();
        assert_eq!(s.hyper.kind, StepKind::Sgd);
        assert_eq!((s.hyper.lr, s.hyper.momentum, s.hyper.nesterov), (0.1, 0.9, true));
    }

    #[test]
    fn bad_sections_name_the_field() {
        let field = |v: Value| match parse(v).unwrap_err() {
            Error::Config { field, .. } => field,
            e => panic!("{e}"),
        };
        assert_eq!(field(json!({})), "optimizer");
        assert_eq!(field(json!({"optimizer": {"params": {}}})), "optimizer.type");
        assert_eq!(field(json!({"optimizer": {"type": "Lamb"}})), "optimizer.type");
        assert_eq!(field(json!({"optimizer": {"type": "Adam", "params": {"lr": "high"}}})), "optimizer.params.lr");
        assert_eq!(field(json!({"optimizer": {"type": "Adam", "params": {"lr": null}}})), "optimizer.params.lr");
        assert_eq!(field(json!({"optimizer": {"type": "Adam", "params": {"betas": [0.9]}}})), "optimizer.params.betas");
        assert_eq!(field(json!({"optimizer": {"type": "Adam", "params": {"lr": -1.0}}})), "optimizer.params.lr");
        assert_eq!(
            field(json!({"optimizer": {"type": "Adam", "params": {"momentum": 0.9}}})),
            "optimizer.params.momentum"
        );
        assert_eq!(
            field(json!({"optimizer": {"type": "Adam", "params": {"amsgrad": true}}})),
            "optimizer.params.amsgrad"
        );
        assert_eq!(
            field(json!({"optimizer": {"type": "Adam", "params": {"max_grad_norm": 1.0}}})),
            "optimizer.params.max_grad_norm"
        );
        assert_eq!(
            field(json!({"optimizer": {"type": "SGD", "params": {"nesterov": true}}})),
            "optimizer.params.nesterov"
        );
        assert_eq!(
            field(json!({"optimizer": {"type": "SGD", "params": {"betas": [0.9, 0.9]}}})),
            "optimizer.params.betas"
        );
        assert_eq!(field(json!({"optimizer": {"type": "SGD"}, "gradient_clipping": -1})), "gradient_clipping");
        assert_eq!(field(json!({"optimizer": {"type": "SGD", "extra": 1}})), "optimizer.extra");
        assert_eq!(field(json!({"optimizer": {"type": "SGD", "params": [1]}})), "optimizer.params");
    }
}
