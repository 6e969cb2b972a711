//! Expert parallelism over a torch.distributed process group. The Python side hands the
//! engine a group object (`moe_engine._dist.TorchGroup`) whose methods run the group's
//! collectives; this transport calls them for the engine's two needs: `all_gather` of
//! small host values (the routes per slot) and one variable all-to-all of row bytes per
//! exchange ([`exchange_via_host`]). gloo carries them between CPU processes and nodes,
//! in the expert-parallel groups DeepSpeed created.

use moe_engine::parallel::{exchange_via_host, Communicator, ExchangeOp, Transport};
use moe_engine::{Backend, Error, Result, Tensor};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

/// A torch.distributed group as the engine's communicator and transport.
pub struct TorchTransport {
    group: Py<PyAny>,
    rank: usize,
    size: usize,
}

impl TorchTransport {
    /// Wraps `group` (a `TorchGroup`: `rank`, `size`, `all_gather(bytes)`,
    /// `all_to_all(list[bytes], list[int])`).
    pub fn new(group: &Bound<'_, PyAny>) -> PyResult<Self> {
        let rank: usize = group.getattr("rank")?.extract()?;
        let size: usize = group.getattr("size")?.extract()?;
        if size == 0 || rank >= size {
            return Err(crate::errors::value_error(format!("process group rank {rank} of {size}")));
        }
        Ok(TorchTransport { group: group.clone().unbind(), rank, size })
    }

    fn fail(&self, what: &str, e: PyErr) -> Error {
        Error::Communication { rank: self.rank, msg: format!("torch.distributed {what}: {e}") }
    }

    /// Calls `group.<method>(args)` and reads back a list of `size` byte strings.
    fn call_bytes(&self, method: &str, build: impl FnOnce(Python<'_>) -> PyResult<Py<PyAny>>) -> Result<Vec<Vec<u8>>> {
        Python::attach(|py| -> PyResult<Vec<Vec<u8>>> {
            let args = build(py)?;
            let got = self.group.bind(py).call_method1(method, (args,))?;
            let list = got.cast::<PyList>()?;
            list.iter().map(|b| Ok(b.cast::<PyBytes>()?.as_bytes().to_vec())).collect()
        })
        .map_err(|e| self.fail(method, e))
        .and_then(|v| {
            if v.len() == self.size {
                Ok(v)
            } else {
                Err(Error::Communication {
                    rank: self.rank,
                    msg: format!("{method}: {} parts from a group of {}", v.len(), self.size),
                })
            }
        })
    }
}

impl Communicator for TorchTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, data: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.call_bytes("all_gather", |py| Ok(PyBytes::new(py, &data).into_any().unbind()))
    }

    fn split(&self, _color: usize, _key: usize) -> Result<Self> {
        Err(Error::unsupported(
            "torch.distributed groups",
            "splitting inside the engine: DeepSpeed's groups (deepspeed.utils.groups) are made in Python",
        ))
    }
}

impl<B: Backend> Transport<B> for TorchTransport {
    fn run_exchange(&self, b: &B, op: &ExchangeOp<'_, B>) -> Result<Tensor<B>> {
        exchange_via_host(b, op, self.rank, self.size, |msgs, expected| {
            // The receive sizes go too: gloo's all_to_all takes both split lists.
            let out = Python::attach(|py| -> PyResult<Vec<Vec<u8>>> {
                let parts = PyList::new(py, msgs.iter().map(|m| PyBytes::new(py, m)))?;
                let got = self.group.bind(py).call_method1("all_to_all", (parts, expected))?;
                let list = got.cast::<PyList>()?;
                list.iter().map(|b| Ok(b.cast::<PyBytes>()?.as_bytes().to_vec())).collect()
            })
            .map_err(|e| self.fail("all_to_all", e))?;
            Ok(out)
        })
    }
}
