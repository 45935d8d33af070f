//! Certificates and keys from PEM files, checked before use, for every TLS endpoint of
//! the gateway: the panel port's server certificate and the MQTT mirror's client
//! certificate. Each fault names the file and the reason.
//!
//! - The first `CERTIFICATE` block is the end-entity certificate, any further ones its
//!   chain; the key is the first PKCS#8, PKCS#1 (RSA) or SEC1 (EC) key block.
//! - Encrypted keys are refused (a daemon has no one to ask for a passphrase); a key that
//!   does not belong to the certificate and an expired certificate are refused.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio_rustls::rustls::client::ResolvesClientCert;
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, RootCertStore, SignatureScheme};

use crate::redact::shown_path;

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
    #[error("{}: cannot read: {reason}", shown_path(path))]
    Read { path: PathBuf, reason: String },
    #[error("{}: no PEM CERTIFICATE block", shown_path(path))]
    NoCertificate { path: PathBuf },
    #[error(
        "{}: the private key is encrypted; give an unencrypted PEM key (e.g. `openssl pkey -in KEY -out PLAIN`)",
        shown_path(path)
    )]
    EncryptedKey { path: PathBuf },
    #[error("{}: no PEM private key (PKCS#8, RSA or EC)", shown_path(path))]
    NoKey { path: PathBuf },
    #[error("{}: the key cannot be used: {reason}", shown_path(path))]
    BadKey { path: PathBuf, reason: String },
    #[error(
        "{}: the key does not belong to the certificate in {}",
        shown_path(key),
        shown_path(cert)
    )]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: the certificate cannot be parsed: {reason}", shown_path(path))]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{}: the certificate expired on {at}", shown_path(path))]
    Expired { path: PathBuf, at: String },
}

/// A checked certificate and key, ready for a TLS endpoint.
#[derive(Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// The certificate's notAfter.
    pub not_after: SystemTime,
}

/// "KEY FILE: the certificate expires in N days (DATE)" when `not_after` is within
/// [`EXPIRY_WARNING`] (`key` names the config key, e.g. `panels.tls_cert`).
pub fn expiry_warning(key: &str, files: &CertFiles, not_after: SystemTime) -> Option<String> {
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    (left < EXPIRY_WARNING).then(|| {
        format!(
            "{key} {}: the certificate expires in {} days ({})",
            crate::redact::escaped_path(&files.cert),
            left.as_secs() / 86_400,
            humantime::format_rfc3339_seconds(not_after)
        )
    })
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    crate::file_limit::read_capped(path, crate::file_limit::MAX_FILE_BYTES).map_err(|e| {
        CertError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
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

/// The certificate an endpoint presents — the panel port's server certificate, the
/// mirror's client certificate — replaceable while it runs: connections made before a
/// [`ReloadableCert::set`] keep the certificate they were made with.
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

impl ResolvesClientCert for ReloadableCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The certificates of a PEM bundle (a plant's CA) added to `roots`; returns how many.
/// Errors: the file cannot be read, or holds no certificate rustls accepts.
pub fn add_ca_bundle(roots: &mut RootCertStore, path: &Path) -> Result<usize, CertError> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(CertError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(added)
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
    // Digits and 'Z' only (checked below); anything else, a multi-byte character
    // included, is refused before the text is sliced by byte.
    let text = std::str::from_utf8(time)
        .ok()
        .filter(|t| t.is_ascii())
        .ok_or("bad time")?;
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

    /// A certificate skeleton: SEQ { SEQ (tbs) { [0] version, serial, signature,
    /// issuer, validity { notBefore, notAfter } } } with `after` as the notAfter TLV.
    fn cert_with_not_after(after: &[u8]) -> CertificateDer<'static> {
        fn seq(tag: u8, body: &[u8]) -> Vec<u8> {
            let mut v = vec![tag, body.len() as u8];
            v.extend_from_slice(body);
            v
        }
        let before = seq(0x17, b"250101000000Z");
        let validity = seq(0x30, &[before, after.to_vec()].concat());
        let tbs = [
            seq(0xA0, &seq(0x02, &[2])),
            seq(0x02, &[1]),
            seq(0x30, &[]),
            seq(0x30, &[]),
            validity,
        ]
        .concat();
        CertificateDer::from(seq(0x30, &seq(0x30, &tbs)))
    }

    #[test]
    fn not_after_reads_utc_and_generalized_time_and_refuses_anything_else() {
        let t = not_after(&cert_with_not_after(
            &[&[0x17, 13][..], b"300101000000Z"].concat(),
        ));
        let want = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_893_456_000);
        assert_eq!(t, Ok(want));
        let t = not_after(&cert_with_not_after(
            &[&[0x18, 15][..], b"20300101000000Z"].concat(),
        ));
        assert_eq!(t, Ok(want));
        // A multi-byte character at byte 1 of a 13-byte UTCTime: refused, not a panic
        // on slicing inside the character.
        let odd = [&[0x17, 13][..], "3é0101000000".as_bytes()].concat();
        assert_eq!(not_after(&cert_with_not_after(&odd)), Err("bad time"));
        for bad in [&b"3001010000001"[..], b"30010100000Z", b"2030010100000Z"] {
            let tlv = [&[0x17, bad.len() as u8][..], bad].concat();
            assert_eq!(
                not_after(&cert_with_not_after(&tlv)),
                Err("bad time"),
                "{bad:?}"
            );
        }
    }
}
