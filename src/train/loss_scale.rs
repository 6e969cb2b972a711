//! Loss scaling for half-precision training, as DeepSpeed 0.19.8 configures and runs it.
//!
//! # DeepSpeed's `fp16` and `bf16` sections
//!
//! ```json
//! "fp16": {"enabled": true, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
//!          "hysteresis": 2, "consecutive_hysteresis": false, "min_loss_scale": 1}
//! "bf16": {"enabled": true}
//! ```
//!
//! [`Precision::from_deepspeed_config`] reads them as `DeepSpeedFP16Config` and
//! `DeepSpeedBF16Config` (deepspeed/runtime/precision_config.py) do: `loss_scale` 0 is
//! dynamic loss scaling starting at `2^initial_scale_power` ([`DynamicLossScaler`]), a
//! positive `loss_scale` a static scale; bf16 trains without loss scaling (scale 1). As in
//! DeepSpeed's ZeRO optimizers, a non-finite gradient norm skips the step in both
//! (bf16's `check_grad_overflow`, true by default, turns that off); with dynamic
//! scaling the skip also updates the scale.
//!
//! # The step
//!
//! The caller multiplies the loss gradient by [`LossScaler::loss_scale`] (`b.scale(&dy,
//! scale)`: the backward is linear in it), the optimizer measures the global norm of the
//! scaled gradients, and:
//!
//! - a norm that is not finite is an overflow: the step is skipped (parameters, state and
//!   step counts unchanged) and the scaler told ([`DynamicLossScaler::update_scale`]);
//! - otherwise the scaler is told there was none, the gradients are un-scaled through the
//!   step's `grad_scale` (never in place), and gradient clipping is computed on the
//!   un-scaled norm, `norm / scale`, as DeepSpeed's `unscale_and_clip_grads` does.
//!
//! [`DynamicLossScaler::update_scale`] is DeepSpeed's `DynamicLossScaler.update_scale`
//! line for line (deepspeed/runtime/fp16/loss_scaler.py), including the error it raises
//! for an overflow at the minimum scale once hysteresis is used up.

use crate::error::{Error, Result};
use crate::tensor::DType;
use serde_json::{Map, Value};

/// DeepSpeed's dynamic loss scaler (`DynamicLossScaler`): the scale halves on an overflow
/// once `hysteresis` overflows have been absorbed (never below `min_scale`), and doubles
/// after `scale_window` steps without one.
#[derive(Clone, Debug, PartialEq)]
pub struct DynamicLossScaler {
    cur_scale: f64,
    cur_iter: u64,
    /// The iteration of the last overflow (−1: none yet).
    last_overflow_iter: i64,
    scale_factor: f64,
    scale_window: u64,
    min_scale: f64,
    delayed_shift: u32,
    cur_hysteresis: u32,
    consecutive_hysteresis: bool,
    raise_error_at_min_scale: bool,
}

impl DynamicLossScaler {
    /// A scaler as `DynamicLossScaler(init_scale, scale_window, min_scale, delayed_shift,
    /// consecutive_hysteresis)` builds it (scale factor 2, raising an error at the minimum
    /// scale, as DeepSpeed's `CreateLossScaler` makes it). The scale must be positive and
    /// finite in f32 (it multiplies f32 gradients), the window and hysteresis at least 1
    /// and the minimum scale positive; errors name the DeepSpeed field.
    pub fn new(
        init_scale: f64,
        scale_window: u64,
        min_scale: f64,
        hysteresis: u32,
        consecutive_hysteresis: bool,
    ) -> Result<Self> {
        let f32_scale = |v: f64| v.is_finite() && v > 0.0 && (v as f32).is_finite() && v as f32 > 0.0;
        if !f32_scale(init_scale) {
            return Err(Error::config(
                "fp16.initial_scale_power",
                format!("the scale {init_scale} is not a positive f32"),
            ));
        }
        if scale_window == 0 {
            return Err(Error::config("fp16.loss_scale_window", "must be > 0 when dynamic loss scaling is enabled"));
        }
        if !(min_scale.is_finite() && min_scale > 0.0) {
            return Err(Error::config("fp16.min_loss_scale", format!("must be > 0, got {min_scale}")));
        }
        if hysteresis == 0 {
            return Err(Error::config("fp16.hysteresis", "must be at least 1 (0 would never lower the scale)"));
        }
        Ok(DynamicLossScaler {
            cur_scale: init_scale,
            cur_iter: 0,
            last_overflow_iter: -1,
            scale_factor: 2.0,
            scale_window,
            min_scale,
            delayed_shift: hysteresis,
            cur_hysteresis: hysteresis,
            consecutive_hysteresis,
            raise_error_at_min_scale: true,
        })
    }

    /// DeepSpeed's defaults: `2^16`, window 1000, minimum 1, hysteresis 2, not consecutive.
    pub fn deepspeed_default() -> Self {
        DynamicLossScaler {
            cur_scale: 65536.0,
            cur_iter: 0,
            last_overflow_iter: -1,
            scale_factor: 2.0,
            scale_window: 1000,
            min_scale: 1.0,
            delayed_shift: 2,
            cur_hysteresis: 2,
            consecutive_hysteresis: false,
            raise_error_at_min_scale: true,
        }
    }

    /// The current scale (`cur_scale`).
    pub fn loss_scale(&self) -> f64 {
        self.cur_scale
    }

    /// Iterations seen (`cur_iter`): one per [`DynamicLossScaler::update_scale`].
    pub fn iteration(&self) -> u64 {
        self.cur_iter
    }

    /// The iteration of the last overflow (`last_overflow_iter`; −1 before the first).
    pub fn last_overflow_iteration(&self) -> i64 {
        self.last_overflow_iter
    }

    /// Overflows still absorbed before the scale is lowered (`cur_hysteresis`).
    pub fn hysteresis(&self) -> u32 {
        self.cur_hysteresis
    }

    /// The minimum scale (`min_scale`).
    pub fn min_scale(&self) -> f64 {
        self.min_scale
    }

    /// Steps without overflow before the scale grows (`scale_window`).
    pub fn scale_window(&self) -> u64 {
        self.scale_window
    }

    /// Sets the scaler's running state, as a saved optimizer state holds it (see
    /// `Optimizer::save`): the scale (positive, finite), the iterations seen, the last
    /// overflow's iteration (−1 for none, before the iterations seen) and the hysteresis
    /// left (1 to the configured hysteresis). Errors name the saved tensor.
    pub(crate) fn restore(&mut self, scale: f64, iteration: u64, last_overflow: i64, hysteresis: u32) -> Result<()> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::config("loss_scaler.scale", format!("must be positive and finite, got {scale}")));
        }
        if last_overflow < -1 || (last_overflow != -1 && last_overflow >= iteration as i64) {
            return Err(Error::config(
                "loss_scaler.last_overflow_iter",
                format!("{last_overflow} is not -1 or an iteration before {iteration}"),
            ));
        }
        if hysteresis == 0 || hysteresis > self.delayed_shift {
            return Err(Error::config(
                "loss_scaler.hysteresis",
                format!("{hysteresis} is outside 1..={} (the configured hysteresis)", self.delayed_shift),
            ));
        }
        self.cur_scale = scale;
        self.cur_iter = iteration;
        self.last_overflow_iter = last_overflow;
        self.cur_hysteresis = hysteresis;
        Ok(())
    }

    /// `DynamicLossScaler.update_scale(overflow)`. On an overflow: when hysteresis is used
    /// up (`delayed_shift == 1` or `cur_hysteresis == 1`) the scale becomes
    /// `max(scale / 2, min_scale)`, or, already at `min_scale`, this is an error (DeepSpeed
    /// raises "Current loss scale already at minimum"); otherwise one hysteresis is used;
    /// either way the overflow's iteration is remembered. Without one: hysteresis is
    /// refilled (every step when consecutive, else at each growth) and the scale doubles
    /// when the steps since the last overflow, less one, are a positive multiple of the
    /// window. The iteration count advances in every case but the error.
    pub fn update_scale(&mut self, overflow: bool) -> Result<()> {
        if overflow {
            if self.delayed_shift == 1 || self.cur_hysteresis == 1 {
                if self.cur_scale == self.min_scale && self.raise_error_at_min_scale {
                    return Err(Error::Precondition(format!(
                        "gradient overflow at the minimum loss scale {} with its hysteresis used up: DeepSpeed \
                         stops the run here (\"Current loss scale already at minimum - cannot decrease scale \
                         anymore\")",
                        self.min_scale
                    )));
                }
                self.cur_scale = (self.cur_scale / self.scale_factor).max(self.min_scale);
            } else {
                self.cur_hysteresis -= 1;
            }
            self.last_overflow_iter = self.cur_iter as i64;
        } else {
            if self.consecutive_hysteresis {
                self.cur_hysteresis = self.delayed_shift;
            }
            let stable_interval = self.cur_iter as i64 - self.last_overflow_iter - 1;
            if stable_interval > 0 && (stable_interval as u64).is_multiple_of(self.scale_window) {
                if !self.consecutive_hysteresis {
                    self.cur_hysteresis = self.delayed_shift;
                }
                self.cur_scale *= self.scale_factor;
            }
        }
        self.cur_iter += 1;
        Ok(())
    }
}

/// How the gradients of a step are scaled: a fixed scale (1 for bf16) or DeepSpeed's
/// dynamic scaler. Either way a non-finite gradient norm skips the step (see the module
/// docs); an [`crate::train::Optimizer`] holding one applies it.
#[derive(Clone, Debug, PartialEq)]
pub enum LossScaler {
    /// A fixed scale: fp16's `loss_scale > 0`, or 1 for bf16.
    Static(f64),
    /// fp16's `loss_scale: 0`.
    Dynamic(DynamicLossScaler),
}

impl LossScaler {
    /// The scale to multiply the loss gradient by for the next step.
    pub fn loss_scale(&self) -> f64 {
        match self {
            LossScaler::Static(s) => *s,
            LossScaler::Dynamic(d) => d.loss_scale(),
        }
    }

    /// Tells the scaler whether the step overflowed (a static scale does not change).
    pub fn update(&mut self, overflow: bool) -> Result<()> {
        match self {
            LossScaler::Static(_) => Ok(()),
            LossScaler::Dynamic(d) => d.update_scale(overflow),
        }
    }
}

/// The precision a DeepSpeed config trains in: the weights' compute dtype and how the
/// loss is scaled.
#[derive(Clone, Debug, PartialEq)]
pub struct Precision {
    /// The storage dtype of the compute copies of the MLP weights (f32: no mixed
    /// precision).
    pub dtype: DType,
    /// The loss scaler (None: f32 training, or bf16 with `check_grad_overflow` off, where
    /// non-finite gradients are an error as in f32).
    pub scaler: Option<LossScaler>,
}

impl Precision {
    /// Reads a whole DeepSpeed config's `fp16` and `bf16` (or the older `bfloat16`)
    /// sections (see the module docs); other keys are left alone. Neither enabled is f32
    /// training; both is an error, as in DeepSpeed. Unknown keys, mistyped values and
    /// settings the engine does not implement (`auto_cast`, half-precision master weights
    /// or optimizer states) are errors naming the field.
    pub fn from_deepspeed_config(config: &Value) -> Result<Self> {
        let obj = config.as_object().ok_or_else(|| Error::config("(config)", "a DeepSpeed config is a JSON object"))?;
        let section = |key: &str| -> Result<Option<&Map<String, Value>>> {
            match obj.get(key) {
                None => Ok(None),
                Some(Value::Object(m)) => Ok(Some(m)),
                Some(_) => Err(Error::config(key, "must be a JSON object")),
            }
        };
        let fp16 = section("fp16")?;
        let (bf16_key, bf16) = match section("bf16")? {
            Some(m) => ("bf16", Some(m)),
            None => ("bfloat16", section("bfloat16")?),
        };
        let fp16_on = match fp16 {
            Some(m) => Section { name: "fp16", map: m }.bool("enabled")?.unwrap_or(false),
            None => false,
        };
        let bf16_on = match bf16 {
            Some(m) => Section { name: bf16_key, map: m }.bool("enabled")?.unwrap_or(false),
            None => false,
        };
        if fp16_on && bf16_on {
            return Err(Error::config("fp16.enabled", format!("fp16 and {bf16_key} cannot both be enabled")));
        }
        if let Some(m) = fp16 {
            let s = Section { name: "fp16", map: m };
            s.only(&[
                "enabled",
                "auto_cast",
                "loss_scale",
                "initial_scale_power",
                "loss_scale_window",
                "hysteresis",
                "consecutive_hysteresis",
                "min_loss_scale",
                "fp16_master_weights_and_grads",
            ])?;
            let loss_scale = match m.get("loss_scale") {
                None => 0.0,
                Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
                Some(v) => return Err(Error::config("fp16.loss_scale", format!("must be a number, got {v}"))),
            };
            if !loss_scale.is_finite() || loss_scale < 0.0 {
                return Err(Error::config("fp16.loss_scale", format!("must be finite and >= 0, got {loss_scale}")));
            }
            let power = s.int("initial_scale_power")?.unwrap_or(16);
            let window = s.int("loss_scale_window")?.unwrap_or(1000);
            let hysteresis = s.int("hysteresis")?.unwrap_or(2);
            let consecutive = s.bool("consecutive_hysteresis")?.unwrap_or(false);
            let min_scale = s.int("min_loss_scale")?.unwrap_or(1);
            if s.bool("auto_cast")?.unwrap_or(false) {
                return Err(Error::config("fp16.auto_cast", "casting the inputs to f16 is not implemented"));
            }
            if s.bool("fp16_master_weights_and_grads")?.unwrap_or(false) {
                return Err(Error::config("fp16.fp16_master_weights_and_grads", "master weights are kept in f32"));
            }
            if fp16_on {
                let scaler = if loss_scale > 0.0 {
                    if !(loss_scale as f32).is_finite() {
                        return Err(Error::config("fp16.loss_scale", format!("{loss_scale} is past the f32 range")));
                    }
                    LossScaler::Static(loss_scale)
                } else {
                    if !(-149..=127).contains(&power) {
                        return Err(Error::config(
                            "fp16.initial_scale_power",
                            format!("2^{power} is not a positive f32 (-149..=127)"),
                        ));
                    }
                    if window <= 0 {
                        return Err(Error::config(
                            "fp16.loss_scale_window",
                            "must be > 0 when dynamic loss scaling is enabled (loss_scale=0)",
                        ));
                    }
                    if min_scale <= 0 {
                        return Err(Error::config(
                            "fp16.min_loss_scale",
                            "must be > 0 when dynamic loss scaling is enabled (loss_scale=0)",
                        ));
                    }
                    let hysteresis = u32::try_from(hysteresis).map_err(|_| {
                        Error::config("fp16.hysteresis", format!("must be at least 1, got {hysteresis}"))
                    })?;
                    LossScaler::Dynamic(DynamicLossScaler::new(
                        2f64.powi(power as i32),
                        window as u64,
                        min_scale as f64,
                        hysteresis,
                        consecutive,
                    )?)
                };
                return Ok(Precision { dtype: DType::F16, scaler: Some(scaler) });
            }
        }
        if let Some(m) = bf16 {
            let s = Section { name: bf16_key, map: m };
            s.only(&[
                "enabled",
                "immediate_grad_update",
                "check_grad_overflow",
                "bf16_master_weights_and_grads",
                "bf16_optimizer_states",
            ])?;
            s.bool("immediate_grad_update")?;
            let check = s.bool("check_grad_overflow")?.unwrap_or(true);
            for key in ["bf16_master_weights_and_grads", "bf16_optimizer_states"] {
                if s.bool(key)?.unwrap_or(false) {
                    return Err(Error::config(
                        format!("{bf16_key}.{key}"),
                        "master weights and optimizer states are kept in f32",
                    ));
                }
            }
            if bf16_on {
                return Ok(Precision { dtype: DType::BF16, scaler: check.then_some(LossScaler::Static(1.0)) });
            }
        }
        Ok(Precision { dtype: DType::F32, scaler: None })
    }
}

/// One section of the config; errors name `<section>.<key>`.
struct Section<'a> {
    name: &'a str,
    map: &'a Map<String, Value>,
}

impl Section<'_> {
    fn field(&self, key: &str) -> String {
        format!("{}.{key}", self.name)
    }

    fn only(&self, known: &[&str]) -> Result<()> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(Error::config(self.field(k), format!("unknown key ({})", known.join(", ")))),
            None => Ok(()),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Error::config(self.field(key), format!("must be true or false, got {v}"))),
        }
    }

    /// An integer (a number with no fractional part, as pydantic's `int` takes it; not a
    /// bool).
    fn int(&self, key: &str) -> Result<Option<i64>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => Ok(Some(i)),
                (None, Some(f)) if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
                _ => Err(Error::config(self.field(key), format!("must be an integer, got {n}"))),
            },
            Some(v) => Err(Error::config(self.field(key), format!("must be an integer, got {v}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Runs `pattern` (1: overflow) through a scaler; `(scale, hysteresis)` after each
    /// update, or None where it errors (and stops).
    fn run(mut s: DynamicLossScaler, pattern: &str) -> Vec<Option<(f64, u32)>> {
        let mut out = Vec::new();
        for c in pattern.chars() {
            match s.update_scale(c == '1') {
                Ok(()) => out.push(Some((s.loss_scale(), s.hysteresis()))),
                Err(_) => {
                    out.push(None);
                    break;
                }
            }
        }
        out
    }

    fn some(v: &[(f64, u32)]) -> Vec<Option<(f64, u32)>> {
        v.iter().copied().map(Some).collect()
    }

    /// The expected sequences are what DeepSpeed 0.19.8's own `DynamicLossScaler`
    /// (deepspeed/runtime/fp16/loss_scaler.py, its class body run with the logging
    /// stubbed out) gives for the same patterns.
    #[test]
    fn updates_follow_deepspeeds_dynamic_loss_scaler() {
        let new = |init, window, min, hyst, consec| DynamicLossScaler::new(init, window, min, hyst, consec).unwrap();
        // Defaults: the first overflow only uses hysteresis, later ones halve.
        assert_eq!(
            run(DynamicLossScaler::deepspeed_default(), "000001000110"),
            some(&[
                (65536.0, 2),
                (65536.0, 2),
                (65536.0, 2),
                (65536.0, 2),
                (65536.0, 2),
                (65536.0, 1),
                (65536.0, 1),
                (65536.0, 1),
                (65536.0, 1),
                (32768.0, 1),
                (16384.0, 1),
                (16384.0, 1),
            ])
        );
        assert_eq!(DynamicLossScaler::deepspeed_default(), new(65536.0, 1000, 1.0, 2, false));
        // Window growth: after every `window` stable steps, refilling the hysteresis.
        assert_eq!(
            run(new(16.0, 3, 1.0, 2, false), "00000001000010000"),
            some(&[
                (16.0, 2),
                (16.0, 2),
                (16.0, 2),
                (32.0, 2),
                (32.0, 2),
                (32.0, 2),
                (64.0, 2),
                (64.0, 1),
                (64.0, 1),
                (64.0, 1),
                (64.0, 1),
                (128.0, 2),
                (128.0, 1),
                (128.0, 1),
                (128.0, 1),
                (128.0, 1),
                (256.0, 2),
            ])
        );
        // Hysteresis is not refilled between overflows unless the scale grew.
        assert_eq!(
            run(new(16.0, 3, 1.0, 2, false), "1001000011"),
            some(&[
                (16.0, 1),
                (16.0, 1),
                (16.0, 1),
                (8.0, 1),
                (8.0, 1),
                (8.0, 1),
                (8.0, 1),
                (16.0, 2),
                (16.0, 1),
                (8.0, 1),
            ])
        );
        // Consecutive hysteresis: refilled by every step without overflow.
        assert_eq!(
            run(new(16.0, 3, 1.0, 2, true), "101100001"),
            some(&[(16.0, 1), (16.0, 2), (16.0, 1), (8.0, 1), (8.0, 2), (8.0, 2), (8.0, 2), (16.0, 2), (16.0, 1)])
        );
        // The minimum: halving stops there, and an overflow at it is DeepSpeed's error.
        let mut v = some(&[(2.0, 1), (1.0, 1)]);
        v.push(None);
        assert_eq!(run(new(4.0, 100, 1.0, 1, false), "1111"), v);
        let mut v = some(&[(4.0, 2), (4.0, 1), (2.0, 1)]);
        v.push(None);
        assert_eq!(run(new(4.0, 2, 2.0, 3, false), "11111"), v);
        // A minimum that is not a power-of-two step away is reached through max().
        assert_eq!(run(new(5.0, 100, 2.0, 1, false), "11"), some(&[(2.5, 1), (2.0, 1)]));
        // The error leaves the scaler as it was.
        let mut s = new(1.0, 10, 1.0, 1, false);
        assert!(s.update_scale(true).is_err());
        assert_eq!((s.loss_scale(), s.iteration(), s.last_overflow_iteration()), (1.0, 0, -1));
    }

    fn field(v: Value) -> String {
        match Precision::from_deepspeed_config(&v).unwrap_err() {
            Error::Config { field, .. } => field,
            e => panic!("{e}"),
        }
    }

    #[test]
    fn deepspeed_precision_sections_are_read_as_deepspeed_reads_them() {
        let p = |v: Value| Precision::from_deepspeed_config(&v).unwrap();
        assert_eq!(p(json!({})), Precision { dtype: DType::F32, scaler: None });
        assert_eq!(p(json!({"fp16": {"enabled": false, "loss_scale": 0}})).dtype, DType::F32);
        let d = p(json!({"fp16": {"enabled": true}}));
        assert_eq!(
            d,
            Precision { dtype: DType::F16, scaler: Some(LossScaler::Dynamic(DynamicLossScaler::deepspeed_default())) }
        );
        let d = p(json!({"fp16": {"enabled": true, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 10,
            "hysteresis": 1, "consecutive_hysteresis": true, "min_loss_scale": 4}}));
        assert_eq!(d.scaler, Some(LossScaler::Dynamic(DynamicLossScaler::new(256.0, 10, 4.0, 1, true).unwrap())));
        assert_eq!(p(json!({"fp16": {"enabled": true, "loss_scale": 128.0}})).scaler, Some(LossScaler::Static(128.0)));
        assert_eq!(
            p(json!({"bf16": {"enabled": true}})),
            Precision { dtype: DType::BF16, scaler: Some(LossScaler::Static(1.0)) }
        );
        assert_eq!(p(json!({"bfloat16": {"enabled": true, "check_grad_overflow": false}})).scaler, None);
        // Dynamic-only checks apply only when dynamic scaling is on, as in DeepSpeed.
        assert_eq!(
            p(json!({"fp16": {"enabled": true, "loss_scale": 2, "loss_scale_window": 0}})).scaler,
            Some(LossScaler::Static(2.0))
        );

        assert_eq!(field(json!({"fp16": {"enabled": true}, "bf16": {"enabled": true}})), "fp16.enabled");
        assert_eq!(field(json!({"fp16": {"enabled": true, "loss_scale": -1}})), "fp16.loss_scale");
        assert_eq!(field(json!({"fp16": {"enabled": true, "loss_scale": true}})), "fp16.loss_scale");
        assert_eq!(field(json!({"fp16": {"enabled": true, "loss_scale_window": 0}})), "fp16.loss_scale_window");
        assert_eq!(field(json!({"fp16": {"enabled": true, "min_loss_scale": 0}})), "fp16.min_loss_scale");
        assert_eq!(field(json!({"fp16": {"enabled": true, "min_loss_scale": 0.5}})), "fp16.min_loss_scale");
        assert_eq!(field(json!({"fp16": {"enabled": true, "min_loss_scale": true}})), "fp16.min_loss_scale");
        assert_eq!(field(json!({"fp16": {"enabled": true, "hysteresis": 0}})), "fp16.hysteresis");
        assert_eq!(field(json!({"fp16": {"enabled": true, "initial_scale_power": 200}})), "fp16.initial_scale_power");
        assert_eq!(field(json!({"fp16": {"enabled": "yes"}})), "fp16.enabled");
        assert_eq!(field(json!({"fp16": {"enabled": true, "scale": 1}})), "fp16.scale");
        assert_eq!(field(json!({"fp16": {"enabled": true, "auto_cast": true}})), "fp16.auto_cast");
        assert_eq!(field(json!({"fp16": [1]})), "fp16");
        assert_eq!(
            field(json!({"bf16": {"enabled": true, "bf16_optimizer_states": true}})),
            "bf16.bf16_optimizer_states"
        );
        assert_eq!(field(json!({"bf16": {"enabled": true, "extra": 1}})), "bf16.extra");
    }
}
