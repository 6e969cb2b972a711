//! A set of named tensors with bookkeeping of which names an importer used, read lazily
//! from the files real checkpoints come in:
//!
//! - **safetensors**, one file or a model folder (sharded through
//!   `model.safetensors.index.json`, or plain `*.safetensors` files). Each file is
//!   memory-mapped and only its JSON header is parsed when it is opened, so the names, shapes
//!   and dtypes of a 600 GB checkpoint are known at once while a tensor's bytes are read
//!   when it is [`Checkpoint::get`] or [`Checkpoint::take`]n: loading one layer reads that
//!   layer's pages and no others.
//! - **torch `.pt` archives** ([`Checkpoint::load_pt`], see [`super::torch_pt`]), where a
//!   tensor's storage is likewise read when it is asked for.
//!
//! Every tensor reaches the importers as an f32 host tensor (F32, F16, BF16 exactly; F64
//! rounded to nearest) or an i32 one (I32; I64 checked to fit). Quantized weights are
//! dequantized on the way ([`super::quant`]): an F8_E4M3 `X.weight` with its
//! `X.weight_scale_inv` block scales becomes the f32 matrix (taking it marks the scales
//! used), and an MXFP4 pair `P_blocks` / `P_scales` is the one tensor `P` in transformers'
//! in-memory layout. The quantization comes from the folder's `config.json`
//! ([`Checkpoint::load_dir`]) or is given ([`Checkpoint::with_quantization`]).
//!
//! Bad input is an error naming the file and the tensor, never a panic: a truncated file or
//! a header whose offsets do not fit the file fails when the file is opened; a dtype that
//! cannot be converted, a missing scale or a NaN weight fails when that tensor is read; the
//! memory a tensor needs is checked against the host's before it is allocated.
//!
//! A memory-mapped file must not be changed while a checkpoint maps it: like every loader
//! of memory-mapped checkpoints (safetensors' own, candle, llama.cpp), a file truncated
//! under it faults the process (SIGBUS) rather than returning an error.

use super::quant::{self, Quantization};
use crate::error::{Error, Result};
use crate::tensor::HostTensor;
use safetensors::{Dtype, SafeTensors};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// The index file of sharded hub checkpoints: `weight_map` maps each tensor name to the
/// shard file that holds it.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// An element type as a file stores it (safetensors' and torch's names mapped onto one set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    F64,
    F32,
    F16,
    BF16,
    F8E4M3,
    I64,
    I32,
    U8,
    /// A type no tensor of the engine converts from, by its name in the file.
    Other(String),
}

impl Elem {
    fn from_safetensors(d: Dtype) -> Self {
        match d {
            Dtype::F64 => Elem::F64,
            Dtype::F32 => Elem::F32,
            Dtype::F16 => Elem::F16,
            Dtype::BF16 => Elem::BF16,
            Dtype::F8_E4M3 => Elem::F8E4M3,
            Dtype::I64 => Elem::I64,
            Dtype::I32 => Elem::I32,
            Dtype::U8 => Elem::U8,
            other => Elem::Other(format!("{other:?}")),
        }
    }

    /// Bytes per element, where it is a whole number.
    fn size(&self) -> Option<usize> {
        Some(match self {
            Elem::F64 | Elem::I64 => 8,
            Elem::F32 | Elem::I32 => 4,
            Elem::F16 | Elem::BF16 => 2,
            Elem::F8E4M3 | Elem::U8 => 1,
            Elem::Other(_) => return None,
        })
    }
}

impl fmt::Display for Elem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Elem::F64 => f.write_str("F64"),
            Elem::F32 => f.write_str("F32"),
            Elem::F16 => f.write_str("F16"),
            Elem::BF16 => f.write_str("BF16"),
            Elem::F8E4M3 => f.write_str("F8_E4M3"),
            Elem::I64 => f.write_str("I64"),
            Elem::I32 => f.write_str("I32"),
            Elem::U8 => f.write_str("U8"),
            Elem::Other(s) => f.write_str(s),
        }
    }
}

/// The bytes of one safetensors file: mapped, or handed over in memory.
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// One opened safetensors file, shared by the entries of its tensors.
pub(crate) struct StFile {
    path: String,
    bytes: Bytes,
}

impl StFile {
    fn data(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// Where a tensor's values are.
#[derive(Clone)]
pub(crate) enum Stored {
    /// Already in memory (`from_map`).
    Memory(HostTensor),
    /// `file`'s bytes `start..end` (checked against the file's length when it was opened).
    Safetensors { file: Arc<StFile>, elem: Elem, shape: Vec<usize>, start: usize, end: usize },
    /// A tensor of a torch archive at `path`, read through its handle.
    Torch { path: Arc<str>, elem: Elem, tensor: pytorch_reader::Tensor },
    /// An MXFP4 pair, by the names of its two tensors in the file.
    Mxfp4 { blocks: Box<(String, Stored)>, scales: Box<(String, Stored)> },
}

impl fmt::Debug for Stored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stored::Memory(t) => write!(f, "memory {:?} {:?}", t.dtype(), t.shape()),
            Stored::Safetensors { file, elem, shape, start, end } => {
                write!(f, "{} {elem} {shape:?} bytes {start}..{end}", file.path)
            }
            Stored::Torch { path, elem, tensor } => write!(f, "{path} {elem} {:?}", tensor.shape()),
            Stored::Mxfp4 { blocks, scales } => write!(f, "mxfp4 {} + {}", blocks.0, scales.0),
        }
    }
}

impl Stored {
    /// The tensor from a torch archive's handle.
    pub(crate) fn torch(path: Arc<str>, tensor: pytorch_reader::Tensor) -> Self {
        use pytorch_reader::DType as T;
        let elem = match tensor.dtype() {
            T::F64 => Elem::F64,
            T::F32 => Elem::F32,
            T::F16 => Elem::F16,
            T::BF16 => Elem::BF16,
            T::I64 => Elem::I64,
            T::I32 => Elem::I32,
            T::U8 => Elem::U8,
            other => Elem::Other(format!("{other:?}")),
        };
        Stored::Torch { path, elem, tensor }
    }

    /// The file the values come from (the checkpoint's source for in-memory ones).
    fn path<'a>(&'a self, source: &'a str) -> &'a str {
        match self {
            Stored::Memory(_) => source,
            Stored::Safetensors { file, .. } => &file.path,
            Stored::Torch { path, .. } => path,
            Stored::Mxfp4 { blocks, .. } => blocks.1.path(source),
        }
    }

    /// The element type in the file (none for in-memory tensors and pairs).
    fn elem(&self) -> Option<&Elem> {
        match self {
            Stored::Safetensors { elem, .. } | Stored::Torch { elem, .. } => Some(elem),
            _ => None,
        }
    }

    /// The shape in the file (for a pair: the blocks').
    fn disk_shape(&self) -> &[usize] {
        match self {
            Stored::Memory(t) => t.shape(),
            Stored::Safetensors { shape, .. } => shape,
            Stored::Torch { tensor, .. } => tensor.shape(),
            Stored::Mxfp4 { blocks, .. } => blocks.1.disk_shape(),
        }
    }

    /// The raw little-endian bytes of a file tensor.
    fn bytes(&self, name: &str, source: &str) -> Result<Cow<'_, [u8]>> {
        match self {
            Stored::Safetensors { file, start, end, .. } => {
                // Checked when the file was opened; checked again so that no path through
                // here can slice out of bounds.
                file.data().get(*start..*end).map(Cow::Borrowed).ok_or_else(|| {
                    bad(&file.path, name, format!("bytes {start}..{end} lie past the file's {}", file.data().len()))
                })
            }
            Stored::Torch { path, elem, tensor } => {
                let mut v = tensor.read().map_err(|e| Error::Checkpoint {
                    path: path.to_string(),
                    msg: format!("tensor `{name}`: reading its storage failed"),
                    source: Some(Box::new(e)),
                })?;
                // pytorch-reader hands back native-endian bytes; the decoders read
                // little-endian ones, as safetensors stores them.
                if cfg!(target_endian = "big") {
                    if let Some(n) = elem.size() {
                        v.chunks_exact_mut(n).for_each(<[u8]>::reverse);
                    }
                }
                Ok(Cow::Owned(v))
            }
            _ => Err(Error::Internal(format!("tensor `{name}` of {source} has no bytes of its own"))),
        }
    }
}

/// A tensor by name: where it is, and its values once [`Checkpoint::get`] read them.
#[derive(Clone, Debug)]
struct Entry {
    stored: Stored,
    cache: OnceLock<HostTensor>,
}

impl Entry {
    fn new(stored: Stored) -> Self {
        Entry { stored, cache: OnceLock::new() }
    }
}

/// An error about tensor `name` of `path`.
fn bad(path: &str, name: &str, msg: impl fmt::Display) -> Error {
    Error::Checkpoint { path: path.into(), msg: format!("tensor `{name}`: {msg}"), source: None }
}

/// An I/O error on `path`.
fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source: e }
}

/// Errors unless the host has memory for an f32/i32 tensor of `numel` elements plus
/// `extra` bytes read on the way.
fn check_alloc(path: &str, name: &str, numel: usize, extra: usize) -> Result<()> {
    let bytes = (numel as u64).checked_mul(4).and_then(|b| b.checked_add(extra as u64)).unwrap_or(u64::MAX);
    crate::memory::check_host(&format!("tensor `{name}` of {path}"), bytes)
}

/// Converts a file tensor's little-endian bytes to an f32 or i32 host tensor.
fn decode(path: &str, name: &str, elem: &Elem, shape: &[usize], data: &[u8]) -> Result<HostTensor> {
    match elem {
        Elem::F8E4M3 => {
            return Err(bad(
                path,
                name,
                "is F8_E4M3 and only block-scaled weights (`X.weight` + `X.weight_scale_inv`) are read",
            ))
        }
        Elem::U8 => {
            return Err(bad(
                path,
                name,
                "has dtype U8, which the engine reads only as half of an MXFP4 pair `P_blocks` + `P_scales` \
                 (quant_method mxfp4)",
            ))
        }
        Elem::Other(d) => return Err(bad(path, name, format!("unsupported dtype {d}"))),
        _ => {}
    }
    let n = crate::tensor::numel(name, shape)?;
    if let Some(size) = elem.size() {
        if n.checked_mul(size) != Some(data.len()) {
            return Err(bad(path, name, format!("{} bytes do not hold {shape:?} of {elem}", data.len())));
        }
    }
    check_alloc(path, name, n, 0)?;
    let f32s = |w: usize, f: fn(&[u8]) -> f32| HostTensor::f32(shape, data.chunks_exact(w).map(f).collect());
    match elem {
        Elem::F32 => f32s(4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        Elem::F16 => f32s(2, |c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        Elem::BF16 => f32s(2, |c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        Elem::F64 => f32s(8, |c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32),
        Elem::I32 => {
            HostTensor::i32(shape, data.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
        Elem::I64 => {
            let mut v = Vec::with_capacity(n);
            for (i, c) in data.chunks_exact(8).enumerate() {
                let x = i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                let x = i32::try_from(x)
                    .map_err(|_| bad(path, name, format!("int64 value {x} at flat index {i} does not fit in int32")))?;
                v.push(x);
            }
            HostTensor::i32(shape, v)
        }
        Elem::F8E4M3 | Elem::U8 | Elem::Other(_) => Err(Error::Internal(format!("tensor `{name}`: dtype {elem}"))),
    }
}

/// A tensor as its file stores it ([`Checkpoint::stored`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTensor {
    /// Its name in the file.
    pub name: String,
    /// Its dtype as safetensors names it (`F32`, `BF16`, `F8_E4M3`, `U8`, ...).
    pub dtype: String,
    /// Its shape in the file.
    pub shape: Vec<usize>,
    /// Its bytes in the file.
    pub bytes: u64,
}

/// Named tensors with use tracking, read lazily from their files.
#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    entries: BTreeMap<String, Entry>,
    taken: BTreeSet<String>,
    source: String,
    quant: Option<Quantization>,
    /// A tensor [`Checkpoint::take_opt`] found but could not read, with why: reported by
    /// [`Checkpoint::finish`], since `take_opt` itself returns no error.
    unread: Option<(String, String)>,
}

impl Checkpoint {
    /// Wraps tensors already in memory; `source` names them in errors.
    pub fn from_map(tensors: BTreeMap<String, HostTensor>, source: &str) -> Self {
        let entries = tensors.into_iter().map(|(k, t)| (k, Entry::new(Stored::Memory(t)))).collect();
        Checkpoint { entries, source: source.into(), ..Default::default() }
    }

    /// A checkpoint of `entries` read from `source`.
    pub(crate) fn from_stored(entries: Vec<(String, Stored)>, source: &str) -> Result<Self> {
        let mut out = Checkpoint { source: source.into(), ..Default::default() };
        for (k, s) in entries {
            out.insert(k, s)?;
        }
        Ok(out)
    }

    /// Adds a tensor; a name already present is an error naming both files.
    fn insert(&mut self, name: String, stored: Stored) -> Result<()> {
        if let Some(old) = self.entries.get(&name) {
            let (a, b) = (old.stored.path(&self.source).to_string(), stored.path(&self.source).to_string());
            let msg = if a == b {
                format!("tensor `{name}` appears twice")
            } else {
                format!("tensor `{name}` is also in {a}")
            };
            return Err(Error::Checkpoint { path: b, msg, source: None });
        }
        self.entries.insert(name, Entry::new(stored));
        Ok(())
    }

    /// Moves every tensor of `other` into this checkpoint; a name in both is an error
    /// naming both files.
    pub(crate) fn absorb(&mut self, other: Checkpoint) -> Result<()> {
        for (k, e) in other.entries {
            self.insert(k, e.stored)?;
        }
        Ok(())
    }

    /// Opens one safetensors file: its header is parsed, its tensors are read when asked
    /// for. No `config.json` is consulted: quantized weights need
    /// [`Checkpoint::with_quantization`] (or [`Checkpoint::load_dir`] on the folder).
    pub fn load(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| io(path, e))?;
        // SAFETY: a read-only, private mapping. What it relies on, as every loader of mapped
        // checkpoints does, is that the file is not changed while mapped (see the module
        // docs); a file that is merely malformed is checked before any byte past its header
        // is read.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io(path, e))?;
        let st = Arc::new(StFile { path: path.display().to_string(), bytes: Bytes::Mapped(map) });
        let entries = Self::header(&st)?;
        Self::from_stored(entries, &st.path)
    }

    /// Parses safetensors bytes held in memory; `source` names them in errors.
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Self> {
        let st = Arc::new(StFile { path: source.into(), bytes: Bytes::Owned(bytes.to_vec()) });
        let entries = Self::header(&st)?;
        Self::from_stored(entries, source)
    }

    /// The tensors a safetensors file's header describes, with their byte ranges checked
    /// against the file (safetensors' `read_metadata` checks that the offsets are
    /// contiguous, match each dtype and shape, and end where the file does).
    fn header(st: &Arc<StFile>) -> Result<Vec<(String, Stored)>> {
        let data = st.data();
        let (n, meta) = SafeTensors::read_metadata(data).map_err(|e| Error::Checkpoint {
            path: st.path.clone(),
            msg: "not a valid safetensors file (truncated, or a header that does not match its data)".into(),
            source: Some(Box::new(e)),
        })?;
        let base = n + 8;
        let mut out = Vec::new();
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            let range = base.checked_add(s).zip(base.checked_add(e)).filter(|&(s, e)| s <= e && e <= data.len());
            let Some((start, end)) = range else {
                return Err(bad(
                    &st.path,
                    &name,
                    format!("data offsets {s}..{e} lie past the file's {} bytes", data.len()),
                ));
            };
            let elem = Elem::from_safetensors(info.dtype);
            out.push((name, Stored::Safetensors { file: st.clone(), elem, shape: info.shape.clone(), start, end }));
        }
        Ok(out)
    }

    /// Opens a model folder: the shards `model.safetensors.index.json` lists (each tensor in
    /// the shard its `weight_map` names), or else every `*.safetensors` file; with the
    /// quantization of `config.json`'s `quantization_config` where there is one. Errors name
    /// the file: a listed shard that is missing, a tensor in two shards or in another shard
    /// than the index says, a tensor the index lists that its shard lacks.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let rd = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
        let quant = read_quantization(dir)?;
        let index_path = dir.join(INDEX_FILE);
        let mut out = Checkpoint { source: dir.display().to_string(), ..Default::default() };
        if index_path.is_file() {
            let map = read_index(&index_path)?;
            let shards: BTreeSet<&str> = map.values().map(String::as_str).collect();
            for shard in shards {
                let path = dir.join(shard);
                if !path.is_file() {
                    return Err(Error::Checkpoint {
                        path: path.display().to_string(),
                        msg: format!("listed in {INDEX_FILE} but missing"),
                        source: None,
                    });
                }
                let part = Self::load(&path)?;
                for name in part.entries.keys() {
                    match map.get(name) {
                        Some(s) if s != shard => {
                            return Err(bad(
                                &part.source,
                                name,
                                format!("is in this shard but {INDEX_FILE} maps it to `{s}`"),
                            ))
                        }
                        _ => {}
                    }
                }
                out.absorb(part)?;
            }
            if let Some((name, shard)) = map.iter().find(|(n, _)| !out.entries.contains_key(*n)) {
                return Err(bad(
                    &dir.join(shard).display().to_string(),
                    name,
                    format!("listed in {INDEX_FILE} but not in its shard"),
                ));
            }
        } else {
            let mut files: Vec<_> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::Checkpoint {
                    path: dir.display().to_string(),
                    msg: format!("no .safetensors files (and no {INDEX_FILE})"),
                    source: None,
                });
            }
            for f in files {
                out.absorb(Self::load(&f)?)?;
            }
        }
        out.with_quantization(quant)
    }

    /// Sets how the weights are quantized (see [`Quantization`]) and, for MXFP4, pairs
    /// every U8 `P_blocks` with its U8 `P_scales` into the one tensor `P`. A pair whose
    /// name `P` is also a tensor of its own is an error.
    pub fn with_quantization(mut self, quant: Option<Quantization>) -> Result<Self> {
        self.quant = quant;
        if quant == Some(Quantization::Mxfp4) {
            let bases: Vec<String> =
                self.entries.keys().filter_map(|k| k.strip_suffix("_blocks")).map(str::to_string).collect();
            for base in bases {
                let (bn, sn) = (format!("{base}_blocks"), format!("{base}_scales"));
                let is_u8 = |n: &str| self.entries.get(n).and_then(|e| e.stored.elem()) == Some(&Elem::U8);
                if !(is_u8(&bn) && is_u8(&sn)) {
                    continue;
                }
                if let Some(e) = self.entries.get(&base) {
                    return Err(bad(
                        e.stored.path(&self.source),
                        &base,
                        format!("is a tensor and also the MXFP4 pair `{bn}` + `{sn}`"),
                    ));
                }
                let (b, s) = (self.entries.remove(&bn), self.entries.remove(&sn));
                if let (Some(b), Some(s)) = (b, s) {
                    let pair = Stored::Mxfp4 { blocks: Box::new((bn, b.stored)), scales: Box::new((sn, s.stored)) };
                    self.entries.insert(base, Entry::new(pair));
                }
            }
        }
        Ok(self)
    }

    /// How the weights are quantized, where that is known.
    pub fn quantization(&self) -> Option<Quantization> {
        self.quant
    }

    /// Where the tensors came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether a tensor exists (an MXFP4 pair `P_blocks` + `P_scales` is the tensor `P`).
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Tensor names, in order (from the files' headers: nothing is read).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    /// The shape a tensor has once read (dequantized for quantized weights), from the
    /// headers; `None` when it is absent (or an MXFP4 pair's shapes do not pair up).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.entries.get(name)?.stored {
            Stored::Mxfp4 { blocks, scales } => quant::mxfp4_shape(blocks.1.disk_shape(), scales.1.disk_shape()).ok(),
            s => Some(s.disk_shape().to_vec()),
        }
    }

    /// What the files hold for tensor `name`, without reading it: each stored tensor's
    /// own name, dtype (as safetensors names it), shape and bytes. One entry, or two for
    /// an MXFP4 pair (`P_blocks`, `P_scales`); empty when `name` is absent. An FP8 weight's
    /// `weight_scale_inv` is a tensor of its own name.
    pub fn stored(&self, name: &str) -> Vec<StoredTensor> {
        fn one(name: &str, s: &Stored) -> Vec<StoredTensor> {
            let (dtype, shape) = match s {
                Stored::Memory(t) => (format!("{:?}", t.dtype()).to_uppercase(), t.shape().to_vec()),
                Stored::Safetensors { elem, shape, .. } => (elem.to_string(), shape.clone()),
                Stored::Torch { elem, tensor, .. } => (elem.to_string(), tensor.shape().to_vec()),
                Stored::Mxfp4 { blocks, scales } => {
                    let mut v = one(&blocks.0, &blocks.1);
                    v.extend(one(&scales.0, &scales.1));
                    return v;
                }
            };
            let numel: u64 = shape.iter().map(|&d| d as u64).product();
            let size = match s {
                Stored::Safetensors { elem, .. } | Stored::Torch { elem, .. } => elem.size().unwrap_or(0) as u64,
                _ => 4,
            };
            vec![StoredTensor { name: name.to_string(), dtype, shape, bytes: numel * size }]
        }
        self.entries.get(name).map_or_else(Vec::new, |e| one(name, &e.stored))
    }

    /// A subset of the tensors under new names: those `rename` maps to `Some`. Nothing is
    /// read: tensors still in their files stay there (the files are shared), tensors in
    /// memory are copied. `source` names the result in errors; no tensor is marked used.
    pub fn renamed(&self, rename: impl Fn(&str) -> Option<String>, source: &str) -> Checkpoint {
        let entries = self.entries.iter().filter_map(|(k, e)| rename(k).map(|n| (n, e.clone()))).collect();
        Checkpoint { entries, source: source.into(), quant: self.quant, ..Default::default() }
    }

    /// Every tensor with its name, in name order (without marking any used). Reads every
    /// tensor not read yet, so a tensor that cannot be read is an error here.
    pub fn iter(&self) -> Result<impl Iterator<Item = (&str, &HostTensor)>> {
        let all = self.entries.keys().map(|k| Ok((k.as_str(), self.get(k)?))).collect::<Result<Vec<_>>>()?;
        Ok(all.into_iter())
    }

    /// Borrows a tensor without marking it used. The first call reads it from its file and
    /// keeps it, so later calls (and a `take`) do not read it again.
    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor(name.into()))?;
        if let Stored::Memory(t) = &e.stored {
            return Ok(t);
        }
        if let Some(t) = e.cache.get() {
            return Ok(t);
        }
        let t = self.read(name, &e.stored)?;
        Ok(e.cache.get_or_init(|| t))
    }

    /// Takes a tensor, marking it used (with its block scales, for an FP8 weight); errors
    /// name it when it is missing or cannot be read.
    pub fn take(&mut self, name: &str) -> Result<HostTensor> {
        let e = self.entries.get_mut(name).ok_or_else(|| Error::MissingTensor(name.into()))?;
        // What `get` read is handed over rather than read again.
        let held = match &e.stored {
            Stored::Memory(t) => Some(t.clone()),
            _ => e.cache.take(),
        };
        let t = match held {
            Some(t) => t,
            None => self.read(name, &self.entries[name].stored)?,
        };
        if let Some(scale) = self.fp8_scale_of(name) {
            self.taken.insert(scale);
        }
        self.taken.insert(name.into());
        Ok(t)
    }

    /// Takes a tensor and checks its shape.
    pub fn take_shaped(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self.take(name)?;
        t.expect_shape(name, shape)?;
        Ok(t)
    }

    /// Takes a tensor if present. One that is present but cannot be read gives `None` here
    /// and makes [`Checkpoint::finish`] fail with why; [`Checkpoint::try_take_opt`] reports
    /// it at once.
    pub fn take_opt(&mut self, name: &str) -> Option<HostTensor> {
        match self.try_take_opt(name) {
            Ok(t) => t,
            Err(e) => {
                if self.unread.is_none() {
                    self.unread = Some((name.to_string(), e.to_string()));
                }
                None
            }
        }
    }

    /// Takes a tensor if present; one that is present but cannot be read is an error.
    pub fn try_take_opt(&mut self, name: &str) -> Result<Option<HostTensor>> {
        if self.contains(name) {
            self.take(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Errors listing every tensor under `prefix` that no importer took (and first, a
    /// tensor that [`Checkpoint::take_opt`] could not read).
    pub fn finish(&self, prefix: &str) -> Result<()> {
        if let Some((name, why)) = &self.unread {
            return Err(Error::Checkpoint {
                path: self.source.clone(),
                msg: format!("optional tensor `{name}` could not be read: {why}"),
                source: None,
            });
        }
        let extra: Vec<String> =
            self.entries.keys().filter(|k| k.starts_with(prefix) && !self.taken.contains(*k)).cloned().collect();
        if extra.is_empty() {
            Ok(())
        } else {
            Err(Error::UnexpectedTensors(extra))
        }
    }

    /// The block scales `{name}_scale_inv` of an F8_E4M3 weight `name`, if it is one.
    fn fp8_scale_of(&self, name: &str) -> Option<String> {
        let e = self.entries.get(name)?;
        (e.stored.elem() == Some(&Elem::F8E4M3)).then(|| format!("{name}_scale_inv"))
    }

    /// Reads tensor `name` from where it is stored, dequantizing quantized weights.
    fn read(&self, name: &str, stored: &Stored) -> Result<HostTensor> {
        let path = stored.path(&self.source);
        match stored {
            Stored::Memory(t) => Ok(t.clone()),
            Stored::Mxfp4 { blocks, scales } => self.read_mxfp4(name, blocks, scales),
            s if s.elem() == Some(&Elem::F8E4M3) => self.read_fp8(name, s),
            s => {
                let elem = s.elem().ok_or_else(|| Error::Internal(format!("tensor `{name}` has no dtype")))?;
                // Refuse before reading what cannot be converted (a 10 GB U8 tensor, say).
                if matches!(elem, Elem::U8 | Elem::Other(_)) {
                    return decode(path, name, elem, s.disk_shape(), &[]);
                }
                decode(path, name, elem, s.disk_shape(), &s.bytes(name, &self.source)?)
            }
        }
    }

    /// An F8_E4M3 weight dequantized with its `*_scale_inv` block scales.
    fn read_fp8(&self, name: &str, q: &Stored) -> Result<HostTensor> {
        let path = q.path(&self.source);
        let Some(Quantization::Fp8 { block }) = self.quant else {
            return Err(bad(
                path,
                name,
                "is F8_E4M3: dequantizing it needs config.json's quantization_config {quant_method: \"fp8\", \
                 weight_block_size} (open the model folder with Checkpoint::load_dir)",
            ));
        };
        let sname = format!("{name}_scale_inv");
        let s = &self
            .entries
            .get(&sname)
            .ok_or_else(|| bad(path, name, format!("is F8_E4M3 but its block scales `{sname}` are missing")))?
            .stored;
        let spath = s.path(&self.source);
        match s.elem() {
            Some(Elem::F32 | Elem::BF16) => {}
            other => {
                let got = other.map_or("an in-memory tensor".to_string(), ToString::to_string);
                return Err(Error::dtype(format!("{sname} (of {spath})"), "F32 or BF16 block scales", got));
            }
        }
        let shape = q.disk_shape();
        let want = quant::fp8_scale_shape(shape, block).map_err(|e| bad(path, name, e))?;
        if s.disk_shape() != want.as_slice() {
            return Err(bad(
                spath,
                &sname,
                format!(
                    "has shape {:?}; weight `{name}` {shape:?} with weight_block_size {block:?} needs {want:?}",
                    s.disk_shape()
                ),
            ));
        }
        let n = crate::tensor::numel(name, shape)?;
        check_alloc(path, name, n, n)?;
        let scale = decode(spath, &sname, s.elem().unwrap_or(&Elem::F32), &want, &s.bytes(&sname, &self.source)?)?;
        let codes = q.bytes(name, &self.source)?;
        let v =
            quant::dequant_fp8(&codes, shape, scale.as_f32(&sname)?, &want, block).map_err(|e| bad(path, name, e))?;
        HostTensor::f32(shape, v)
    }

    /// An MXFP4 pair dequantized into transformers' in-memory layout.
    fn read_mxfp4(&self, name: &str, blocks: &(String, Stored), scales: &(String, Stored)) -> Result<HostTensor> {
        let path = blocks.1.path(&self.source);
        let (bshape, sshape) = (blocks.1.disk_shape(), scales.1.disk_shape());
        let shape = quant::mxfp4_shape(bshape, sshape)
            .map_err(|e| bad(path, name, format!("{} + {}: {e}", blocks.0, scales.0)))?;
        let n = crate::tensor::numel(name, &shape)?;
        check_alloc(path, name, n, n / 2)?;
        let b = blocks.1.bytes(&blocks.0, &self.source)?;
        let s = scales.1.bytes(&scales.0, &self.source)?;
        let v = quant::dequant_mxfp4(&b, bshape, &s, sshape)
            .map_err(|e| bad(path, name, format!("{} + {}: {e}", blocks.0, scales.0)))?;
        HostTensor::f32(&shape, v)
    }
}

/// The quantization of the model in `dir`, from its `config.json` (none without one).
fn read_quantization(dir: &Path) -> Result<Option<Quantization>> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: path.display().to_string(),
        msg: "not valid JSON".into(),
        source: Some(Box::new(e)),
    })?;
    Quantization::from_config(&cfg).map_err(|e| Error::Checkpoint {
        path: path.display().to_string(),
        msg: e.to_string(),
        source: Some(Box::new(e)),
    })
}

/// `weight_map` of a shard index: tensor name → shard file name (a plain file name in the
/// same folder).
fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let at = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    let bad_index = |msg: String| Error::Checkpoint { path: at.clone(), msg, source: None };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: at.clone(),
        msg: "not valid JSON".into(),
        source: Some(Box::new(e)),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad_index("has no `weight_map` object".into()))?;
    let mut out = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| bad_index(format!("`weight_map.{name}` is not a file name: {file}")))?;
        // A shard is a file beside the index: no paths into other folders.
        if Path::new(file).file_name().and_then(|f| f.to_str()) != Some(file) {
            return Err(bad_index(format!("`weight_map.{name}` = `{file}` is not a file name in this folder")));
        }
        out.insert(name.clone(), file.to_string());
    }
    if out.is_empty() {
        return Err(bad_index("`weight_map` lists no tensors".into()));
    }
    Ok(out)
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
