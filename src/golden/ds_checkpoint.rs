//! Golden cases of kind `deepspeed.checkpoint` (FORMAT.md): a DeepSpeed MoE layer whose
//! weights come from a checkpoint folder DeepSpeed itself wrote, not from `param/` tensors.
//! `config` holds the layer's `MoE(...)` keyword arguments as in `deepspeed.moe` cases, and
//! the run is that kind's; only where the weights come from differs.

use super::case::{Case, CaseKind, CaseMeta};
use crate::config::LayerSpec;
use crate::error::{Error, Result};
use crate::import::{deepspeed, DeepSpeedCheckpoint};
use crate::weights::HostLayerWeights;
use serde::Deserialize;

/// `case.json`'s `checkpoint` block: which folder, tag and layer to read.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRef {
    /// The checkpoint folder, relative to the case folder.
    pub dir: String,
    /// The file in it naming the tag (`latest` when absent).
    #[serde(default)]
    pub tag_file: Option<String>,
    /// The tag the case was written with: checked against the tag file.
    #[serde(default)]
    pub tag: Option<String>,
    /// The layer's module path with its trailing dot (`moe.1.`).
    pub module_prefix: String,
    /// The layer's number among the model's MoE layers (the L of the expert files).
    pub moe_layer_index: usize,
    /// What the files hold (documentation only).
    #[serde(default)]
    pub files: Option<String>,
}

/// Checks what `case.json`'s types cannot: a `deepspeed.checkpoint` case has a
/// `checkpoint` block and no gradients to compare (none were recorded for these); other
/// kinds have no `checkpoint` block.
pub(super) fn validate(meta: &CaseMeta, case: &str) -> Result<()> {
    match (meta.kind, &meta.checkpoint) {
        (CaseKind::DeepSpeedCheckpoint, None) => {
            Err(Error::case(case, "a deepspeed.checkpoint case needs `checkpoint`"))
        }
        (CaseKind::DeepSpeedCheckpoint, Some(_)) if meta.backward.is_some() => {
            Err(Error::case(case, "`backward` is not supported in deepspeed.checkpoint cases"))
        }
        (CaseKind::DeepSpeedCheckpoint, Some(c)) if !c.module_prefix.is_empty() && !c.module_prefix.ends_with('.') => {
            Err(Error::case(case, format!("`checkpoint.module_prefix` `{}` must end with `.`", c.module_prefix)))
        }
        (k, Some(_)) if k != CaseKind::DeepSpeedCheckpoint => {
            Err(Error::case(case, format!("`checkpoint` is only read by deepspeed.checkpoint cases, not {}", k.name())))
        }
        _ => Ok(()),
    }
}

/// The layer of a `deepspeed.checkpoint` case: its spec from `config`, its weights from the
/// checkpoint folder ([`DeepSpeedCheckpoint::layer_weights`], which refuses any tensor
/// under the prefix it does not use).
pub(super) fn import_layer(case: &Case) -> Result<(LayerSpec, HostLayerWeights)> {
    let c = case.meta.checkpoint.as_ref().ok_or_else(|| Error::case(&case.name, "no `checkpoint` block"))?;
    let spec = deepspeed::layer_spec(&case.meta.config)?;
    let ds =
        DeepSpeedCheckpoint::open_with_tag_file(&case.dir.join(&c.dir), c.tag_file.as_deref().unwrap_or("latest"))?;
    if let Some(t) = c.tag.as_deref().filter(|&t| t != ds.tag()) {
        return Err(Error::case(
            &case.name,
            format!("`checkpoint.tag` is `{t}` but the tag file names `{}`", ds.tag()),
        ));
    }
    let w = ds.layer_weights(c.moe_layer_index, &c.module_prefix, &spec)?;
    Ok((spec, w))
}
