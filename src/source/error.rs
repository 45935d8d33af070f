//! What can go wrong in the source, one variant per step of getting a link up (TCP,
//! TLS, AMQP open, session, CBS, attach) and the loss of a live connection.

/// A failure of the source. Only [`SourceError::Tls`] (no usable roots) ends
/// [`run`](crate::source::run); every other variant is logged and retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("AMQP open with {addr} failed: {reason}")]
    Open { addr: String, reason: String },
    #[error("AMQP session failed: {0}")]
    Session(String),
    #[error("CBS token for {audience} rejected: {reason}")]
    TokenRejected { audience: String, reason: String },
    #[error("CBS: {0}")]
    Cbs(String),
    #[error("cannot attach a receiver to {address}: {reason}")]
    Attach { address: String, reason: String },
    #[error("connection lost: {0}")]
    ConnectionLost(String),
}

impl SourceError {
    /// A coarse kind, to log a failure once rather than on every retry.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            SourceError::Tls(_) => "tls",
            SourceError::Connect { .. } => "connect",
            SourceError::Open { .. } => "open",
            SourceError::Session(_) => "session",
            SourceError::TokenRejected { .. } => "token",
            SourceError::Cbs(_) => "cbs",
            SourceError::Attach { .. } => "attach",
            SourceError::ConnectionLost(_) => "lost",
        }
    }
}
