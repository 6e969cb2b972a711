//! Torch `.pt` archives (what `torch.save` writes, and so DeepSpeed's `*_model_states.pt`):
//! a pickle describing the saved dict, each tensor's bytes in a storage entry beside it.
//! Read without Python through the `pytorch-reader` crate.
//!
//! Why that crate, of the Rust readers of these files:
//!
//! - `pytorch-reader` (the reader behind Burn's `burn-store`, maintained in the Burn
//!   repository and released with it) parses the pickle with torch's persistent-id storages,
//!   keeps every GLOBAL it does not interpret (DeepSpeed's bookkeeping: optimizer state,
//!   `ds_config`, scheduler and sampler state, arbitrary classes) as an opaque value instead
//!   of failing, follows `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` with
//!   storage offsets and strides (views are gathered), reads the ZIP, legacy and TAR
//!   containers, and is hardened against hostile files (sizes checked against the file
//!   before allocating, memo and nesting bombs bounded). Opening parses the pickle only; a
//!   tensor's storage is read when asked for, which is what a lazy [`Checkpoint`] wants. Its
//!   dependencies are small (zip, tar, byteorder, crc32fast).
//! - candle-core's `pickle` module (`PthTensors`, `read_pth_tensor_info`) handles the same
//!   pickles but comes with all of candle-core (its own tensor type, gemm, rand, safetensors
//!   of another major version), far more than a reader needs.
//! - `repugnant-pickle` is a 0.0.1 "low effort scraping" crate, unreleased since.
//! - `serde-pickle` + `zip` stops at the persistent-id opcodes that reference torch's
//!   storages (`BINPERSID` is unsupported) and resolves only a fixed set of globals (any
//!   other fails, or becomes `None`), so a hand-written torch layer would be needed on top.

use super::checkpoint::{Checkpoint, Stored};
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

impl Checkpoint {
    /// Opens a torch `.pt` archive holding a dict of tensors (or, with `key`, a dict whose
    /// entry `key` is one, e.g. `module` in DeepSpeed's model states). Nested dicts, lists
    /// and tuples name their tensors by dotted path (`layers.0.weight`); non-tensor values
    /// are skipped. Only the pickle is parsed here; each tensor is read when asked for.
    pub fn load_pt(path: &Path, key: Option<&str>) -> Result<Self> {
        let at = path.display().to_string();
        // A missing or unreadable file is an I/O error like safetensors', not a format one.
        std::fs::File::open(path).map_err(|e| Error::Io { path: at.clone(), source: e })?;
        let opened = match key {
            Some(k) => pytorch_reader::PytorchReader::with_top_level_key(path, k),
            None => pytorch_reader::PytorchReader::new(path),
        };
        let reader = opened.map_err(|e| {
            let msg = match (&e, key) {
                (pytorch_reader::PytorchError::KeyNotFound(_), Some(k)) => format!("has no entry `{k}`"),
                _ => "not a torch checkpoint that can be read (truncated, corrupt or another format)".to_string(),
            };
            Error::Checkpoint { path: at.clone(), msg, source: Some(Box::new(e)) }
        })?;
        let file: Arc<str> = at.as_str().into();
        let entries =
            reader.into_tensors().into_iter().map(|(name, t)| (name, Stored::torch(file.clone(), t))).collect();
        let source = match key {
            Some(k) => format!("{at} [{k}]"),
            None => at,
        };
        Checkpoint::from_stored(entries, &source)
    }
}
