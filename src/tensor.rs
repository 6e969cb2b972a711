//! Host tensors (owned `Vec` data with a shape), the dtype enum shared by all backends,
//! and the checked size arithmetic every shape goes through.
//!
//! A [`HostTensor`] always holds exactly as many elements as its shape says: its fields
//! are private and every constructor checks, so code that trusts a tensor's shape to
//! index its data (the cpu backend's matrix products do, through raw pointers) can never
//! read past the end.

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

    /// Whether values of this type are floating point.
    pub fn is_float(self) -> bool {
        !matches!(self, DType::I32)
    }

    /// `x` rounded to this type (round to nearest even, as PyTorch's `.to()`), back in
    /// f32; f32 and i32 leave it unchanged.
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::BF16 => half::bf16::from_f32(x).to_f32(),
            DType::F32 | DType::I32 => x,
        }
    }

    /// The 16-bit patterns of `v` in this type (f16 or bf16), rounded to nearest even: how
    /// the backends store half-precision weights.
    pub fn half_bits(self, v: &[f32]) -> Result<Vec<u16>> {
        match self {
            DType::F16 => Ok(v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect()),
            DType::BF16 => Ok(v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()),
            other => Err(Error::Internal(format!("half_bits asked for {other}, a type of 4 bytes"))),
        }
    }

    /// f32 values of 16-bit patterns of this type (f16 or bf16).
    pub fn from_half_bits(self, bits: &[u16]) -> Result<Vec<f32>> {
        match self {
            DType::F16 => Ok(bits.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect()),
            DType::BF16 => Ok(bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect()),
            other => Err(Error::Internal(format!("from_half_bits asked for {other}, a type of 4 bytes"))),
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

/// The element count of `shape`, or an error naming `what` when the product overflows.
pub fn numel(what: &str, shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| {
        Error::too_large(format!("tensor `{what}` of shape {shape:?}"), "more elements", "a machine word counts")
    })
}

/// The bytes of `shape` in `dtype`, or an error naming `what` when the size overflows.
pub fn nbytes(what: &str, shape: &[usize], dtype: DType) -> Result<u64> {
    let n = numel(what, shape)? as u64;
    n.checked_mul(dtype.size() as u64).ok_or_else(|| {
        Error::too_large(format!("tensor `{what}` of shape {shape:?}"), "more bytes", "a machine word counts")
    })
}

/// `a · b` for sizes, or an error naming `what`.
pub fn mul_size(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::too_large(what, format!("{a} × {b}"), "a machine word"))
}

/// Host-side tensor data.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    /// f32 values.
    F32(Vec<f32>),
    /// i32 values.
    I32(Vec<i32>),
}

impl HostData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::I32(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An owned, row-major host tensor whose data always matches its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    shape: Vec<usize>,
    data: HostData,
}

impl HostTensor {
    /// A tensor of `data` under `shape`; errors if the length does not match the shape
    /// (or the shape's product overflows).
    pub fn new(shape: &[usize], data: HostData) -> Result<Self> {
        let n = numel("host tensor", shape)?;
        if n != data.len() {
            return Err(Error::shape("host tensor", format!("{shape:?} ({n} elements)"), &[data.len()]));
        }
        Ok(HostTensor { shape: shape.to_vec(), data })
    }
    /// An f32 tensor; errors if the data length does not match the shape.
    pub fn f32(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        Self::new(shape, HostData::F32(data))
    }
    /// An i32 tensor; errors if the data length does not match the shape.
    pub fn i32(shape: &[usize], data: Vec<i32>) -> Result<Self> {
        Self::new(shape, HostData::I32(data))
    }
    /// A 0-d f32 tensor.
    pub fn scalar(v: f32) -> Self {
        HostTensor { shape: Vec::new(), data: HostData::F32(vec![v]) }
    }
    /// A zero-filled f32 tensor; errors when the shape's product overflows.
    pub fn zeros(shape: &[usize]) -> Result<Self> {
        let n = numel("zeros", shape)?;
        Ok(HostTensor { shape: shape.to_vec(), data: HostData::F32(vec![0.0; n]) })
    }
    /// Dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// The elements.
    pub fn data(&self) -> &HostData {
        &self.data
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
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
            HostData::I32(_) => Err(Error::dtype(name, "f32", "i32")),
        }
    }
    /// The i32 data, or an error naming `name` when the tensor holds floats.
    pub fn as_i32(&self, name: &str) -> Result<&[i32]> {
        match &self.data {
            HostData::I32(v) => Ok(v),
            HostData::F32(_) => Err(Error::dtype(name, "i32", "f32")),
        }
    }
    /// Consumes the tensor, returning its f32 data.
    pub fn into_f32(self, name: &str) -> Result<Vec<f32>> {
        match self.data {
            HostData::F32(v) => Ok(v),
            HostData::I32(_) => Err(Error::dtype(name, "f32", "i32")),
        }
    }
    /// Consumes the tensor, returning its i32 data.
    pub fn into_i32(self, name: &str) -> Result<Vec<i32>> {
        match self.data {
            HostData::I32(v) => Ok(v),
            HostData::F32(_) => Err(Error::dtype(name, "i32", "f32")),
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
        let n = numel("reshape", shape)?;
        if n != self.numel() {
            return Err(Error::shape("reshape", format!("{shape:?} ({n} elements)"), &self.shape));
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
    /// Errors naming the tensor and the first bad element when an f32 tensor holds NaN or
    /// infinity; i32 tensors are always finite.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        let HostData::F32(v) = &self.data else { return Ok(()) };
        match v.iter().position(|x| !x.is_finite()) {
            None => Ok(()),
            Some(i) => Err(Error::NonFinite { tensor: name.into(), index: unravel(i, &self.shape), value: v[i] }),
        }
    }
    /// The same values rounded to `dtype` (f16, bf16), still stored as f32.
    pub fn rounded(&self, dtype: DType) -> Result<HostTensor> {
        let v = self.as_f32("rounded tensor")?;
        HostTensor::f32(&self.shape, v.iter().map(|&x| dtype.round(x)).collect())
    }
}

/// The multi-dimensional index of flat index `i` in `shape` (row-major).
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut out = vec![0; shape.len()];
    for (o, &d) in out.iter_mut().zip(shape).rev() {
        if d > 0 {
            *o = i % d;
            i /= d;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_that_does_not_match_the_shape_is_refused() {
        assert!(HostTensor::f32(&[2, 3], vec![0.0; 5]).is_err());
        assert!(HostTensor::i32(&[4], vec![0; 5]).is_err());
        assert!(HostTensor::new(&[usize::MAX, 3], HostData::F32(vec![])).is_err());
        assert!(HostTensor::zeros(&[usize::MAX, 2]).is_err());
        assert!(HostTensor::f32(&[2, 3], vec![0.0; 6]).unwrap().reshape(&[5]).is_err());
    }

    #[test]
    fn non_finite_values_are_named_with_their_index() {
        let t = HostTensor::f32(&[2, 3], vec![0.0, 1.0, 2.0, 3.0, f32::NAN, f32::INFINITY]).unwrap();
        match t.check_finite("noise.gumbel") {
            Err(Error::NonFinite { tensor, index, value }) => {
                assert_eq!(tensor, "noise.gumbel");
                assert_eq!(index, vec![1, 1]);
                assert!(value.is_nan());
            }
            other => panic!("{other:?}"),
        }
        HostTensor::i32(&[2], vec![1, 2]).unwrap().check_finite("ids").unwrap();
    }

    #[test]
    fn checked_sizes_overflow_into_errors() {
        assert_eq!(numel("x", &[2, 3, 4]).unwrap(), 24);
        assert_eq!(numel("x", &[]).unwrap(), 1);
        assert!(numel("x", &[1 << 40, 1 << 40]).is_err());
        assert!(nbytes("x", &[usize::MAX / 2], DType::F32).is_err());
        assert_eq!(unravel(5, &[2, 3]), vec![1, 2]);
    }
}
