//! TLS for every part, one place: the rustls client configuration of the gateway's TLS
//! clients — the source's AMQPS connection (`source::tls`) and the MQTT mirror's
//! `mqtts://` connection — and, in [`server`], the panel port's server side.
//!
//! Both trust the platform's root certificates (`rustls-native-certs`, which honours
//! `SSL_CERT_FILE` and `SSL_CERT_DIR`), optionally with a plant CA added or instead, use
//! the `ring` crypto provider with rustls' safe default protocol versions (TLS 1.2 and
//! 1.3) and offer no ALPN protocol; the mirror may present a client certificate. PEM
//! files are read and checked by [`certs`]. This module is a leaf: it knows neither the
//! source, the mirror nor the panels, and each of them words its own errors.

pub mod certs;
pub mod server;

pub use certs::{CertError, CertFiles, EXPIRY_WARNING, LoadedCert, ReloadableCert};

use std::sync::Arc;

use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// Why no client configuration could be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// Not one usable root certificate was found on this system. `errors` are the
    /// texts of the errors met while loading them (possibly none: an empty store).
    #[error("no usable root certificates found on this system ({} errors loading them)", errors.len())]
    NoRoots { errors: Vec<String> },
    /// rustls refused the provider's protocol versions (cannot happen with `ring`).
    #[error("{0}")]
    Config(String),
}

/// The platform's root certificates (`rustls-native-certs`; `SSL_CERT_FILE` and
/// `SSL_CERT_DIR` are honoured). Certificates that do not parse are skipped.
///
/// Errors: [`TlsError::NoRoots`] when no certificate could be added.
pub fn native_roots() -> Result<RootCertStore, TlsError> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        return Err(TlsError::NoRoots {
            errors: loaded.errors.iter().map(|e| e.to_string()).collect(),
        });
    }
    Ok(roots)
}

/// A client config trusting exactly `roots`: `ring` provider, safe default protocol
/// versions, no ALPN, no client authentication.
pub fn client_config(roots: RootCertStore) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with(roots, None)
}

/// [`client_config`] presenting `client_cert` when the server asks for one (mutual TLS);
/// the certificate can be replaced while it runs ([`ReloadableCert::set`]) and is used
/// from the next connection on.
pub fn client_config_with(
    roots: RootCertStore,
    client_cert: Option<Arc<ReloadableCert>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client_cert {
        Some(cert) => builder.with_client_cert_resolver(cert),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// [`client_config`] with the platform's roots ([`native_roots`]).
pub fn native_client_config() -> Result<Arc<ClientConfig>, TlsError> {
    client_config(native_roots()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_config_without_alpn() {
        let c = client_config(RootCertStore::empty()).unwrap();
        assert!(c.alpn_protocols.is_empty());
        assert!(!c.crypto_provider().cipher_suites.is_empty());
    }

    #[test]
    fn no_roots_counts_the_load_errors() {
        let e = TlsError::NoRoots {
            errors: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            e.to_string(),
            "no usable root certificates found on this system (2 errors loading them)"
        );
    }

    #[test]
    fn native_config_builds_or_names_the_missing_roots() {
        // A minimal container may have no roots; either outcome is clean.
        match native_client_config() {
            Ok(c) => assert!(c.alpn_protocols.is_empty()),
            Err(e) => assert!(matches!(e, TlsError::NoRoots { .. }), "{e}"),
        }
    }
}
