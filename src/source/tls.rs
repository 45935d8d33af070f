//! AMQPS (AMQP 1.0 part 5 §5.2.1: TLS from the first byte, port 5671, no AMQP TLS protocol
//! header): the handshake of the source's connection. The rustls client config (`ring`
//! provider, the system's root certificates, no ALPN) comes from [`crate::tls`].

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, pki_types::ServerName};

use super::error::SourceError;

/// The AMQPS client config: the platform's roots, plus the CAs of `ca_file` (a plant
/// CA), and the `ring` provider, no ALPN (built by [`crate::tls`], shared with the MQTT
/// mirror).
///
/// Errors: [`SourceError::Tls`] when the system has no usable root certificate and no
/// `ca_file`, or `ca_file` cannot be read or holds no certificate.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, SourceError> {
    let Some(ca) = ca_file else {
        return crate::tls::native_client_config().map_err(|e| SourceError::Tls(e.to_string()));
    };
    // The plant CA alone is enough when the system has no roots.
    let mut roots = crate::tls::native_roots().unwrap_or_else(|_| RootCertStore::empty());
    crate::tls::certs::add_ca_bundle(&mut roots, ca)
        .map_err(|e| SourceError::Tls(format!("source.ca_file {e}")))?;
    config_with_roots(roots)
}

/// A client config trusting exactly `roots`.
pub fn config_with_roots(roots: RootCertStore) -> Result<Arc<ClientConfig>, SourceError> {
    crate::tls::client_config(roots).map_err(|e| SourceError::Tls(e.to_string()))
}

/// Wrap a connected stream (TCP, or a proxy's tunnel) in TLS for `host` (SNI and
/// certificate name).
///
/// Errors: [`SourceError::Tls`] when `host` is not a valid server name or the handshake
/// fails (the certificate is not trusted, the peer does not speak TLS, …), naming the
/// host and rustls' reason.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ClientConfig>,
    host: &str,
    tcp: S,
) -> Result<TlsStream<S>, SourceError> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| SourceError::Tls(format!("{host:?} is not a valid TLS server name")))?;
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| SourceError::Tls(format!("TLS handshake with {host} failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_config_builds() {
        let c = config_with_roots(RootCertStore::empty()).unwrap();
        assert!(c.alpn_protocols.is_empty());
    }

    #[tokio::test]
    async fn handshake_failure_is_a_clear_error() {
        use tokio::net::TcpStream;
        // A plain TCP peer that closes at once: the handshake must fail, not hang.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            drop(s);
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let cfg = config_with_roots(RootCertStore::empty()).unwrap();
        let e = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            connect(cfg, "localhost", tcp),
        )
        .await
        .unwrap()
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("TLS handshake with localhost failed"),
            "{e}"
        );
    }
}
