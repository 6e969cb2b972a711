//! The device tensor handle: a buffer plus shape and dtype. A handle can only be made over
//! a buffer large enough for its shape ([`DeviceTensor::from_parts`] checks), so a kernel
//! or matrix product that trusts the shape never reads or writes past the buffer. Code
//! names it through the alias `crate::device::Tensor<B>`, the handle over backend `B`'s
//! buffers.

use crate::error::{Error, Result};
use crate::tensor::{nbytes, numel, DType};
use std::sync::Arc;

/// What the engine needs to know of a backend's buffer: how many bytes it holds.
pub trait DeviceBuffer: Send + Sync {
    /// Bytes of storage behind the buffer (what a tensor over it may address).
    fn bytes(&self) -> u64;
}

/// A tensor living on a device: a handle to a buffer of type `Buf`, plus shape and dtype.
pub struct DeviceTensor<Buf: DeviceBuffer> {
    buf: Arc<Buf>,
    shape: Vec<usize>,
    dtype: DType,
}

impl<Buf: DeviceBuffer> Clone for DeviceTensor<Buf> {
    /// Another handle to the same buffer (no copy of the data).
    fn clone(&self) -> Self {
        DeviceTensor { buf: self.buf.clone(), shape: self.shape.clone(), dtype: self.dtype }
    }
}

impl<Buf: DeviceBuffer> DeviceTensor<Buf> {
    /// Wraps a backend buffer. Backends call this on the buffers they allocate; it errors
    /// (an internal error: the backend sized the buffer wrong) unless the buffer holds
    /// the shape's elements in `dtype`.
    pub fn from_parts(buf: Buf, shape: Vec<usize>, dtype: DType) -> Result<Self> {
        let need = nbytes("device tensor", &shape, dtype)?;
        if buf.bytes() < need {
            return Err(Error::Internal(format!(
                "a buffer of {} bytes cannot hold a {dtype} tensor of shape {shape:?} ({need} bytes)",
                buf.bytes()
            )));
        }
        Ok(DeviceTensor { buf: Arc::new(buf), shape, dtype })
    }
    /// A view of the same buffer under another shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let n = numel("reshape", shape)?;
        if n != self.numel() {
            return Err(Error::shape("reshape", format!("{shape:?} ({n} elements)"), &self.shape));
        }
        Ok(DeviceTensor { buf: self.buf.clone(), shape: shape.to_vec(), dtype: self.dtype })
    }
    /// The backend buffer.
    pub fn buffer(&self) -> &Buf {
        &self.buf
    }
    /// The backend buffer for writing, when this handle is the only one over it (no other
    /// tensor sees the change): what lets a backend update a tensor in place.
    pub fn buffer_mut(&mut self) -> Option<&mut Buf> {
        Arc::get_mut(&mut self.buf)
    }
    /// Dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Element type as stored on the device.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements (the product cannot overflow: [`DeviceTensor::from_parts`] checked it).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The two dimensions of a matrix, or an error naming the tensor.
    pub fn dims2(&self, name: &str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(Error::shape(name, "a matrix [rows, cols]", &self.shape)),
        }
    }
    /// The three dimensions of a stacked tensor, or an error naming the tensor.
    pub fn dims3(&self, name: &str) -> Result<(usize, usize, usize)> {
        match self.shape[..] {
            [a, b, c] => Ok((a, b, c)),
            _ => Err(Error::shape(name, "a stack [groups, rows, cols]", &self.shape)),
        }
    }
    /// Errors unless the tensor holds `dtype`.
    pub fn expect_dtype(&self, name: &str, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::dtype(name, dtype, self.dtype));
        }
        Ok(())
    }
    /// Errors unless the tensor has exactly `shape`.
    pub fn expect_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(Error::shape(name, format!("{shape:?}"), &self.shape));
        }
        Ok(())
    }
}

impl<Buf: DeviceBuffer> std::fmt::Debug for DeviceTensor<Buf> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.dtype)
    }
}
