//! From the engine's layout back to a checkpoint's names. The importers turn a
//! checkpoint's tensors (per-expert matrices, fused stacks, split gate and up
//! projections) into the engine's stacked weights; a [`NameMap`] records, for every
//! element of every checkpoint tensor, where that element landed, by running the
//! importer once on tensors whose values are their elements' ids. Any importer is thus
//! its own inverse: gradients, optimizer state and trained weights computed in the
//! engine's layout are read back under the names the checkpoint used.

use super::Checkpoint;
use crate::error::{Error, Result};
use crate::tensor::HostTensor;
use crate::weights::HostLayerWeights;
use std::collections::BTreeMap;

/// Ids are stored as f32 values, exact up to 2²⁴.
const MAX_ELEMENTS: usize = 1 << 24;

/// A checkpoint tensor's shape and the (engine field, flat index) of each element.
type Slots = (Vec<usize>, Vec<(u32, u32)>);

/// Where each element of each checkpoint tensor is in the engine's named tensors.
#[derive(Clone, Debug)]
pub struct NameMap {
    /// Engine tensor names, indexed by the slots' first field.
    fields: Vec<String>,
    /// Checkpoint name → (shape, (field, flat index) of every element).
    params: BTreeMap<String, Slots>,
}

impl NameMap {
    /// Runs `import` on `ck`'s tensors replaced by their elements' ids and records where
    /// every element went. Errors when the tensors hold more than 2²⁴ elements, or when
    /// an element lands nowhere or twice.
    pub fn build(ck: &Checkpoint, import: impl FnOnce(&mut Checkpoint) -> Result<HostLayerWeights>) -> Result<Self> {
        let mut tagged = BTreeMap::new();
        let mut start = Vec::new();
        let mut next = 0usize;
        for (name, t) in ck.iter()? {
            let n = t.numel();
            if next + n >= MAX_ELEMENTS {
                return Err(Error::too_large("a name map", format!("{} elements", next + n), "2^24 elements"));
            }
            // Id + 1, so that 0 (a value no checkpoint element gave) is told apart.
            let ids = (next + 1..next + 1 + n).map(|v| v as f32).collect();
            tagged.insert(name.to_string(), HostTensor::f32(t.shape(), ids)?);
            start.push((name.to_string(), t.shape().to_vec(), next));
            next += n;
        }
        let weights = import(&mut Checkpoint::from_map(tagged, ck.source()))?;
        let mut where_: Vec<Option<(u32, u32)>> = vec![None; next];
        let mut fields = Vec::new();
        for (f, (field, t)) in weights.named().into_iter().enumerate() {
            fields.push(field);
            for (i, &v) in t.as_f32("tagged weights")?.iter().enumerate() {
                if v == 0.0 {
                    continue;
                }
                let id = v as usize - 1;
                if id >= next || where_[id].replace((f as u32, i as u32)).is_some() {
                    return Err(Error::Internal(format!("the importer placed element {id} twice or out of range")));
                }
            }
        }
        let mut params = BTreeMap::new();
        for (name, shape, s) in start {
            let n: usize = shape.iter().product();
            let slots = (s..s + n)
                .map(|id| {
                    where_[id].ok_or_else(|| {
                        Error::Internal(format!("element {} of `{name}` is in no engine tensor", id - s))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            params.insert(name, (shape, slots));
        }
        Ok(NameMap { fields, params })
    }

    /// The checkpoint's names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.keys().map(String::as_str)
    }

    /// The shape of checkpoint tensor `name`, when the map has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.params.get(name).map(|(shape, _)| shape.as_slice())
    }

    /// The engine tensors (names as [`HostLayerWeights::named`] gives them) that checkpoint
    /// tensor `name`'s elements landed in, each once, in the order of first use. An
    /// optimizer reads it to tell a parameter's checkpoint names from a buffer's (the
    /// DeepSeek-V3 correction bias has no optimizer state).
    pub fn sources(&self, name: &str) -> Result<Vec<&str>> {
        let (_, slots) = self.params.get(name).ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        let mut seen: Vec<u32> = Vec::new();
        for &(f, _) in slots {
            if !seen.contains(&f) {
                seen.push(f);
            }
        }
        Ok(seen.into_iter().map(|f| self.fields[f as usize].as_str()).collect())
    }

    /// Every checkpoint tensor read from `weights` (in the importers' layout): the weights
    /// under the checkpoint's own names, e.g. to save trained weights or compare them with
    /// a reference.
    pub fn gather_weights(&self, weights: &HostLayerWeights) -> Result<BTreeMap<String, HostTensor>> {
        let engine: BTreeMap<String, HostTensor> =
            weights.named().into_iter().map(|(name, t)| (name, t.clone())).collect();
        self.names().map(|name| Ok((name.to_string(), self.gather(&engine, name)?))).collect()
    }

    /// Checkpoint tensor `name` read from `engine` (engine name → tensor, in the layout
    /// of [`HostLayerWeights::named`]).
    pub fn gather(&self, engine: &BTreeMap<String, HostTensor>, name: &str) -> Result<HostTensor> {
        let (shape, slots) = self.params.get(name).ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        let tensors =
            self.fields.iter().map(|f| engine.get(f).map(|t| t.as_f32(f)).transpose()).collect::<Result<Vec<_>>>()?;
        let v = slots
            .iter()
            .map(|&(f, i)| {
                let data = tensors[f as usize].ok_or_else(|| Error::MissingTensor(self.fields[f as usize].clone()))?;
                data.get(i as usize).copied().ok_or_else(|| {
                    Error::shape(self.fields[f as usize].clone(), format!("at least {} elements", i + 1), &[data.len()])
                })
            })
            .collect::<Result<Vec<f32>>>()?;
        HostTensor::f32(shape, v)
    }
}
