//! Why an agent could not start.

use std::path::PathBuf;

use crate::store::StoreError;
use crate::transport::TransportError;
use crate::transport::tls::TlsError;

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("content store: {0}")]
    Store(#[from] StoreError),
    #[error("QUIC endpoint: {0}")]
    Transport(#[from] TransportError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("joining the coordinator at {coordinator}: {message}")]
    Join {
        coordinator: String,
        message: String,
    },
    #[error("local API socket {}: {source}", path.display())]
    LocalApi {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("start interrupted by shutdown")]
    Interrupted,
}
