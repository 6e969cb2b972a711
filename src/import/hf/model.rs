//! A model folder as transformers writes it (`config.json` beside safetensors, sharded or
//! not): its family, which decoder layers are MoE, and each MoE layer's block.

use super::families::{self, LayerKind};
use super::{layer_weights_in, text_config, Family};
use crate::config::LayerSpec;
use crate::error::{Error, Result};
use crate::import::Checkpoint;
use crate::weights::HostLayerWeights;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A model folder: `config.json` read, the tensors left on disk until a layer is loaded.
#[derive(Clone, Debug)]
pub struct HfModel {
    dir: PathBuf,
    config: Value,
    family: Family,
    kinds: Vec<LayerKind>,
}

impl HfModel {
    /// Reads `dir/config.json`; the family and the MoE layers come from it.
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| Error::Io { path: cfg_path.display().to_string(), source: e })?;
        let config: Value = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: cfg_path.display().to_string(),
            msg: "not valid JSON".into(),
            source: Some(Box::new(e)),
        })?;
        let mut model = Self::from_config(config)?;
        model.dir = dir.to_path_buf();
        Ok(model)
    }

    /// A model known by its `config.json` alone (a transformers model in memory, whose
    /// blocks' tensors come as a [`Checkpoint`] to [`HfModel::load_layer_from`]); its
    /// folder is empty.
    pub fn from_config(config: Value) -> Result<Self> {
        let family = super::family(&config)?;
        let kinds = families::layer_kinds(family, text_config(&config))?;
        Ok(HfModel { dir: PathBuf::new(), config, family, kinds })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The whole `config.json`.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// The text model's config (the whole config unless it nests a `text_config`).
    pub fn text_config(&self) -> &Value {
        text_config(&self.config)
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.kinds.len()
    }

    /// What each decoder layer's feed-forward is.
    pub fn layer_kinds(&self) -> &[LayerKind] {
        &self.kinds
    }

    /// The layers whose feed-forward is an MoE block the engine runs.
    pub fn moe_layers(&self) -> Vec<usize> {
        self.kinds.iter().enumerate().filter(|(_, k)| **k == LayerKind::Moe).map(|(l, _)| l).collect()
    }

    /// The MoE block's spec (the same for every MoE layer of a model).
    pub fn spec(&self) -> Result<LayerSpec> {
        Ok(super::layer_spec(&self.config)?.1)
    }

    /// Checks that layer `layer` is an MoE layer the engine runs; the error says which are.
    pub fn check_moe_layer(&self, layer: usize) -> Result<()> {
        let moe = self.moe_layers();
        let which = || {
            if moe.is_empty() {
                "the model has none".to_string()
            } else {
                format!("the MoE layers are {}", layer_ranges(&moe))
            }
        };
        match self.kinds.get(layer) {
            None => Err(Error::config("layer", format!("{layer} is past the model's {} layers", self.kinds.len()))),
            Some(LayerKind::Moe) => Ok(()),
            Some(LayerKind::Dense) => {
                Err(Error::config("layer", format!("layer {layer} is a dense MLP layer, not an MoE one: {}", which())))
            }
            Some(LayerKind::Unsupported(why)) => {
                Err(Error::config("layer", format!("layer {layer} is {why}; not supported: {}", which())))
            }
        }
    }

    /// The tensors of the folder's safetensors files (the index's shards, or every
    /// `*.safetensors` file), read lazily: headers now, a tensor's data when it is taken.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        Checkpoint::load_dir(&self.dir)
    }

    /// The prefix of layer `layer`'s block in `ck`: the family's path (`model.layers.{L}.mlp.`)
    /// or, in a checkpoint that nests the text model (multimodal models), the one name
    /// ending in the same `layers.{L}.<block>` path that holds the router.
    pub fn block_prefix(&self, ck: &Checkpoint, layer: usize) -> Result<String> {
        let direct = super::block_prefix(self.family, layer);
        if self.family == Family::Switch {
            return Ok(direct);
        }
        let (block, layout) = families::layout(self.family, self.text_config())?;
        if ck.contains(&format!("{direct}{}", layout.router)) {
            return Ok(direct);
        }
        let tail = format!("layers.{layer}.{block}{}", layout.router);
        let found: Vec<&str> = ck.names().filter(|n| n.ends_with(&tail)).collect();
        match found[..] {
            [one] => Ok(one[..one.len() - layout.router.len()].to_string()),
            [] => Err(Error::MissingTensor(format!(
                "{direct}{} (layer {layer}'s router, in {})",
                layout.router,
                ck.source()
            ))),
            _ => Err(Error::Checkpoint {
                path: ck.source().to_string(),
                msg: format!("more than one block of layer {layer}: {}", found.join(", ")),
                source: None,
            }),
        }
    }

    /// The names of layer `layer`'s MoE tensors in `ck`: those under its block's prefix,
    /// and the shared MLP a family keeps beside the block (Granite-MoE shared).
    pub fn block_tensor_names(&self, ck: &Checkpoint, layer: usize) -> Result<Vec<String>> {
        let prefix = self.block_prefix(ck, layer)?;
        let beside = match families::layout(self.family, self.text_config()) {
            Ok((block, layout)) => layout
                .shared
                .filter(|s| s.outside)
                .and_then(|s| prefix.strip_suffix(block).map(|p| format!("{p}{}", s.dir))),
            Err(_) => None,
        };
        Ok(ck
            .names()
            .filter(|n| n.starts_with(&prefix) || beside.as_ref().is_some_and(|b| n.starts_with(b.as_str())))
            .map(String::from)
            .collect())
    }

    /// Loads layer `layer`'s block: its spec and weights. Only that block's tensors are
    /// read; a dense layer is an error that says which layers are MoE.
    pub fn load_layer(&self, layer: usize) -> Result<(LayerSpec, HostLayerWeights)> {
        self.check_moe_layer(layer)?;
        let mut ck = self.checkpoint()?;
        let prefix = self.block_prefix(&ck, layer)?;
        self.load_block_at(&mut ck, layer, &prefix)
    }

    /// Layer `layer`'s block from the tensors of `ck` under `prefix`: the folder's, or a
    /// transformers model's in memory under its module's state-dict names (`""` for a
    /// block's own `state_dict()`, whose fused expert stacks the family layouts read).
    pub fn load_block_at(
        &self,
        ck: &mut Checkpoint,
        layer: usize,
        prefix: &str,
    ) -> Result<(LayerSpec, HostLayerWeights)> {
        self.check_moe_layer(layer)?;
        let spec = self.spec()?;
        let w = layer_weights_in(ck, self.family, self.text_config(), &spec, prefix)?;
        tracing::debug!(family = ?self.family, layer, experts = spec.num_experts, "loaded HF MoE block");
        Ok((spec, w))
    }
}

/// Layer numbers as people write them: `[1, 2, 3, 5]` as `1-3, 5`.
pub fn layer_ranges(v: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if j > i { format!("{}-{}", v[i], v[j]) } else { v[i].to_string() });
        i = j + 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn layer_ranges_read_as_people_write_them() {
        assert_eq!(super::layer_ranges(&[1, 2, 3, 5, 7, 8]), "1-3, 5, 7-8");
        assert_eq!(super::layer_ranges(&[0]), "0");
    }
}
