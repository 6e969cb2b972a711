//! Torch tensors in and out. A CPU float32 tensor's values are read in place through its
//! `data_ptr` (no staging copy in Python; the engine copies them once into its own host
//! tensor), and results are written straight into tensors made by `torch.empty`. Every
//! property that makes the pointer valid is checked here, on the tensor object itself,
//! so no caller can hand the engine a bare address.

use crate::errors::value_error;
use moe_engine::HostTensor;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// The values of torch tensor `t` (float32, on the CPU, contiguous) as a host tensor.
/// `name` is what an error calls it.
pub fn host_from_torch(t: &Bound<'_, PyAny>, name: &str) -> PyResult<HostTensor> {
    let dtype =
        t.getattr("dtype").map_err(|_| value_error(format!("`{name}` is not a torch tensor")))?.str()?.to_string();
    if dtype != "torch.float32" {
        return Err(value_error(format!("`{name}` is {dtype}; the engine takes torch.float32 (call .float())")));
    }
    let device: String = t.getattr("device")?.getattr("type")?.extract()?;
    if device != "cpu" {
        return Err(value_error(format!("`{name}` is on {device}; this call takes CPU tensors")));
    }
    if !t.call_method0("is_contiguous")?.extract::<bool>()? {
        return Err(value_error(format!("`{name}` is not contiguous (call .contiguous())")));
    }
    let shape: Vec<usize> = t.call_method0("size")?.extract()?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| value_error(format!("`{name}`: shape {shape:?} overflows")))?;
    let values = if n == 0 {
        Vec::new()
    } else {
        let ptr: usize = t.call_method0("data_ptr")?.extract()?;
        if ptr == 0 || !ptr.is_multiple_of(std::mem::align_of::<f32>()) {
            return Err(value_error(format!("`{name}`: its data pointer {ptr:#x} is not an f32 array")));
        }
        // SAFETY: `t` is a contiguous float32 CPU tensor of `n` elements (checked above),
        // so `data_ptr()` (which includes its storage offset) addresses `n` initialised
        // f32 values; `t` is borrowed, and the GIL held, for as long as the slice lives.
        unsafe { std::slice::from_raw_parts(ptr as *const f32, n) }.to_vec()
    };
    HostTensor::f32(&shape, values).map_err(crate::errors::to_py)
}

/// A new float32 CPU torch tensor holding `t`'s values (f32; i32 values are converted).
pub fn torch_from_host<'py>(py: Python<'py>, t: &HostTensor) -> PyResult<Bound<'py, PyAny>> {
    let torch = py.import("torch")?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", torch.getattr("float32")?)?;
    let out = torch.call_method("empty", (PyTuple::new(py, t.shape())?,), Some(&kwargs))?;
    let owned;
    let v: &[f32] = match t.as_f32("result") {
        Ok(v) => v,
        Err(_) => {
            owned = t.as_i32("result").map_err(crate::errors::to_py)?.iter().map(|&x| x as f32).collect::<Vec<_>>();
            &owned
        }
    };
    if !v.is_empty() {
        let ptr: usize = out.call_method0("data_ptr")?.extract()?;
        // SAFETY: `out` was just made by torch.empty with t's shape in float32: a
        // contiguous buffer of exactly v.len() f32 values that nothing else references.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), ptr as *mut f32, v.len()) };
    }
    Ok(out)
}

/// A dict of name → torch tensor as host tensors (float32 copies of the values).
pub fn host_map(tensors: &Bound<'_, PyDict>) -> PyResult<std::collections::BTreeMap<String, HostTensor>> {
    let mut out = std::collections::BTreeMap::new();
    for (k, v) in tensors.iter() {
        let name: String = k.extract()?;
        let t = host_from_torch(&v, &name)?;
        out.insert(name, t);
    }
    Ok(out)
}
