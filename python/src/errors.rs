//! The engine's errors as Python exceptions: bad input and misuse (a bad config, shape,
//! dtype, tensor or value) raise `ValueError`; a backend, device, peer or engine failure
//! raises `RuntimeError`. The message is the engine's, with its cause chain.

use moe_engine::{Error, ErrorKind};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::PyErr;

/// The Python exception for an engine error.
pub fn to_py(e: Error) -> PyErr {
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    match e.kind() {
        ErrorKind::BadInput | ErrorKind::Misuse => PyValueError::new_err(msg),
        ErrorKind::Environment | ErrorKind::Internal => PyRuntimeError::new_err(msg),
    }
}

/// `ValueError(msg)`.
pub fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// Engine results as Python results.
pub trait OrPy<T> {
    /// Maps the error with [`to_py`].
    fn py(self) -> pyo3::PyResult<T>;
}

impl<T> OrPy<T> for moe_engine::Result<T> {
    fn py(self) -> pyo3::PyResult<T> {
        self.map_err(to_py)
    }
}
