//! Host tensors (owned `Vec` data with a shape) and the dtype enum shared by all backends.

use crate::error::{Error, Result};

/// Element types the engine knows. Storage dtypes per backend are listed in
/// [`crate::backend::Capabilities`]; routing always runs in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE single precision: the reference precision.
    F32,
    /// IEEE half precision (storage only; f32 accumulation).
    F16,
    /// bfloat16 (storage only; f32 accumulation).
    BF16,
    /// 32-bit signed integers: expert indices, slots, counts.
    I32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        })
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "i32" | "int32" => Ok(DType::I32),
            _ => Err(Error::config("dtype", format!("unknown dtype `{s}` (f32, f16, bf16, i32)"))),
        }
    }
}

/// Host-side tensor data.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    /// f32 values.
    F32(Vec<f32>),
    /// i32 values.
    I32(Vec<i32>),
}

/// An owned, row-major host tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The elements, row-major.
    pub data: HostData,
}

impl HostTensor {
    /// An f32 tensor; errors if the data length does not match the shape.
    pub fn f32(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        check_len("f32 tensor", shape, data.len())?;
        Ok(HostTensor { shape: shape.to_vec(), data: HostData::F32(data) })
    }
    /// An i32 tensor; errors if the data length does not match the shape.
    pub fn i32(shape: &[usize], data: Vec<i32>) -> Result<Self> {
        check_len("i32 tensor", shape, data.len())?;
        Ok(HostTensor { shape: shape.to_vec(), data: HostData::I32(data) })
    }
    /// A zero-filled f32 tensor.
    pub fn zeros(shape: &[usize]) -> Self {
        HostTensor { shape: shape.to_vec(), data: HostData::F32(vec![0.0; shape.iter().product()]) }
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self.data {
            HostData::F32(_) => DType::F32,
            HostData::I32(_) => DType::I32,
        }
    }
    /// The f32 data, or an error naming `name` when the tensor holds integers.
    pub fn as_f32(&self, name: &str) -> Result<&[f32]> {
        match &self.data {
            HostData::F32(v) => Ok(v),
            HostData::I32(_) => Err(Error::DType { tensor: name.into(), expected: "f32".into(), got: "i32".into() }),
        }
    }
    /// The i32 data, or an error naming `name` when the tensor holds floats.
    pub fn as_i32(&self, name: &str) -> Result<&[i32]> {
        match &self.data {
            HostData::I32(v) => Ok(v),
            HostData::F32(_) => Err(Error::DType { tensor: name.into(), expected: "i32".into(), got: "f32".into() }),
        }
    }
    /// Consumes the tensor, returning its f32 data.
    pub fn into_f32(self, name: &str) -> Result<Vec<f32>> {
        match self.data {
            HostData::F32(v) => Ok(v),
            HostData::I32(_) => Err(Error::DType { tensor: name.into(), expected: "f32".into(), got: "i32".into() }),
        }
    }
    /// Consumes the tensor, returning its i32 data.
    pub fn into_i32(self, name: &str) -> Result<Vec<i32>> {
        match self.data {
            HostData::I32(v) => Ok(v),
            HostData::F32(_) => Err(Error::DType { tensor: name.into(), expected: "i32".into(), got: "f32".into() }),
        }
    }
    /// Values as f64 whatever the dtype (for comparisons and reports).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            HostData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            HostData::I32(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }
    /// Same data under another shape with the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(Error::shape("reshape", format!("{} elements", n), &self.shape));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }
    /// Checks the shape, naming the tensor in the error.
    pub fn expect_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(Error::shape(name, format!("{shape:?}"), &self.shape));
        }
        Ok(())
    }
}

fn check_len(what: &str, shape: &[usize], len: usize) -> Result<()> {
    let n: usize = shape.iter().product();
    if n != len {
        return Err(Error::shape(what, format!("{shape:?} ({n} elements)"), &[len]));
    }
    Ok(())
}
