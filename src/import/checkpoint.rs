//! A set of named tensors read from safetensors (f32, f16, bf16, i64, i32), converted to f32
//! or i32 host tensors, with bookkeeping of which names the importer used.

use crate::error::{Error, Result};
use crate::tensor::HostTensor;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Named host tensors with use tracking.
#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    tensors: BTreeMap<String, HostTensor>,
    taken: BTreeSet<String>,
    source: String,
}

impl Checkpoint {
    /// Wraps tensors already in memory; `source` names them in errors.
    pub fn from_map(tensors: BTreeMap<String, HostTensor>, source: &str) -> Self {
        Checkpoint { tensors, taken: BTreeSet::new(), source: source.into() }
    }

    /// Reads one safetensors file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Reads every `*.safetensors` file of a folder (sharded hub checkpoints).
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::Io { path: dir.display().to_string(), source: e })?;
        let mut files: Vec<_> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Checkpoint {
                path: dir.display().to_string(),
                msg: "no .safetensors files".into(),
                source: None,
            });
        }
        let mut out = Checkpoint { source: dir.display().to_string(), ..Default::default() };
        for f in files {
            let part = Self::load(&f)?;
            for (k, v) in part.tensors {
                if out.tensors.insert(k.clone(), v).is_some() {
                    return Err(Error::Checkpoint {
                        path: f.display().to_string(),
                        msg: format!("tensor `{k}` appears in two files"),
                        source: None,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Parses safetensors bytes; `source` names the data in errors.
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Checkpoint {
            path: source.into(),
            msg: "not a valid safetensors file".into(),
            source: Some(Box::new(e)),
        })?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let data = view.data();
            let bad = |what: &str| Error::Checkpoint {
                path: source.into(),
                msg: format!("tensor `{name}`: {what}"),
                source: None,
            };
            let t = match view.dtype() {
                Dtype::F32 => HostTensor::f32(
                    &shape,
                    data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                )?,
                Dtype::F16 => HostTensor::f32(
                    &shape,
                    data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                )?,
                Dtype::BF16 => HostTensor::f32(
                    &shape,
                    data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                )?,
                Dtype::F64 => HostTensor::f32(
                    &shape,
                    data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
                )?,
                Dtype::I32 => HostTensor::i32(
                    &shape,
                    data.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                )?,
                Dtype::I64 => {
                    let mut v = Vec::with_capacity(data.len() / 8);
                    for c in data.chunks_exact(8) {
                        let x = i64::from_le_bytes(c.try_into().expect("8 bytes"));
                        v.push(i32::try_from(x).map_err(|_| bad("int64 value does not fit in int32"))?);
                    }
                    HostTensor::i32(&shape, v)?
                }
                other => return Err(bad(&format!("unsupported dtype {other:?}"))),
            };
            tensors.insert(name.to_string(), t);
        }
        Ok(Checkpoint { tensors, taken: BTreeSet::new(), source: source.into() })
    }

    /// Where the tensors came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// Every tensor with its name, in name order (without marking any used).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &HostTensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Borrows a tensor without marking it used.
    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor(name.into()))
    }

    /// Takes a tensor, marking it used; errors name it when it is missing.
    pub fn take(&mut self, name: &str) -> Result<HostTensor> {
        let t = self.tensors.get(name).cloned().ok_or_else(|| Error::MissingTensor(name.into()))?;
        self.taken.insert(name.into());
        Ok(t)
    }

    /// Takes a tensor and checks its shape.
    pub fn take_shaped(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self.take(name)?;
        t.expect_shape(name, shape)?;
        Ok(t)
    }

    /// Takes a tensor if present.
    pub fn take_opt(&mut self, name: &str) -> Option<HostTensor> {
        let t = self.tensors.get(name).cloned();
        if t.is_some() {
            self.taken.insert(name.into());
        }
        t
    }

    /// Errors listing every tensor under `prefix` that no importer took.
    pub fn finish(&self, prefix: &str) -> Result<()> {
        let extra: Vec<String> =
            self.tensors.keys().filter(|k| k.starts_with(prefix) && !self.taken.contains(*k)).cloned().collect();
        if extra.is_empty() {
            Ok(())
        } else {
            Err(Error::UnexpectedTensors(extra))
        }
    }
}

/// Stacks per-expert `[rows, cols]` tensors into `[E, rows, cols]` (or `[E, n]` vectors).
pub fn stack(parts: Vec<HostTensor>, name: &str) -> Result<HostTensor> {
    let first = parts.first().ok_or_else(|| Error::MissingTensor(name.into()))?.shape().to_vec();
    let mut data = Vec::with_capacity(parts.len() * first.iter().product::<usize>());
    for p in &parts {
        if p.shape() != first {
            return Err(Error::shape(name, format!("{first:?} for every expert"), p.shape()));
        }
        data.extend_from_slice(p.as_f32(name)?);
    }
    let mut shape = vec![parts.len()];
    shape.extend(first);
    HostTensor::f32(&shape, data)
}

/// Concatenates `[E, a, c]` and `[E, b, c]` along the middle axis (gate rows, then up rows).
pub fn concat_rows(a: &HostTensor, b: &HostTensor, name: &str) -> Result<HostTensor> {
    let (e, ra, c) = match a.shape()[..] {
        [e, ra, c] => (e, ra, c),
        _ => return Err(Error::shape(name, "[E, rows, cols]", a.shape())),
    };
    let rb = match b.shape()[..] {
        [be, rb, bc] if be == e && bc == c => rb,
        _ => return Err(Error::shape(name, format!("[{e}, rows, {c}]"), b.shape())),
    };
    let (da, db) = (a.as_f32(name)?, b.as_f32(name)?);
    let mut out = Vec::with_capacity(e * (ra + rb) * c);
    for i in 0..e {
        out.extend_from_slice(&da[i * ra * c..(i + 1) * ra * c]);
        out.extend_from_slice(&db[i * rb * c..(i + 1) * rb * c]);
    }
    HostTensor::f32(&[e, ra + rb, c], out)
}

/// Writes host tensors to a safetensors file (f32 and i32), e.g. to convert a checkpoint
/// between layouts.
pub fn save_safetensors(path: &Path, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
    use crate::tensor::HostData;
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, t)| match t.data() {
            HostData::F32(v) => (k.clone(), Dtype::F32, t.shape().to_vec(), bytemuck::cast_slice(v).to_vec()),
            HostData::I32(v) => (k.clone(), Dtype::I32, t.shape().to_vec(), bytemuck::cast_slice(v).to_vec()),
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, dt, shape, b)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), b).map(|v| (k.as_str(), v)).map_err(|e| {
                Error::Checkpoint {
                    path: path.display().to_string(),
                    msg: format!("tensor `{k}`"),
                    source: Some(Box::new(e)),
                }
            })
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| Error::Checkpoint {
        path: path.display().to_string(),
        msg: "writing safetensors".into(),
        source: Some(Box::new(e)),
    })
}
