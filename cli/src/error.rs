//! The CLI's errors: the engine's (with their whole source chain), one naming the part
//! of a model it came from, a flag the user typed that is refused, or stdout closing under us.

use std::fmt::Write as _;

/// What can stop a command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An error from the engine or a backend.
    #[error(transparent)]
    Engine(#[from] moe_engine::Error),
    /// A flag value the command refuses, named as the user typed it.
    #[error("{flag}: {msg}")]
    Flag {
        /// The flag (`--top-k`).
        flag: &'static str,
        /// What is wrong with its value.
        msg: String,
    },
    /// A part of a model that could not be read, loaded or run (an op or dtype the engine
    /// does not have yet, a tensor missing from the checkpoint), named.
    #[error("{what}: {source}")]
    Model {
        /// What failed: `layer 3 of DIR`, `the MoE block of DIR`.
        what: String,
        /// Why.
        source: moe_engine::Error,
    },
    /// Writing the output failed (a closed pipe, a full disk).
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Result of a command.
pub type CliResult<T> = Result<T, CliError>;

impl CliError {
    /// An engine error about `what` part of a model.
    pub fn model(what: impl Into<String>, source: moe_engine::Error) -> Self {
        CliError::Model { what: what.into(), source }
    }

    /// A refused flag value.
    pub fn flag(flag: &'static str, msg: impl Into<String>) -> Self {
        CliError::Flag { flag, msg: msg.into() }
    }

    /// Whether this is stdout closing early (`moe check ... | head`): not a failure.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// The message with its kind and every cause, one per line.
    pub fn report(&self) -> String {
        let mut s = match self {
            CliError::Engine(e) => format!("error ({}): {e}", e.kind()),
            CliError::Flag { .. } => format!("error (bad flag): {self}"),
            CliError::Model { source, .. } => format!("error ({}): {self}", source.kind()),
            CliError::Output(_) => format!("error: {self}"),
        };
        let mut source = std::error::Error::source(self);
        // An engine error is shown through itself; its causes follow.
        if let CliError::Engine(e) | CliError::Model { source: e, .. } = self {
            source = std::error::Error::source(e);
        }
        while let Some(e) = source {
            let _ = write!(s, "\n  caused by: {e}");
            source = e.source();
        }
        s
    }
}
