//! Importers: DeepSpeed `MoE(...)` keyword arguments, state dicts and checkpoint folders,
//! HF `config.json` files and safetensors checkpoints (per-expert hub layout and
//! transformers-5 fused layout, FP8 and MXFP4 quantized weights), read lazily. Every
//! missing, unexpected or mis-shaped tensor is an error that names it.
//! [`hub`] finds a model folder from a path or a repo id in the local HF hub cache.

pub mod checkpoint;
pub mod deepspeed;
pub mod ds_checkpoint;
pub mod hf;
pub mod hub;
pub mod names;
pub mod quant;
pub mod torch_pt;

pub use checkpoint::{save_safetensors, Checkpoint, StoredTensor};
pub use ds_checkpoint::DeepSpeedCheckpoint;
pub use names::NameMap;
pub use quant::Quantization;

use crate::error::{Error, Result};
use serde_json::Value;

/// Reads a field of a JSON object as `T`, naming the field when it is absent or mistyped.
pub(crate) fn field<T: serde::de::DeserializeOwned>(cfg: &Value, name: &str) -> Result<T> {
    let v = cfg.get(name).ok_or_else(|| Error::config(name, "missing"))?;
    serde_json::from_value(v.clone()).map_err(|e| Error::config(name, format!("{e} (got {v})")))
}

/// Like [`field`], with a default where the field is absent. A `null` is an error: the
/// references take it as Python's `None`, which these fields do not accept (fields where
/// `None` means something are read with [`field_opt`]).
pub(crate) fn field_or<T: serde::de::DeserializeOwned>(cfg: &Value, name: &str, default: T) -> Result<T> {
    match cfg.get(name) {
        None => Ok(default),
        Some(Value::Null) => Err(Error::config(name, "is null: give a value or leave the key out for the default")),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| Error::config(name, format!("{e} (got {v})"))),
    }
}

/// A field whose reference default is `None`: `None` when absent or null, else `T`.
pub(crate) fn field_opt<T: serde::de::DeserializeOwned>(cfg: &Value, name: &str) -> Result<Option<T>> {
    match cfg.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            serde_json::from_value(v.clone()).map(Some).map_err(|e| Error::config(name, format!("{e} (got {v})")))
        }
    }
}

/// Reads the first present field of `names` (aliases across transformers versions, e.g.
/// `num_experts` / `num_local_experts`), naming all of them when none is present.
pub(crate) fn field_any<T: serde::de::DeserializeOwned>(cfg: &Value, names: &[&str]) -> Result<T> {
    for n in names {
        if cfg.get(*n).is_some_and(|v| !v.is_null()) {
            return field(cfg, n);
        }
    }
    Err(Error::config(names.join(" / "), "missing"))
}
