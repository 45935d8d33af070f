//! JSON Web Tokens signed with RS256 (RFC 7519, RFC 7515 compact serialisation, RFC 7518
//! §3.3 RSASSA-PKCS1-v1_5 with SHA-256), with ring — the crypto the binary already
//! carries for rustls. Three users:
//! - the source signs the client assertion of Entra ID's certificate credential
//!   (Microsoft identity platform, "certificate credentials": header `x5t`/`x5t#S256`);
//! - the emulator verifies the access tokens put on `$cbs` (`--jwt-public-key`);
//! - tests sign tokens for their token endpoint.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaKeyPair, UnparsedPublicKey};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, SubjectPublicKeyInfoDer};

/// Why a key could not be read or a token not be verified. Never holds the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("no PEM private key (PKCS#8 or PKCS#1 RSA)")]
    NoKey,
    #[error("the private key is not an RSA key ring accepts: {0}")]
    BadKey(String),
    #[error("no PEM PUBLIC KEY or RSA PUBLIC KEY")]
    NoPublicKey,
    #[error("no PEM CERTIFICATE")]
    NoCertificate,
    #[error("the token is not three base64url parts")]
    Malformed,
    #[error("the token's algorithm is not RS256")]
    Algorithm,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token's claims are not a JSON object")]
    Claims,
}

/// `data` in base64url without padding (RFC 7515 §2).
pub fn b64url(data: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// An RSA private key that signs RS256 tokens.
pub struct RsaSigner {
    key: RsaKeyPair,
}

impl std::fmt::Debug for RsaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RsaSigner")
            .field("modulus_bits", &(self.key.public().modulus_len() * 8))
            .finish_non_exhaustive()
    }
}

impl RsaSigner {
    /// The first private key in `pem` (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`).
    ///
    /// Errors: [`JwtError::NoKey`], [`JwtError::BadKey`] (not RSA, too short, …).
    pub fn from_pem(pem: &[u8]) -> Result<Self, JwtError> {
        let key = match PrivateKeyDer::from_pem_slice(pem).map_err(|_| JwtError::NoKey)? {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => return Err(JwtError::BadKey("an EC key; RS256 needs RSA".into())),
        }
        .map_err(|e| JwtError::BadKey(e.to_string()))?;
        Ok(RsaSigner { key })
    }

    /// The compact JWS `base64url(header).base64url(claims).base64url(signature)`;
    /// `header` gets `"alg":"RS256","typ":"JWT"` added.
    pub fn sign(
        &self,
        mut header: serde_json::Map<String, serde_json::Value>,
        claims: &serde_json::Value,
    ) -> String {
        header.insert("alg".into(), "RS256".into());
        header.insert("typ".into(), "JWT".into());
        let input = format!(
            "{}.{}",
            b64url(serde_json::Value::Object(header).to_string()),
            b64url(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        // ring's RSA signing fails only on a wrong output length, sized above.
        let rng = ring::rand::SystemRandom::new();
        self.key
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &rng,
                input.as_bytes(),
                &mut sig,
            )
            .expect("RSA signature of the modulus' length");
        format!("{input}.{}", b64url(sig))
    }
}

/// The `x5t` and `x5t#S256` of the first certificate in `pem`: base64url of its
/// SHA-1 and SHA-256 (RFC 7515 §4.1.7–8), as the Microsoft identity platform wants
/// them in a client assertion's header.
pub fn thumbprints(pem: &[u8]) -> Result<(String, String), JwtError> {
    let cert = CertificateDer::from_pem_slice(pem).map_err(|_| JwtError::NoCertificate)?;
    let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert.as_ref());
    let sha256 = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    Ok((b64url(sha1), b64url(sha256)))
}

/// An RSA public key that verifies RS256 tokens.
#[derive(Debug, Clone)]
pub struct RsaVerifier {
    /// The RSAPublicKey (PKCS#1) DER ring verifies with.
    pkcs1: Vec<u8>,
}

impl RsaVerifier {
    /// The key in `pem`: `PUBLIC KEY` (SubjectPublicKeyInfo, as `openssl pkey -pubout`
    /// writes it) or `RSA PUBLIC KEY` (PKCS#1).
    ///
    /// Errors: [`JwtError::NoPublicKey`].
    pub fn from_pem(pem: &[u8]) -> Result<Self, JwtError> {
        if let Ok(spki) = SubjectPublicKeyInfoDer::from_pem_slice(pem) {
            let pkcs1 = spki_rsa_key(spki.as_ref()).ok_or(JwtError::NoPublicKey)?;
            return Ok(RsaVerifier { pkcs1 });
        }
        let text = std::str::from_utf8(pem).map_err(|_| JwtError::NoPublicKey)?;
        let body: String = text
            .split("-----BEGIN RSA PUBLIC KEY-----")
            .nth(1)
            .and_then(|rest| rest.split("-----END RSA PUBLIC KEY-----").next())
            .ok_or(JwtError::NoPublicKey)?
            .split_whitespace()
            .collect();
        let pkcs1 = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| JwtError::NoPublicKey)?;
        Ok(RsaVerifier { pkcs1 })
    }

    /// The verifier of a signer's public key.
    pub fn of(signer: &RsaSigner) -> Self {
        RsaVerifier {
            pkcs1: signer.key.public().as_ref().to_vec(),
        }
    }

    /// Check `token`'s RS256 signature and return its claims (nothing else is checked:
    /// expiry and audience are the caller's).
    ///
    /// Errors: [`JwtError::Malformed`], [`JwtError::Algorithm`], [`JwtError::Signature`],
    /// [`JwtError::Claims`].
    pub fn verify(
        &self,
        token: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, JwtError> {
        let mut parts = token.trim().split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let decode = |p: &str| URL_SAFE_NO_PAD.decode(p).map_err(|_| JwtError::Malformed);
        let header: serde_json::Value =
            serde_json::from_slice(&decode(h)?).map_err(|_| JwtError::Malformed)?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("RS256") {
            return Err(JwtError::Algorithm);
        }
        let input_len = h.len() + 1 + c.len();
        UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &self.pkcs1)
            .verify(&token.trim().as_bytes()[..input_len], &decode(s)?)
            .map_err(|_| JwtError::Signature)?;
        match serde_json::from_slice(&decode(c)?) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            _ => Err(JwtError::Claims),
        }
    }
}

/// The RSAPublicKey inside an RSA SubjectPublicKeyInfo (RFC 5280 §4.1: `SEQUENCE {
/// SEQUENCE { OID rsaEncryption, NULL }, BIT STRING { RSAPublicKey } }`), or None.
fn spki_rsa_key(der: &[u8]) -> Option<Vec<u8>> {
    /// One DER element at the start of `b`: (tag, content, rest).
    fn element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, b) = b.split_first()?;
        let (len, b) = if first < 0x80 {
            (first as usize, b)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let len = b[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
            (len, &b[n..])
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let (0x30, spki, _) = element(der)? else {
        return None;
    };
    let (0x30, algorithm, rest) = element(spki)? else {
        return None;
    };
    let (0x06, oid, _) = element(algorithm)? else {
        return None;
    };
    if oid != RSA_ENCRYPTION {
        return None;
    }
    let (0x03, bits, _) = element(rest)? else {
        return None;
    };
    let (&0, key) = bits.split_first()? else {
        return None;
    };
    Some(key.to_vec())
}

/// A fresh 2048-bit RSA key (`openssl genpkey`), for the crate's unit tests.
#[cfg(test)]
pub(crate) fn test_signer() -> RsaSigner {
    tests::key()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh 2048-bit test key (PKCS#8) from `openssl genpkey -algorithm RSA`, checked
    /// against its SPKI as `openssl pkey -pubout` writes it.
    pub(super) fn key() -> RsaSigner {
        let dir = std::env::temp_dir().join(format!(
            "asbgw-jwt-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k.pem");
        let st = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&path)
            .status()
            .unwrap();
        assert!(st.success());
        let s = RsaSigner::from_pem(&std::fs::read(&path).unwrap()).unwrap();
        let pubout = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&path)
            .output()
            .unwrap();
        let v = RsaVerifier::from_pem(&pubout.stdout).unwrap();
        assert_eq!(
            v.pkcs1,
            RsaVerifier::of(&s).pkcs1,
            "SPKI parsed to the same key"
        );
        let _ = std::fs::remove_dir_all(&dir);
        s
    }

    #[test]
    fn signed_tokens_verify_and_tampered_ones_do_not() {
        let s = key();
        let v = RsaVerifier::of(&s);
        let claims = serde_json::json!({"aud": "https://servicebus.azure.net", "exp": 42});
        let t = s.sign(serde_json::Map::new(), &claims);
        let got = v.verify(&t).unwrap();
        assert_eq!(got["aud"], "https://servicebus.azure.net");
        // another claim set under the same signature
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64url(r#"{"aud":"https://servicebus.azure.net","exp":99999999999}"#),
            parts[2]
        );
        assert_eq!(v.verify(&forged), Err(JwtError::Signature));
        assert_eq!(v.verify("a.b"), Err(JwtError::Malformed));
        let none = format!("{}.{}.", b64url(r#"{"alg":"none"}"#), parts[1]);
        assert_eq!(v.verify(&none), Err(JwtError::Algorithm));
        // another key's signature
        let other = key();
        assert_eq!(RsaVerifier::of(&other).verify(&t), Err(JwtError::Signature));
    }
}
