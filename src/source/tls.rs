//! AMQPS: TLS from the first byte (no AMQP TLS protocol header), rustls with the `ring`
//! provider and the system's root certificates.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, pki_types::ServerName};

use super::SourceError;

/// A client config with the system roots (`rustls-native-certs`) and the `ring` provider.
pub fn client_config() -> Result<Arc<ClientConfig>, SourceError> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        return Err(SourceError::Tls(format!(
            "no usable root certificates found on this system ({} errors loading them)",
            loaded.errors.len()
        )));
    }
    config_with_roots(roots)
}

/// A client config trusting exactly `roots`.
pub fn config_with_roots(roots: RootCertStore) -> Result<Arc<ClientConfig>, SourceError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SourceError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Wrap a connected TCP stream in TLS for `host` (SNI and certificate name).
pub async fn connect(
    config: Arc<ClientConfig>,
    host: &str,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, SourceError> {
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
