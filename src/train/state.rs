//! Saving and loading an optimizer's state as safetensors, beside the weights.
//!
//! The file holds, per parameter, `<name>.exp_avg` and `<name>.exp_avg_sq` (Adam, AdamW)
//! or `<name>.momentum_buffer` (SGD with momentum), from its first step on, and for each
//! group `param_groups.<group>.step` (an i32 scalar). Names are the engine's
//! (`experts.w_in`, ...) or, through a [`NameMap`], the checkpoint's own
//! (`deepspeed_moe.experts.deepspeed_experts.3.0.weight.exp_avg`, ...): state saved that way
//! is laid out exactly as the checkpoint's parameters are, so tools that read the
//! checkpoint read it too. Values are the f32 state bit for bit, so a run resumed from the
//! file continues exactly as the uninterrupted run would have.
//!
//! A mixed-precision optimizer also saves the f32 master of every f16 / bf16 parameter as
//! `<name>.master` (engine or checkpoint names, as the rest), since the compute copies
//! saved beside it as the weights are rounded. Loading restores the masters the file
//! holds; a file without them (saved before the masters were made) leaves each half
//! parameter to make its master from its compute copy at its next step. A dynamic loss
//! scaler's running state is saved as `loss_scaler.cur_scale`, `.cur_iter`,
//! `.last_overflow_iter` and `.cur_hysteresis` (DeepSpeed's names), and restored when the
//! file has it.

use super::loss_scale::LossScaler;
use super::optimizer::{Optimizer, StateKind};
use crate::backend::Backend;
use crate::device::Tensor;
use crate::error::{Error, Result};
use crate::import::{save_safetensors, Checkpoint, NameMap};
use crate::tensor::{DType, HostTensor};
use crate::weights::HostLayerWeights;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A checkpoint's names for the state: the map from engine tensors to the checkpoint's,
/// and the importer that built it (loading runs it on the state tensors, which puts them
/// back in the engine's layout; see [`NameMap`]).
pub struct CheckpointNames<'a> {
    /// The checkpoint's names ([`NameMap::build`] with the same importer).
    pub map: &'a NameMap,
    /// The importer: checkpoint tensors to the engine's layout.
    pub import: &'a dyn Fn(&mut Checkpoint) -> Result<HostLayerWeights>,
}

/// Where the state of the weights saved at `weights` goes: `<stem>.optim.safetensors` in
/// the same folder (`layer.safetensors` → `layer.optim.safetensors`).
pub fn state_path(weights: &Path) -> PathBuf {
    let stem = weights.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "weights".into());
    weights.with_file_name(format!("{stem}.optim.safetensors"))
}

/// A kind of per-parameter state and the suffix it is saved under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    /// Adam's first moment.
    ExpAvg,
    /// Adam's second moment.
    ExpAvgSq,
    /// SGD's momentum buffer.
    Momentum,
}

const ALL: [Which; 3] = [Which::ExpAvg, Which::ExpAvgSq, Which::Momentum];

impl Which {
    /// torch's name of it in `optimizer.state[p]`.
    fn suffix(self) -> &'static str {
        match self {
            Which::ExpAvg => "exp_avg",
            Which::ExpAvgSq => "exp_avg_sq",
            Which::Momentum => "momentum_buffer",
        }
    }

    /// The kinds a parameter with state of family `kind` has.
    fn of(kind: StateKind) -> &'static [Which] {
        match kind {
            StateKind::Adam => &[Which::ExpAvg, Which::ExpAvgSq],
            StateKind::Sgd => &[Which::Momentum],
        }
    }
}

/// A checkpoint tensor's name and the optimizer's parameters it is made of (None: a
/// buffer, which has no state).
type CheckpointParam<'m> = (&'m str, Option<Vec<usize>>);

/// The suffix of a master copy.
const MASTER: &str = "master";

/// A dynamic loss scaler's running state: its scale (f32), iterations seen, last
/// overflow's iteration and hysteresis left (i32 scalars).
const SCALER_KEYS: [&str; 4] =
    ["loss_scaler.cur_scale", "loss_scaler.cur_iter", "loss_scaler.last_overflow_iter", "loss_scaler.cur_hysteresis"];

fn step_key(group: &str) -> String {
    format!("param_groups.{group}.step")
}

impl<B: Backend> Optimizer<B> {
    /// Which state kinds each parameter has now (by its saved state) or must have after a
    /// load (by its group's rule and step).
    fn expected(&self, i: usize) -> &'static [Which] {
        let slot = &self.slots[i];
        let g = &self.groups[slot.group];
        match slot.kind {
            Some(k) => Which::of(k),
            None if g.step() > 0 => {
                let h = g.hyper;
                match (h.has_m(), h.has_v()) {
                    (_, true) => Which::of(StateKind::Adam),
                    (true, false) => Which::of(StateKind::Sgd),
                    (false, false) => &[],
                }
            }
            None => &[],
        }
    }

    fn tensor_of(&self, i: usize, w: Which) -> Option<&Tensor<B>> {
        let s = &self.slots[i];
        match w {
            Which::ExpAvg | Which::Momentum => s.m.as_ref(),
            Which::ExpAvgSq => s.v.as_ref(),
        }
    }

    /// The state on the host under the engine's names: `<param>.<state>` and
    /// `param_groups.<group>.step`.
    pub fn state_dict(&self, b: &B) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = self.steps()?;
        for (i, s) in self.slots.iter().enumerate() {
            for &w in self.expected(i) {
                if let Some(t) = self.tensor_of(i, w) {
                    out.insert(format!("{}.{}", s.name, w.suffix()), b.download(t)?);
                }
            }
            if let Some(m) = &s.master {
                out.insert(format!("{}.{MASTER}", s.name), b.download(m)?);
            }
        }
        Ok(out)
    }

    fn steps(&self) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        for g in &self.groups {
            let step = i32::try_from(g.step()).map_err(|_| {
                Error::too_large(format!("step of group `{}`", g.name()), g.step().to_string(), "2^31 - 1")
            })?;
            out.insert(step_key(g.name()), HostTensor::i32(&[], vec![step])?);
        }
        if let Some(LossScaler::Dynamic(d)) = self.loss_scaler() {
            let scale = d.loss_scale();
            if (scale as f32) as f64 != scale {
                return Err(Error::too_large("the loss scale", scale.to_string(), "what an f32 holds exactly"));
            }
            let int = |what: &str, v: i64| {
                i32::try_from(v)
                    .map_err(|_| Error::too_large(format!("the loss scaler's {what}"), v.to_string(), "2^31 - 1"))
            };
            out.insert(SCALER_KEYS[0].into(), HostTensor::f32(&[], vec![scale as f32])?);
            out.insert(SCALER_KEYS[1].into(), HostTensor::i32(&[], vec![int("iteration", d.iteration() as i64)?])?);
            out.insert(
                SCALER_KEYS[2].into(),
                HostTensor::i32(&[], vec![int("last overflow", d.last_overflow_iteration())?])?,
            );
            out.insert(SCALER_KEYS[3].into(), HostTensor::i32(&[], vec![d.hysteresis() as i32])?);
        }
        Ok(out)
    }

    /// For each checkpoint name of `map`: the optimizer's parameters its elements come
    /// from, or None for a buffer (no parameter: DeepSeek-V3's correction bias).
    fn checkpoint_params<'m>(&self, map: &'m NameMap) -> Result<Vec<CheckpointParam<'m>>> {
        map.names()
            .map(|name| {
                let sources = map.sources(name)?;
                let idx: Vec<Option<usize>> =
                    sources.iter().map(|f| self.slots.iter().position(|s| s.name == *f)).collect();
                if idx.iter().all(Option::is_none) {
                    Ok((name, None))
                } else if idx.iter().all(Option::is_some) {
                    Ok((name, Some(idx.into_iter().flatten().collect())))
                } else {
                    Err(Error::Internal(format!("checkpoint tensor `{name}` mixes parameters and buffers")))
                }
            })
            .collect()
    }

    /// Writes the state to `path` (see the module docs), under the engine's names or,
    /// with `names`, under the checkpoint's.
    pub fn save(&self, b: &B, path: &Path, names: Option<&NameMap>) -> Result<()> {
        let engine = self.state_dict(b)?;
        let out = match names {
            None => engine,
            Some(map) => {
                let mut out = self.steps()?;
                for suffix in ALL.iter().map(|w| w.suffix()).chain([MASTER]) {
                    let by_param: BTreeMap<String, HostTensor> = self
                        .slots
                        .iter()
                        .filter_map(|s| {
                            engine.get(&format!("{}.{suffix}", s.name)).map(|t| (s.name.clone(), t.clone()))
                        })
                        .collect();
                    for (name, params) in self.checkpoint_params(map)? {
                        let Some(params) = params else { continue };
                        let have = params.iter().filter(|&&i| by_param.contains_key(&self.slots[i].name)).count();
                        if have == 0 {
                            continue;
                        }
                        if have != params.len() {
                            return Err(Error::Misuse(format!(
                                "checkpoint tensor `{name}` spans parameters with and without `{suffix}` state \
                                 (groups with different rules, or f32 and half-precision parameters)"
                            )));
                        }
                        out.insert(format!("{name}.{suffix}"), map.gather(&by_param, name)?);
                    }
                }
                out
            }
        };
        save_safetensors(path, &out)
    }

    /// Reads state that [`Optimizer::save`] wrote (with the same naming) into this
    /// optimizer, built over the same parameters: every group's step and every state
    /// tensor its rule keeps after that many steps. A missing, mis-shaped or unexpected
    /// tensor is an error naming it, and leaves the optimizer as it was.
    pub fn load(&mut self, b: &B, path: &Path, names: Option<&CheckpointNames<'_>>) -> Result<()> {
        let mut ck = Checkpoint::load(path)?;
        let mut steps = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let key = step_key(g.name());
            let t = ck.take(&key)?;
            let v = match (t.shape(), t.as_i32(&key)) {
                ([] | [1], Ok([v])) if *v >= 0 => *v as u64,
                _ => return Err(Error::shape(key, "an i32 scalar >= 0", t.shape())),
            };
            steps.push(v);
        }
        // A dynamic loss scaler's state, where the file has it (else the scaler goes on as
        // it is); checked on a copy, set with the rest.
        let scaler = match self.loss_scaler() {
            Some(LossScaler::Dynamic(d)) if ck.contains(SCALER_KEYS[0]) => {
                let mut d = d.clone();
                let mut int = |key: &str| -> Result<i64> {
                    let t = ck.take(key)?;
                    match (t.shape(), t.as_i32(key)) {
                        ([] | [1], Ok([v])) => Ok(*v as i64),
                        _ => Err(Error::shape(key, "an i32 scalar", t.shape())),
                    }
                };
                let (iter, last, hyst) = (int(SCALER_KEYS[1])?, int(SCALER_KEYS[2])?, int(SCALER_KEYS[3])?);
                let t = ck.take(SCALER_KEYS[0])?;
                let scale = match (t.shape(), t.as_f32(SCALER_KEYS[0])) {
                    ([] | [1], Ok([v])) => *v as f64,
                    _ => return Err(Error::shape(SCALER_KEYS[0], "an f32 scalar", t.shape())),
                };
                let iter = u64::try_from(iter)
                    .map_err(|_| Error::config(SCALER_KEYS[1], format!("must be >= 0, got {iter}")))?;
                let hyst = u32::try_from(hyst)
                    .map_err(|_| Error::config(SCALER_KEYS[3], format!("must be >= 1, got {hyst}")))?;
                d.restore(scale, iter, last, hyst)?;
                Some(LossScaler::Dynamic(d))
            }
            _ => None,
        };
        // What each parameter must have after the load: its group's rule after `step` steps.
        let saved: Vec<u64> = self.groups.iter().map(|g| g.step()).collect();
        for (g, &s) in self.groups.iter_mut().zip(&steps) {
            g.set_step(s);
        }
        let kinds: Vec<Option<StateKind>> = self.slots.iter().map(|s| s.kind).collect();
        for s in &mut self.slots {
            s.kind = None;
        }
        let expected: Vec<&'static [Which]> = (0..self.slots.len()).map(|i| self.expected(i)).collect();
        let restore = |o: &mut Self| {
            for (g, &s) in o.groups.iter_mut().zip(&saved) {
                g.set_step(s);
            }
            for (s, k) in o.slots.iter_mut().zip(&kinds) {
                s.kind = *k;
            }
        };
        let host = match names {
            None => self.read_engine(&mut ck, &expected),
            Some(n) => self.read_checkpoint(&mut ck, &expected, n),
        };
        let masters = host.and_then(|h| Ok((h, self.read_masters(&mut ck, names)?)));
        let (host, masters) = match masters.and_then(|h| ck.finish("").map(|_| h)) {
            Ok(h) => h,
            Err(e) => {
                restore(self);
                return Err(e);
            }
        };
        let mut masters_up: Vec<Option<Tensor<B>>> = Vec::with_capacity(masters.len());
        for m in masters {
            match m.map(|t| b.upload(&t)).transpose() {
                Ok(t) => masters_up.push(t),
                Err(e) => {
                    restore(self);
                    return Err(e);
                }
            }
        }
        let mut uploaded: Vec<[Option<Tensor<B>>; 2]> = Vec::with_capacity(self.slots.len());
        for [m, v] in host {
            let up = |t: Option<HostTensor>| t.map(|t| b.upload(&t)).transpose();
            match up(m).and_then(|m| Ok([m, up(v)?])) {
                Ok(mv) => uploaded.push(mv),
                Err(e) => {
                    restore(self);
                    return Err(e);
                }
            }
        }
        for (((slot, [m, v]), exp), master) in self.slots.iter_mut().zip(uploaded).zip(&expected).zip(masters_up) {
            slot.kind = match exp.first() {
                Some(Which::Momentum) => Some(StateKind::Sgd),
                Some(_) => Some(StateKind::Adam),
                None => None,
            };
            slot.m = m;
            slot.v = v;
            if slot.dtype != DType::F32 {
                slot.master = master;
            }
        }
        if scaler.is_some() {
            self.set_loss_scaler(scaler);
        }
        Ok(())
    }

    /// The masters of the half-precision parameters that the file holds (None for f32
    /// parameters and for ones the file has no master of). Under checkpoint names the
    /// importer puts them back in the engine's layout, as for the state.
    fn read_masters(
        &self,
        ck: &mut Checkpoint,
        names: Option<&CheckpointNames<'_>>,
    ) -> Result<Vec<Option<HostTensor>>> {
        let half = |i: usize| self.slots[i].dtype != DType::F32;
        let mut out: Vec<Option<HostTensor>> = vec![None; self.slots.len()];
        let Some(names) = names else {
            for (i, s) in self.slots.iter().enumerate().filter(|&(i, _)| half(i)) {
                let key = format!("{}.{MASTER}", s.name);
                if ck.contains(&key) {
                    let t = ck.take_shaped(&key, &s.shape)?;
                    t.as_f32(&key)?;
                    out[i] = Some(t);
                }
            }
            return Ok(out);
        };
        let ck_params = self.checkpoint_params(names.map)?;
        if !ck_params.iter().any(|(name, _)| ck.contains(&format!("{name}.{MASTER}"))) {
            return Ok(out);
        }
        let mut tensors = BTreeMap::new();
        for (name, params) in &ck_params {
            let shape = names.map.shape(name).ok_or_else(|| Error::Internal(format!("the name map lost `{name}`")))?;
            let key = format!("{name}.{MASTER}");
            let t = match params {
                // A file with masters has every half parameter's.
                Some(p) if p.iter().all(|&i| half(i)) => {
                    let t = ck.take_shaped(&key, shape)?;
                    t.as_f32(&key)?;
                    t
                }
                Some(p) if p.iter().any(|&i| half(i)) => {
                    return Err(Error::Misuse(format!(
                        "checkpoint tensor `{name}` spans f32 and half-precision parameters"
                    )))
                }
                _ => HostTensor::zeros(shape)?,
            };
            tensors.insert(name.to_string(), t);
        }
        let mut state = Checkpoint::from_map(tensors, &format!("{} ({MASTER})", ck.source()));
        let weights = (names.import)(&mut state)?;
        let engine: BTreeMap<String, &HostTensor> = weights.named().into_iter().collect();
        for (i, s) in self.slots.iter().enumerate().filter(|&(i, _)| half(i)) {
            let t =
                engine.get(&s.name).ok_or_else(|| Error::Internal(format!("the importer produced no `{}`", s.name)))?;
            out[i] = Some((*t).clone().reshape(&s.shape)?);
        }
        Ok(out)
    }

    /// The state under the engine's names, per parameter `[m, v]`.
    fn read_engine(&self, ck: &mut Checkpoint, expected: &[&'static [Which]]) -> Result<Vec<[Option<HostTensor>; 2]>> {
        let mut out = Vec::with_capacity(self.slots.len());
        for (s, exp) in self.slots.iter().zip(expected) {
            let mut per: [Option<HostTensor>; 2] = [None, None];
            for &w in *exp {
                let key = format!("{}.{}", s.name, w.suffix());
                let t = ck.take_shaped(&key, &s.shape)?;
                t.as_f32(&key)?;
                per[usize::from(w == Which::ExpAvgSq)] = Some(t);
            }
            out.push(per);
        }
        Ok(out)
    }

    /// The state under a checkpoint's names, put back in the engine's layout by running
    /// the importer on it (buffers, which have no state, are given zeros), per parameter
    /// `[m, v]`.
    fn read_checkpoint(
        &self,
        ck: &mut Checkpoint,
        expected: &[&'static [Which]],
        names: &CheckpointNames<'_>,
    ) -> Result<Vec<[Option<HostTensor>; 2]>> {
        let ck_params = self.checkpoint_params(names.map)?;
        let mut out: Vec<[Option<HostTensor>; 2]> = vec![[None, None]; self.slots.len()];
        for w in ALL {
            let wants = |i: usize| expected[i].contains(&w);
            if !(0..self.slots.len()).any(wants) {
                continue;
            }
            let mut tensors = BTreeMap::new();
            for (name, params) in &ck_params {
                let shape =
                    names.map.shape(name).ok_or_else(|| Error::Internal(format!("the name map lost `{name}`")))?;
                let key = format!("{name}.{}", w.suffix());
                let t = match params {
                    Some(p) if p.iter().all(|&i| wants(i)) => {
                        let t = ck.take_shaped(&key, shape)?;
                        t.as_f32(&key)?;
                        t
                    }
                    Some(p) if p.iter().any(|&i| wants(i)) => {
                        return Err(Error::Misuse(format!(
                            "checkpoint tensor `{name}` spans parameters of groups with different rules"
                        )))
                    }
                    _ => HostTensor::zeros(shape)?,
                };
                tensors.insert(name.to_string(), t);
            }
            let mut state = Checkpoint::from_map(tensors, &format!("{} ({})", ck.source(), w.suffix()));
            let weights = (names.import)(&mut state)?;
            let engine: BTreeMap<String, &HostTensor> = weights.named().into_iter().collect();
            for (i, s) in self.slots.iter().enumerate().filter(|&(i, _)| wants(i)) {
                let t = engine
                    .get(&s.name)
                    .ok_or_else(|| Error::Internal(format!("the importer produced no `{}`", s.name)))?;
                let t = (*t).clone().reshape(&s.shape)?;
                out[i][usize::from(w == Which::ExpAvgSq)] = Some(t);
            }
        }
        Ok(out)
    }
}
