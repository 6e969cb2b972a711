//! The one error type of the engine. Library code returns these; it never panics on bad
//! input. Every variant names the field, tensor, token, flag or file it is about, and
//! says which of four things went wrong ([`ErrorKind`]): the input was bad, the API was
//! misused, the environment (a backend, a device, a peer) failed, or the engine itself
//! has a bug. Errors that wrap another keep it as their `source`, so a caller can print
//! the whole chain.

use thiserror::Error;

/// A boxed error kept as the `source` of another.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, in the four broad classes a caller acts on differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A configuration, file, tensor or value handed to the engine is invalid: fix the
    /// input.
    BadInput,
    /// The API was called in a way it does not support (an expert-parallel layer run
    /// without its communicator, say): fix the calling code.
    Misuse,
    /// A backend, device, driver, library or peer failed or lacks a capability.
    Environment,
    /// An invariant of the engine itself broke: a bug to report.
    Internal,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorKind::BadInput => "bad input",
            ErrorKind::Misuse => "misuse",
            ErrorKind::Environment => "environment",
            ErrorKind::Internal => "internal error",
        })
    }
}

/// Errors from configuration, shapes, checkpoints, routing, backends and peers.
#[derive(Debug, Error)]
pub enum Error {
    // ------------------------------------------------------------------ bad input
    /// A configuration field is missing, has the wrong type, or an invalid value.
    #[error("config field `{field}`: {msg}")]
    Config {
        /// Dotted path of the field (`gate.k`, `num_local_experts`, ...).
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A tensor does not have the shape an operation needs.
    #[error("tensor `{tensor}`: expected shape {expected}, got {got:?}")]
    Shape {
        /// Name of the tensor (an op argument or a checkpoint key).
        tensor: String,
        /// The expected shape, in words (`[tokens, 16]`).
        expected: String,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// A tensor has the wrong element type.
    #[error("tensor `{tensor}`: expected dtype {expected}, got {got}")]
    DType {
        /// Name of the tensor.
        tensor: String,
        /// The dtype needed.
        expected: String,
        /// The dtype given.
        got: String,
    },
    /// A tensor that must hold finite numbers holds NaN or infinity.
    #[error("tensor `{tensor}` is not finite at index {index:?} (value {value})")]
    NonFinite {
        /// Name of the tensor.
        tensor: String,
        /// Multi-dimensional index of the first bad element.
        index: Vec<usize>,
        /// The bad value.
        value: f32,
    },
    /// Router logits hold NaN or infinity (found on the device, at the next download).
    #[error("router logits are not finite at token {token}, expert {expert} (value {value})")]
    NonFiniteLogits {
        /// Index of the first bad token (flattened over batch and sequence).
        token: usize,
        /// Expert column of the first bad value.
        expert: usize,
        /// The bad value.
        value: f32,
    },
    /// An index tensor names an element outside its range (an expert id past E, say).
    #[error("tensor `{tensor}`: value {value} at index {index} is outside {range}")]
    OutOfRange {
        /// Name of the tensor.
        tensor: String,
        /// Flat index of the first bad element.
        index: usize,
        /// The bad value.
        value: i64,
        /// The allowed range, in words (`0..8`).
        range: String,
    },
    /// A size does not fit: a shape product overflows, a count exceeds what the kernels
    /// represent, or the memory needed exceeds what is there.
    #[error("{what} needs {needed}, more than {limit}")]
    TooLarge {
        /// What was being sized (`tensor \`y\``, `the layer's weights`, `capacity`).
        what: String,
        /// What it needs, with unit (`45.1 GiB`, `2^40 elements`).
        needed: String,
        /// The limit and where it comes from (`21.3 GiB available on the host`).
        limit: String,
    },
    /// A checkpoint lacks a tensor the layer needs.
    #[error("checkpoint is missing tensor `{0}`")]
    MissingTensor(String),
    /// A checkpoint holds tensors that no part of the layer uses.
    #[error("checkpoint has unexpected tensor(s): {}", .0.join(", "))]
    UnexpectedTensors(Vec<String>),
    /// A checkpoint file could not be parsed (truncated, corrupt, wrong format).
    #[error("checkpoint `{path}`: {msg}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What went wrong.
        msg: String,
        /// The parser's own error, where there is one.
        #[source]
        source: Option<Source>,
    },
    /// A golden case folder is malformed (its `case.json`, its tensors, or what they name).
    #[error("case `{case}`: {msg}")]
    Case {
        /// The case folder or name.
        case: String,
        /// What is wrong with it.
        msg: String,
        /// The parser's own error, where there is one.
        #[source]
        source: Option<Source>,
    },
    /// A precondition of the reference semantics does not hold for this input (DeepSpeed
    /// asserts tokens ≥ min_capacity in top-1 gating, say).
    #[error("{0}")]
    Precondition(String),
    /// I/O on a file the engine was asked to read or write.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    // ------------------------------------------------------------------ misuse
    /// The API was used in a way it does not support.
    #[error("misuse: {0}")]
    Misuse(String),

    // ------------------------------------------------------------------ environment
    /// An operation is not supported by this backend or device (dtype, size, feature).
    #[error("backend {backend} does not support {what}")]
    Unsupported {
        /// Backend name.
        backend: String,
        /// What is unsupported.
        what: String,
    },
    /// A backend could not be created or an operation failed on it.
    #[error("backend {backend}: {msg}")]
    Backend {
        /// Backend name.
        backend: String,
        /// What failed.
        msg: String,
        /// The driver's or library's own error, where there is one.
        #[source]
        source: Option<Source>,
    },
    /// A collective failed: a peer errored, stopped or did not answer in time.
    #[error("rank {rank}: {msg}")]
    Communication {
        /// The rank reporting the failure.
        rank: usize,
        /// What happened, naming the peer where one is known.
        msg: String,
    },

    // ------------------------------------------------------------------ internal
    /// An invariant of the engine broke (a backend returned a tensor of the wrong shape,
    /// say): a bug, not something the caller did.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Which broad class of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config { .. }
            | Error::Shape { .. }
            | Error::DType { .. }
            | Error::NonFinite { .. }
            | Error::NonFiniteLogits { .. }
            | Error::OutOfRange { .. }
            | Error::TooLarge { .. }
            | Error::MissingTensor(_)
            | Error::UnexpectedTensors(_)
            | Error::Checkpoint { .. }
            | Error::Case { .. }
            | Error::Precondition(_)
            | Error::Io { .. } => ErrorKind::BadInput,
            Error::Misuse(_) => ErrorKind::Misuse,
            Error::Unsupported { .. } | Error::Backend { .. } | Error::Communication { .. } => ErrorKind::Environment,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// Shorthand for a [`Error::Config`].
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { field: field.into(), msg: msg.into() }
    }

    /// Shorthand for a [`Error::Shape`].
    pub fn shape(tensor: impl Into<String>, expected: impl Into<String>, got: &[usize]) -> Self {
        Error::Shape { tensor: tensor.into(), expected: expected.into(), got: got.to_vec() }
    }

    /// Shorthand for a [`Error::DType`].
    pub fn dtype(tensor: impl Into<String>, expected: impl std::fmt::Display, got: impl std::fmt::Display) -> Self {
        Error::DType { tensor: tensor.into(), expected: expected.to_string(), got: got.to_string() }
    }

    /// Shorthand for a [`Error::Case`] without a source.
    pub fn case(case: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Case { case: case.into(), msg: msg.into(), source: None }
    }

    /// Shorthand for a [`Error::Backend`] without a source.
    pub fn backend(backend: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Backend { backend: backend.into(), msg: msg.into(), source: None }
    }

    /// Shorthand for a [`Error::Unsupported`].
    pub fn unsupported(backend: impl Into<String>, what: impl Into<String>) -> Self {
        Error::Unsupported { backend: backend.into(), what: what.into() }
    }

    /// Shorthand for a [`Error::TooLarge`].
    pub fn too_large(what: impl Into<String>, needed: impl Into<String>, limit: impl Into<String>) -> Self {
        Error::TooLarge { what: what.into(), needed: needed.into(), limit: limit.into() }
    }
}

/// Bytes in the largest binary unit that keeps the number at least 1, one decimal
/// (`45.1 GiB`), for messages about sizes.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(12), "12 bytes");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(45 * (1 << 30) + (1 << 27)), "45.1 GiB");
    }

    #[test]
    fn every_variant_has_a_kind() {
        assert_eq!(Error::config("k", "bad").kind(), ErrorKind::BadInput);
        assert_eq!(Error::Misuse("x".into()).kind(), ErrorKind::Misuse);
        assert_eq!(Error::backend("cuda", "x").kind(), ErrorKind::Environment);
        assert_eq!(Error::Internal("x".into()).kind(), ErrorKind::Internal);
    }
}
