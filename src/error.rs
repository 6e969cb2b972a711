//! The one error type of the engine. Library code returns these; it never panics on bad
//! input. Every variant names the field, tensor or token it is about.

use thiserror::Error;

/// Errors from configuration, shapes, checkpoints, routing and backends.
#[derive(Debug, Error)]
pub enum Error {
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
    },
    /// Router logits hold NaN or infinity.
    #[error("router logits are not finite at token {token}, expert {expert} (value {value})")]
    NonFiniteLogits {
        /// Index of the first bad token (flattened over batch and sequence).
        token: usize,
        /// Expert column of the first bad value.
        expert: usize,
        /// The bad value.
        value: f32,
    },
    /// A precondition that the reference asserts (for example S < min_capacity).
    #[error("{0}")]
    Invalid(String),
    /// A backend could not be created or an operation failed on it.
    #[error("rank {rank}: {msg}")]
    /// A collective failed: a peer errored, stopped or did not answer in time.
    Communication {
        /// The rank reporting the failure.
        rank: usize,
        /// What happened, naming the peer where one is known.
        msg: String,
    },

    #[error("backend {backend}: {msg}")]
    Backend {
        /// Backend name.
        backend: String,
        /// What failed.
        msg: String,
    },
    /// An operation is not supported by this backend (dtype, feature).
    #[error("backend {backend} does not support {what}")]
    Unsupported {
        /// Backend name.
        backend: String,
        /// What is unsupported.
        what: String,
    },
    /// I/O on a file the engine was asked to read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for a [`Error::Config`].
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { field: field.into(), msg: msg.into() }
    }
    /// Shorthand for a [`Error::Shape`].
    pub fn shape(tensor: impl Into<String>, expected: impl Into<String>, got: &[usize]) -> Self {
        Error::Shape { tensor: tensor.into(), expected: expected.into(), got: got.to_vec() }
    }
}
