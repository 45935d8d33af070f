//! Shared Access Signature (SAS) tokens, as Azure Service Bus uses them
//! (DESIGN §5): `SharedAccessSignature sr=<urlenc resource>&sig=<urlenc base64
//! HMAC-SHA256(key, "<urlenc resource>\n<expiry>")>&se=<expiry>&skn=<key name>`.
//!
//! [`sas_token`] signs one (the gateway and the test publisher use it);
//! [`verify_sas`] checks one (the emulator's `$cbs` node uses it). Errors never carry
//! the key or the signature.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What the SDKs encode (`quote_plus` / `WebUtility.UrlEncode`): all but `A-Za-z0-9-_.~`.
const URL_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The prefix every SAS token starts with.
pub const PREFIX: &str = "SharedAccessSignature ";

fn urlencode(s: &str) -> String {
    utf8_percent_encode(s, URL_ENCODE).to_string()
}

fn mac(key: &str) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for HMAC.
    HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC accepts any key length")
}

/// Sign a SAS token for `resource_uri` (e.g. `sb://host/topic`) valid until
/// `expiry_unix` (seconds since the Unix epoch).
pub fn sas_token(resource_uri: &str, key_name: &str, key: &str, expiry_unix: u64) -> String {
    let sr = urlencode(resource_uri);
    let mut m = mac(key);
    m.update(format!("{sr}\n{expiry_unix}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes());
    format!(
        "{PREFIX}sr={sr}&sig={}&se={expiry_unix}&skn={}",
        urlencode(&sig),
        urlencode(key_name)
    )
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a token was refused. Never contains the key or the signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("not a SAS token (must start with 'SharedAccessSignature ')")]
    NotSas,
    #[error("SAS token lacks the field {0}")]
    Missing(&'static str),
    #[error("SAS token field {0} is malformed")]
    Malformed(&'static str),
    #[error("SAS token is signed with an unknown key name")]
    UnknownKeyName,
    #[error("SAS token signature does not match")]
    BadSignature,
    #[error("SAS token expired at {0}")]
    Expired(u64),
}

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasClaims {
    /// The resource URI (decoded), e.g. `sb://host/topic`.
    pub resource: String,
    /// Expiry, seconds since the Unix epoch.
    pub expiry: u64,
    pub key_name: String,
}

/// Check `token` against the key `key_name`/`key` at time `now_unix`: the key name must
/// match, the signature must be the HMAC over the `sr` value as sent, and `se` must be
/// in the future.
pub fn verify_sas(
    token: &str,
    key_name: &str,
    key: &str,
    now_unix: u64,
) -> Result<SasClaims, SasError> {
    let fields = token.trim().strip_prefix(PREFIX).ok_or(SasError::NotSas)?;
    let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
    for part in fields.split('&') {
        let Some((k, v)) = part.split_once('=') else {
            continue;
        };
        match k {
            "sr" => sr = Some(v),
            "sig" => sig = Some(v),
            "se" => se = Some(v),
            "skn" => skn = Some(v),
            _ => {}
        }
    }
    let sr = sr.ok_or(SasError::Missing("sr"))?;
    let sig = sig.ok_or(SasError::Missing("sig"))?;
    let se_raw = se.ok_or(SasError::Missing("se"))?;
    let skn = skn.ok_or(SasError::Missing("skn"))?;
    let decode = |v: &str, what: &'static str| {
        percent_decode_str(&v.replace('+', " "))
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| SasError::Malformed(what))
    };
    let skn = decode(skn, "skn")?;
    if skn != key_name {
        return Err(SasError::UnknownKeyName);
    }
    let expiry: u64 = se_raw.parse().map_err(|_| SasError::Malformed("se"))?;
    let sig_b64 = percent_decode_str(sig)
        .decode_utf8()
        .map_err(|_| SasError::Malformed("sig"))?;
    let sig_bytes = base64::engine::general_purpose::STANDARD
        .decode(sig_b64.as_bytes())
        .map_err(|_| SasError::Malformed("sig"))?;
    let mut m = mac(key);
    m.update(format!("{sr}\n{se_raw}").as_bytes());
    m.verify_slice(&sig_bytes)
        .map_err(|_| SasError::BadSignature)?;
    if expiry <= now_unix {
        return Err(SasError::Expired(expiry));
    }
    Ok(SasClaims {
        resource: decode(sr, "sr")?,
        expiry,
        key_name: skn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_round_trip() {
        let t = sas_token(
            "sb://127.0.0.1:5672/operational-events",
            "RootManageSharedAccessKey",
            "SAS_KEY_VALUE",
            2_000_000_000,
        );
        assert!(t.starts_with(
            "SharedAccessSignature sr=sb%3A%2F%2F127.0.0.1%3A5672%2Foperational-events&sig="
        ));
        assert!(t.ends_with("&se=2000000000&skn=RootManageSharedAccessKey"));
        let c = verify_sas(
            &t,
            "RootManageSharedAccessKey",
            "SAS_KEY_VALUE",
            1_999_999_999,
        )
        .unwrap();
        assert_eq!(c.resource, "sb://127.0.0.1:5672/operational-events");
        assert_eq!(c.expiry, 2_000_000_000);
    }

    #[test]
    fn known_vector() {
        // Computed independently with Python:
        // base64(hmac.new(b"key", b"sb%3A%2F%2Fns%2Ft\n1700000000", sha256).digest())
        let t = sas_token("sb://ns/t", "k", "key", 1_700_000_000);
        assert_eq!(
            t,
            "SharedAccessSignature sr=sb%3A%2F%2Fns%2Ft&sig=m15J4L2oq407H8ywXTFMhVBslcCFjg%2FqJ5gVg5CotRw%3D&se=1700000000&skn=k"
        );
    }

    #[test]
    fn refusals() {
        let t = sas_token("sb://ns/", "k", "right", 100);
        assert_eq!(
            verify_sas(&t, "k", "wrong", 50),
            Err(SasError::BadSignature)
        );
        assert_eq!(
            verify_sas(&t, "other", "right", 50),
            Err(SasError::UnknownKeyName)
        );
        assert_eq!(
            verify_sas(&t, "k", "right", 100),
            Err(SasError::Expired(100))
        );
        assert_eq!(
            verify_sas("Bearer x", "k", "right", 1),
            Err(SasError::NotSas)
        );
        assert_eq!(
            verify_sas("SharedAccessSignature sr=x&se=1&skn=k", "k", "right", 0),
            Err(SasError::Missing("sig"))
        );
        // A tampered expiry invalidates the signature.
        let forged = t.replace("se=100", "se=999");
        assert_eq!(
            verify_sas(&forged, "k", "right", 50),
            Err(SasError::BadSignature)
        );
        assert!(!SasError::BadSignature.to_string().contains("right"));
    }
}
