//! The crate's error type: one variant per failure a caller can act on, each
//! with the process exit code `main` uses for it.

use std::io;

use crate::config::ConfigError;
use crate::persist::BackendError;

/// Exit code for an invalid configuration (sysexits' `EX_CONFIG`).
pub const EXIT_CONFIG: u8 = 78;
/// Exit code for a database that cannot be used at start (`EX_UNAVAILABLE`).
pub const EXIT_DATABASE: u8 = 69;
/// Exit code for a socket that cannot be bound (`EX_OSERR`).
pub const EXIT_BIND: u8 = 71;
/// Exit code when the final flush could not save every count (`EX_TEMPFAIL`).
pub const EXIT_COUNTS_LOST: u8 = 75;

/// What can stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; fix it and start again.
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigError),
    /// The database cannot be used.
    #[error("{0}")]
    Database(#[from] BackendError),
    /// A listening socket cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// What was to be bound.
        addr: String,
        /// Why not.
        source: io::Error,
    },
    /// Any other I/O failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: io::Error,
    },
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => EXIT_CONFIG,
            Error::Database(_) => EXIT_DATABASE,
            Error::Bind { .. } => EXIT_BIND,
            Error::Io { .. } => 1,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
