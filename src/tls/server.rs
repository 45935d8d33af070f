//! The panel listener's TLS (server side): a certificate chain and its private key from
//! PEM files, checked when the config is read, and a rustls server configuration whose
//! certificate can be replaced (SIGHUP) without touching the connections already made.
//!
//! - Protocols: TLS 1.2 and 1.3 only (rustls has no older ones, nor NULL, RC4 or 3DES
//!   suites), `ring` provider, ALPN `http/1.1`.
//! - Files: PEM. The first `CERTIFICATE` block is the server's certificate, any further
//!   ones its chain; the key is the first PKCS#8, PKCS#1 (RSA) or SEC1 (EC) key block.
//!   Encrypted keys are refused (the daemon has no one to ask for a passphrase).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

/// A certificate expiring within this is warned about (at start and at each reload).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Where the certificate chain and its key are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a certificate and key could not be used. Each names the file and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("{path}: cannot read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: no PEM CERTIFICATE block")]
    NoCertificate { path: PathBuf },
    #[error(
        "{path}: the private key is encrypted; give an unencrypted PEM key (e.g. `openssl pkey -in KEY -out PLAIN`)"
    )]
    EncryptedKey { path: PathBuf },
    #[error("{path}: no PEM private key (PKCS#8, RSA or EC)")]
    NoKey { path: PathBuf },
    #[error("{path}: the key cannot be used: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{key}: the key does not belong to the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: the certificate cannot be parsed: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: the certificate expired on {at}")]
    Expired { path: PathBuf, at: String },
}

/// A checked certificate and key, ready for the server.
#[derive(Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// The certificate's notAfter.
    pub not_after: SystemTime,
}

impl LoadedCert {
    /// Time left before the certificate expires (zero once expired).
    pub fn remaining(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    /// A warning when the certificate expires within [`EXPIRY_WARNING`].
    pub fn expiry_warning(&self, files: &CertFiles) -> Option<String> {
        let left = self.remaining();
        (left < EXPIRY_WARNING).then(|| {
            format!(
                "{}: the certificate expires in {} days ({})",
                files.cert.display(),
                left.as_secs() / 86_400,
                humantime::format_rfc3339_seconds(self.not_after)
            )
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|e| CertError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Read and check the files: a certificate, an unencrypted key that matches it, and a
/// certificate that has not expired.
pub fn load(files: &CertFiles) -> Result<LoadedCert, CertError> {
    let cert_pem = read(&files.cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: files.cert.clone(),
        });
    };
    let not_after = not_after(leaf).map_err(|reason| CertError::BadCertificate {
        path: files.cert.clone(),
        reason: reason.into(),
    })?;
    if not_after <= SystemTime::now() {
        return Err(CertError::Expired {
            path: files.cert.clone(),
            at: humantime::format_rfc3339_seconds(not_after).to_string(),
        });
    }
    let key_pem = read(&files.key)?;
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(_) if contains(&key_pem, b"ENCRYPTED") => {
            return Err(CertError::EncryptedKey {
                path: files.key.clone(),
            });
        }
        Err(_) => {
            return Err(CertError::NoKey {
                path: files.key.clone(),
            });
        }
    };
    let provider = default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => CertError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        },
        e => CertError::BadKey {
            path: files.key.clone(),
            reason: e.to_string(),
        },
    })?;
    Ok(LoadedCert {
        key: Arc::new(key),
        not_after,
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The certificate the server presents, replaceable while it runs: connections made
/// before a [`ReloadableCert::set`] keep the certificate they were made with.
#[derive(Debug)]
pub struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    pub fn new(cert: &LoadedCert) -> Arc<Self> {
        Arc::new(ReloadableCert {
            current: RwLock::new(cert.key.clone()),
        })
    }

    /// Present `cert` to every connection from now on.
    pub fn set(&self, cert: &LoadedCert) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = cert.key.clone();
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

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

    /// Seconds until the certificate in use expires (0 once expired).
    pub fn expires_in_secs(&self) -> u64 {
        self.not_after
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(unix_secs(SystemTime::now()))
    }
}

// ------------------------------------------------------------ notAfter (RFC 5280 §4.1)

/// One DER TLV: (tag, contents, rest).
fn tlv(b: &[u8]) -> Result<(u8, &[u8], &[u8]), &'static str> {
    let (&tag, b) = b.split_first().ok_or("truncated")?;
    let (&first, mut b) = b.split_first().ok_or("truncated")?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return Err("bad length");
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
        b = &b[n..];
        len
    };
    if b.len() < len {
        return Err("truncated");
    }
    Ok((tag, &b[..len], &b[len..]))
}

/// The notAfter of an X.509 certificate: Certificate → tbsCertificate → (version?,
/// serialNumber, signature, issuer, validity → (notBefore, notAfter)).
fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, &'static str> {
    let (_, certificate, _) = tlv(cert.as_ref())?;
    let (_, tbs, _) = tlv(certificate)?;
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xA0 {
        rest = r; // [0] EXPLICIT version
    }
    for _ in 0..3 {
        rest = tlv(rest)?.2; // serialNumber, signature, issuer
    }
    let (tag, validity, _) = tlv(rest)?;
    if tag != 0x30 {
        return Err("no validity");
    }
    let (_, _, after) = tlv(validity)?;
    let (tag, time, _) = tlv(after)?;
    let text = std::str::from_utf8(time).map_err(|_| "bad time")?;
    let full = match tag {
        // UTCTime YYMMDDHHMMSSZ: years 50..99 are 19YY (RFC 5280 §4.1.2.5.1)
        0x17 if text.len() == 13 => {
            let yy: u32 = text[..2].parse().map_err(|_| "bad time")?;
            format!("{}{}", if yy >= 50 { "19" } else { "20" }, text)
        }
        0x18 if text.len() == 15 => text.to_string(),
        _ => return Err("bad time"),
    };
    let b = full.as_bytes();
    if b[14] != b'Z' || !b[..14].iter().all(u8::is_ascii_digit) {
        return Err("bad time");
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &full[..4],
        &full[4..6],
        &full[6..8],
        &full[8..10],
        &full[10..12],
        &full[12..14]
    );
    humantime::parse_rfc3339(&rfc3339).map_err(|_| "bad time")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_and_times() {
        assert_eq!(
            tlv(&[0x02, 0x01, 0x05, 0xff]).unwrap(),
            (2, &[5u8][..], &[0xffu8][..])
        );
        assert_eq!(tlv(&[0x30, 0x81, 0x01, 0x00]).unwrap().1, &[0u8][..]);
        assert!(tlv(&[0x30, 0x05, 0x00]).is_err());
        assert!(tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_err());
    }
}
