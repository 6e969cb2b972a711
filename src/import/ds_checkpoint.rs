//! DeepSpeed checkpoint folders, as `engine.save_checkpoint(dir, tag)` writes them for a
//! model with MoE layers (no tensor parallelism, ZeRO stage 0–2):
//!
//! ```text
//! dir/latest                                          the tag, e.g. `global_step1000`
//! dir/<tag>/mp_rank_00_model_states.pt                {module: non-expert weights by full
//!                                                     name, optimizer, ds_config, ...}
//! dir/<tag>/layer_{L}_expert_{E}_mp_rank_00_model_states.pt
//!                                                     expert E of MoE layer L: its weights
//!                                                     by full name, E the global index
//! dir/<tag>/expp_rank_*_mp_rank_00_optim_states.pt    optimizer state (not read)
//! ```
//!
//! L counts the model's MoE layers in order (0 for the first `MoE` module); DeepSpeed
//! renames each rank's local experts to their global index before saving, so the expert
//! files of every expert-parallel rank sit side by side. [`DeepSpeedCheckpoint::moe_layer`]
//! gathers one layer's tensors under the names [`super::deepspeed::layer_weights`] reads:
//! `{prefix}deepspeed_moe.gate.wg.weight`, `{prefix}deepspeed_moe.experts.deepspeed_experts.{E}.*`,
//! `{prefix}mlp.*` and `{prefix}coefficient.*` for residual MoE. Tensors are read lazily,
//! when the importer takes them.

use super::checkpoint::Checkpoint;
use crate::config::LayerSpec;
use crate::error::{Error, Result};
use crate::weights::HostLayerWeights;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The model-states file of model-parallel rank 0.
pub const MODEL_STATES: &str = "mp_rank_00_model_states.pt";

/// A DeepSpeed checkpoint folder and the tag to read from it.
#[derive(Clone, Debug)]
pub struct DeepSpeedCheckpoint {
    dir: PathBuf,
    tag: String,
}

impl DeepSpeedCheckpoint {
    /// Opens `dir` at the tag its `latest` file names.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with_tag_file(dir, "latest")
    }

    /// Opens `dir` at the tag the file `tag_file` in it names (`latest` by DeepSpeed's
    /// default; `save_latest=False` runs may keep another).
    pub fn open_with_tag_file(dir: &Path, tag_file: &str) -> Result<Self> {
        let path = dir.join(tag_file);
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
        let tag = text.trim();
        if tag.is_empty() {
            return Err(Error::Checkpoint {
                path: path.display().to_string(),
                msg: "names no tag".into(),
                source: None,
            });
        }
        Self::with_tag(dir, tag).map_err(|e| match e {
            Error::Checkpoint { path: p, msg, source } => {
                Error::Checkpoint { path: p, msg: format!("{msg} (the tag {} names)", path.display()), source }
            }
            other => other,
        })
    }

    /// Opens `dir` at `tag` (its subfolder `dir/<tag>/`).
    pub fn with_tag(dir: &Path, tag: &str) -> Result<Self> {
        // A tag is a folder name beside `latest`, not a path elsewhere.
        if Path::new(tag).file_name().and_then(|f| f.to_str()) != Some(tag) {
            return Err(Error::Checkpoint {
                path: dir.display().to_string(),
                msg: format!("tag `{tag}` is not a folder name"),
                source: None,
            });
        }
        let tag_dir = dir.join(tag);
        if !tag_dir.is_dir() {
            return Err(Error::Checkpoint {
                path: tag_dir.display().to_string(),
                msg: format!("no folder for tag `{tag}`"),
                source: None,
            });
        }
        Ok(DeepSpeedCheckpoint { dir: dir.to_path_buf(), tag: tag.to_string() })
    }

    /// The tag read.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The folder of the tag, which holds the `.pt` files.
    pub fn tag_dir(&self) -> PathBuf {
        self.dir.join(&self.tag)
    }

    /// The expert files of MoE layer `layer`, by global expert index; errors when there are
    /// none or when an index is missing between 0 and the largest.
    pub fn expert_files(&self, layer: usize) -> Result<Vec<PathBuf>> {
        let tag_dir = self.tag_dir();
        let rd =
            std::fs::read_dir(&tag_dir).map_err(|e| Error::Io { path: tag_dir.display().to_string(), source: e })?;
        let head = format!("layer_{layer}_expert_");
        let mut found: BTreeMap<usize, PathBuf> = BTreeMap::new();
        for entry in rd.filter_map(|e| e.ok()) {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(e) = name.strip_prefix(&head).and_then(|r| r.strip_suffix("_mp_rank_00_model_states.pt")) else {
                continue;
            };
            // `layer_1_expert_03_...` would not be DeepSpeed's: indices are plain decimals.
            match e.parse::<usize>() {
                Ok(i) if i.to_string() == e => {
                    found.insert(i, entry.path());
                }
                _ => {
                    return Err(Error::Checkpoint {
                        path: entry.path().display().to_string(),
                        msg: format!("`{e}` is not an expert index"),
                        source: None,
                    })
                }
            }
        }
        if found.is_empty() {
            return Err(Error::Checkpoint {
                path: tag_dir.display().to_string(),
                msg: format!("no expert files {head}<E>_mp_rank_00_model_states.pt for MoE layer {layer}"),
                source: None,
            });
        }
        if let Some(missing) = (0..found.len()).find(|i| !found.contains_key(i)) {
            return Err(Error::Checkpoint {
                path: tag_dir.join(format!("{head}{missing}_mp_rank_00_model_states.pt")).display().to_string(),
                msg: format!(
                    "missing, while MoE layer {layer} has {} expert files up to expert {}",
                    found.len(),
                    found.keys().last().copied().unwrap_or(0)
                ),
                source: None,
            });
        }
        Ok(found.into_values().collect())
    }

    /// The tensors of the MoE layer at module path `prefix` (`"moe.1."`, with its trailing
    /// dot), MoE layer number `layer`: every tensor of the model states' `module` under
    /// `prefix` (gate, residual MLP and coefficient) and every expert of the expert files,
    /// under their full names. Each expert file must hold only tensors of its own expert of
    /// this layer (`{prefix}deepspeed_moe.experts.deepspeed_experts.{E}.`); a name in two
    /// files is an error naming both.
    pub fn moe_layer(&self, layer: usize, prefix: &str) -> Result<Checkpoint> {
        let tag_dir = self.tag_dir();
        let states = tag_dir.join(MODEL_STATES);
        let module = Checkpoint::load_pt(&states, Some("module"))?;
        let mut out = module.renamed(|n| n.starts_with(prefix).then(|| n.to_string()), &tag_dir.display().to_string());
        if out.names().next().is_none() {
            let msg = match module.names().next() {
                Some(_) => format!("`module` holds no tensor under `{prefix}`"),
                // ZeRO-3 keeps the weights partitioned in the optimizer states.
                None => "`module` holds no tensors (a ZeRO stage 3 checkpoint? convert it with zero_to_fp32)".into(),
            };
            return Err(Error::Checkpoint { path: states.display().to_string(), msg, source: None });
        }
        for (e, file) in self.expert_files(layer)?.into_iter().enumerate() {
            let expert = Checkpoint::load_pt(&file, None)?;
            let own = format!("{prefix}deepspeed_moe.experts.deepspeed_experts.{e}.");
            if let Some(other) = expert.names().find(|n| !n.starts_with(&own)) {
                return Err(Error::Checkpoint {
                    path: file.display().to_string(),
                    msg: format!("tensor `{other}` is not one of expert {e} of MoE layer {layer} (`{own}*`)"),
                    source: None,
                });
            }
            if expert.names().next().is_none() {
                return Err(Error::Checkpoint {
                    path: file.display().to_string(),
                    msg: format!("holds no tensors for expert {e}"),
                    source: None,
                });
            }
            out.absorb(expert)?;
        }
        Ok(out)
    }

    /// The weights of MoE layer `layer` at module path `prefix`, for the layer `spec`
    /// (from its `MoE(...)` keyword arguments, [`super::deepspeed::layer_spec`]): the
    /// tensors of [`DeepSpeedCheckpoint::moe_layer`] through
    /// [`super::deepspeed::layer_weights`], which refuses any it does not use.
    pub fn layer_weights(&self, layer: usize, prefix: &str, spec: &LayerSpec) -> Result<HostLayerWeights> {
        let mut ck = self.moe_layer(layer, prefix)?;
        super::deepspeed::layer_weights(&mut ck, spec, prefix)
    }
}
