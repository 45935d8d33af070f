//! The panel listener's TLS (server side): a rustls server configuration whose
//! certificate can be replaced (SIGHUP) without touching the connections already made.
//!
//! Protocols: TLS 1.2 and 1.3 only (rustls has no older ones, nor NULL, RC4 or 3DES
//! suites), `ring` provider, ALPN `http/1.1`. The files are read and checked by
//! [`super::certs`].

use std::sync::Arc;
use std::time::SystemTime;

use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring::default_provider;

use super::certs::{CertError, CertFiles, LoadedCert, ReloadableCert, load};

/// The server configuration: TLS 1.2/1.3, `ring`, ALPN `http/1.1`, the certificate
/// from `cert`, no client authentication.
pub fn server_config(cert: Arc<ReloadableCert>) -> Result<Arc<ServerConfig>, super::TlsError> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| super::TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The panel port's TLS as the server runs it: the files, the certificate in use (which
/// [`ServerTls::reload`] replaces) and the rustls configuration built once around it.
#[derive(Debug)]
pub struct ServerTls {
    pub files: CertFiles,
    cert: Arc<ReloadableCert>,
    config: Arc<ServerConfig>,
    /// notAfter of the certificate in use, seconds since the Unix epoch.
    not_after: std::sync::atomic::AtomicU64,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ServerTls {
    /// Load and check the files ([`load`]) and build the server configuration.
    pub fn load(files: CertFiles) -> Result<Arc<ServerTls>, CertError> {
        let loaded = load(&files)?;
        let cert = ReloadableCert::new(&loaded);
        let config = server_config(cert.clone()).map_err(|e| CertError::BadKey {
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
        Ok(Arc::new(ServerTls {
            files,
            cert,
            config,
            not_after: unix_secs(loaded.not_after).into(),
        }))
    }

    /// Read the files again; on success new connections get the new certificate (the
    /// ones already made keep theirs). On error the certificate in use stays.
    pub fn reload(&self) -> Result<LoadedCert, CertError> {
        let loaded = load(&self.files)?;
        self.cert.set(&loaded);
        self.not_after.store(
            unix_secs(loaded.not_after),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(loaded)
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// notAfter of the certificate in use.
    pub fn not_after(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(
                self.not_after.load(std::sync::atomic::Ordering::Relaxed),
            )
    }
}
