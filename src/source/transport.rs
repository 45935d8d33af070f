//! The byte stream AMQP runs on, built in layers (DESIGN §5 and the Azure SDKs'
//! transports): TCP to the namespace — or to an HTTP proxy and through its `CONNECT`
//! tunnel ([`crate::proxy`]) — then TLS (AMQPS, or the `wss://` of AMQP over
//! WebSockets) unless the emulator's plain transport, then for AMQP over WebSockets the
//! WebSocket handshake on `/$servicebus/websocket` ([`crate::amqp_ws`]). Each step is
//! bounded by `step`; CBS, credit, settlement and reconnects above it do not change.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::rustls::ClientConfig;

use super::error::SourceError;
use super::tls;
use crate::config::ConnectionString;
use crate::proxy::Proxy;

/// What fe2o3-amqp's connection needs of its stream.
pub(super) trait Io: AsyncRead + AsyncWrite + Debug + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Debug + Unpin + Send + 'static> Io for T {}

/// One of TCP, a tunnel, TLS over either, or a WebSocket over any of them.
pub(super) type Stream = Box<dyn Io>;

/// How the source reaches the namespace, for the log: `host:port`, then ` over
/// WebSockets`, ` via proxy http://p:3128` as they apply (never a credential).
pub(super) fn describe(cs: &ConnectionString, proxy: Option<&Proxy>) -> String {
    let mut s = format!("{}:{}", cs.host, cs.port);
    if cs.websockets {
        s.push_str(" over WebSockets");
    }
    if let Some(p) = proxy {
        s.push_str(" via proxy ");
        s.push_str(&p.display());
    }
    s
}

/// Open the stream to `cs`'s namespace: through `proxy` when given, in TLS with `tls`
/// when given, as a WebSocket when `cs.websockets`.
///
/// Errors: [`SourceError::Connect`] (TCP), [`SourceError::Proxy`] (the proxy refused or
/// is unreachable), [`SourceError::Tls`] (handshake, certificate), [`SourceError::WebSocket`]
/// (the upgrade was refused).
pub(super) async fn open(
    cs: &ConnectionString,
    proxy: Option<&Proxy>,
    tls_config: Option<&Arc<ClientConfig>>,
    step: Duration,
) -> Result<Stream, SourceError> {
    let addr = format!("{}:{}", cs.host, cs.port);
    let tcp = match proxy {
        Some(p) => p.connect(&cs.host, cs.port, step).await?,
        None => {
            let connect_err = |reason: String| SourceError::Connect {
                addr: addr.clone(),
                reason,
            };
            timeout(step, TcpStream::connect((cs.host.as_str(), cs.port)))
                .await
                .map_err(|_| connect_err("timed out".into()))?
                .map_err(|e| connect_err(e.to_string()))?
        }
    };
    let _ = tcp.set_nodelay(true);
    let stream: Stream = match tls_config {
        Some(cfg) => Box::new(
            timeout(step, tls::connect(cfg.clone(), &cs.host, tcp))
                .await
                .map_err(|_| SourceError::Tls(format!("TLS handshake with {addr} timed out")))??,
        ),
        None => Box::new(tcp),
    };
    if !cs.websockets {
        return Ok(stream);
    }
    let url = cs.websocket_url();
    let ws_err = |reason: String| SourceError::WebSocket {
        url: url.clone(),
        reason,
    };
    let ws = timeout(step, crate::amqp_ws::client(&url, stream))
        .await
        .map_err(|_| ws_err("the upgrade timed out".into()))?
        .map_err(|e| ws_err(e.to_string()))?;
    Ok(Box::new(ws))
}
