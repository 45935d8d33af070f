//! What can go wrong in the source, one variant per step of getting a link up (TCP,
//! TLS, AMQP open, session, CBS, attach) and the loss of a live connection.

/// A failure of the source. Only [`SourceError::Tls`] (no usable roots) ends
/// [`run`](crate::source::run); every other variant is logged and retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// No usable TLS root, an invalid server name, or a failed handshake. The missing
    /// roots (at start) end the task; a failed handshake is retried.
    #[error("TLS: {0}")]
    Tls(String),
    /// TCP connect to `host:port` failed or timed out.
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The HTTP proxy could not be reached or refused the tunnel (407, 403, …); names
    /// the proxy, never its credentials.
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    /// No Entra ID token: the token endpoint is unreachable or refused the credential.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// The WebSocket upgrade to `url` (AMQP over WebSockets) was refused or failed.
    #[error("AMQP over WebSockets with {url} failed: {reason}")]
    WebSocket { url: String, reason: String },
    /// The AMQP open (AMQP 1.0 §2.4.1) or SASL exchange (§5.3) failed or timed out.
    #[error("AMQP open with {addr} failed: {reason}")]
    Open { addr: String, reason: String },
    /// The session could not begin (§2.5.1).
    #[error("AMQP session failed: {0}")]
    Session(String),
    /// ASB answered put-token with a failure status (e.g. 401): `reason` holds the
    /// status and its description, never the token.
    #[error("CBS token for {audience} rejected: {reason}")]
    TokenRejected { audience: String, reason: String },
    /// The `$cbs` node could not be reached or answered nonsense.
    #[error("CBS: {0}")]
    Cbs(String),
    /// The broker refused or did not answer the attach (§2.6.3) of a subscription's link;
    /// `reason` is the AMQP error condition and description (`not-found`, …).
    #[error("cannot attach a receiver to {address}: {reason}")]
    Attach { address: String, reason: String },
    /// A live connection or its session ended.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
}

impl SourceError {
    /// A coarse kind, to log a failure once rather than on every retry.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            SourceError::Tls(_) => "tls",
            SourceError::Connect { .. } => "connect",
            SourceError::Proxy(_) => "proxy",
            SourceError::Identity(_) => "identity",
            SourceError::WebSocket { .. } => "websocket",
            SourceError::Open { .. } => "open",
            SourceError::Session(_) => "session",
            SourceError::TokenRejected { .. } => "token",
            SourceError::Cbs(_) => "cbs",
            SourceError::Attach { .. } => "attach",
            SourceError::ConnectionLost(_) => "lost",
        }
    }
}
