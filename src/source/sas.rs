//! Signing SAS tokens (DESIGN §5): `SharedAccessSignature sr=<urlenc resource>&sig=<urlenc
//! base64 HMAC-SHA256(key, "<urlenc resource>\n<expiry>")>&se=<expiry>&skn=<key name>`.
//! (The same scheme as the emulator's verifier; the integrator may fold this into a
//! shared `crate::sas`.)

use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::Sha256;

/// What the SDKs encode (`quote_plus` / `WebUtility.UrlEncode`): all but `A-Za-z0-9-_.~`.
const URL_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn urlencode(s: &str) -> String {
    utf8_percent_encode(s, URL_ENCODE).to_string()
}

/// Sign a SAS token for `resource_uri` valid until `expiry_unix` (seconds).
pub fn sas_token(resource_uri: &str, key_name: &str, key: &str, expiry_unix: u64) -> String {
    let sr = urlencode(resource_uri);
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.as_bytes()) else {
        // HMAC accepts keys of any length; this branch cannot be taken.
        return String::new();
    };
    mac.update(format!("{sr}\n{expiry_unix}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry_unix}&skn={}",
        urlencode(&sig),
        urlencode(key_name)
    )
}

/// The expiry (`se=`) of a ready-made SAS token, if it has one.
pub fn token_expiry(token: &str) -> Option<u64> {
    token
        .strip_prefix("SharedAccessSignature ")?
        .split('&')
        .find_map(|kv| kv.strip_prefix("se="))?
        .parse()
        .ok()
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shape_and_known_signature() {
        let t = sas_token("sb://ns/t/Subscriptions/s", "K", "key", 1_700_000_000);
        assert!(
            t.starts_with("SharedAccessSignature sr=sb%3A%2F%2Fns%2Ft%2FSubscriptions%2Fs&sig=")
        );
        assert!(t.ends_with("&se=1700000000&skn=K"));
        assert!(!t.contains("key&") && !t.contains("=key"));
        // HMAC-SHA256("key", "sb%3A%2F%2Fns%2Ft%2FSubscriptions%2Fs\n1700000000"), recomputed
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"sb%3A%2F%2Fns%2Ft%2FSubscriptions%2Fs\n1700000000");
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert!(t.contains(&format!("sig={}", urlencode(&sig))));
        assert_eq!(token_expiry(&t), Some(1_700_000_000));
        assert_eq!(token_expiry("SharedAccessSignature sr=x&sig=y"), None);
        assert_ne!(
            t,
            sas_token("sb://ns/t/Subscriptions/s", "K", "other", 1_700_000_000)
        );
    }
}
