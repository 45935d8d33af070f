//! Claims-based security (DESIGN §5): SAS tokens put on the `$cbs` node, one per link
//! audience (`sb://HOST/<address>`), renewed on the live connection before they expire.

use std::time::Duration;

use fe2o3_amqp_cbs::{client::CbsClient, token::CbsToken};
use fe2o3_amqp_management::error::Error as MgmtError;
use fe2o3_amqp_types::primitives::Timestamp;

use super::error::SourceError;
use crate::config::{ConnectionString, Credential};
use crate::sas;

/// The token type ASB expects for SAS tokens.
pub const TOKEN_TYPE: &str = "servicebus.windows.net:sastoken";

/// Makes the tokens of one namespace.
#[derive(Clone)]
pub struct Tokens {
    host: String,
    credential: Credential,
    ttl: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("host", &self.host)
            .field("credential", &self.credential)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Tokens {
    pub fn new(conn: &ConnectionString, ttl: Duration) -> Self {
        Tokens {
            host: conn.host.clone(),
            credential: conn.credential.clone(),
            ttl,
        }
    }

    /// The audience (and put-token name) of a link source address.
    pub fn audience(&self, address: &str) -> String {
        format!("sb://{}/{}", self.host, address.trim_start_matches('/'))
    }

    /// Signed locally (and so renewable), or a ready-made signature used as given?
    pub fn renewable(&self) -> bool {
        matches!(self.credential, Credential::Key { .. })
    }

    /// A token for `audience` and its expiry (seconds since the Unix epoch).
    pub fn token(&self, audience: &str) -> (String, Option<u64>) {
        match &self.credential {
            Credential::Key { name, key } => {
                let expiry = sas::now_unix() + self.ttl.as_secs().max(1);
                (
                    sas::sas_token(audience, name, key.expose(), expiry),
                    Some(expiry),
                )
            }
            Credential::Signature(sig) => (sig.expose().to_string(), token_expiry(sig.expose())),
        }
    }

    /// Put a token for `audience` on the `$cbs` node.
    pub async fn put(&self, cbs: &mut CbsClient, audience: &str) -> Result<(), SourceError> {
        let (token, expiry) = self.token(audience);
        let expires = expiry.map(|s| Timestamp::from_milliseconds(s as i64 * 1000));
        let token = CbsToken::new(token, TOKEN_TYPE, expires);
        cbs.put_token(audience, token)
            .await
            .map_err(|e| put_error(audience, e))
    }
}

/// The expiry (`se=`) of a ready-made SAS token, if it has one.
fn token_expiry(token: &str) -> Option<u64> {
    token
        .strip_prefix(sas::PREFIX)?
        .split('&')
        .find_map(|kv| kv.strip_prefix("se="))?
        .parse()
        .ok()
}

/// A put-token failure as a clear error. The broker's status and description only:
/// never the token.
fn put_error(audience: &str, e: MgmtError) -> SourceError {
    match e {
        MgmtError::Status(s) => SourceError::TokenRejected {
            audience: audience.to_string(),
            reason: format!(
                "status {}{}",
                s.code.0,
                s.description.map(|d| format!(" ({d})")).unwrap_or_default()
            ),
        },
        MgmtError::Send(e) => SourceError::Cbs(format!("put-token not sent: {e}")),
        MgmtError::Recv(e) => SourceError::Cbs(format!("no put-token response: {e}")),
        MgmtError::NotAccepted(_) => SourceError::Cbs("put-token request not accepted".into()),
        MgmtError::Disposition(e) => SourceError::Cbs(format!("put-token disposition: {e}")),
        MgmtError::CorrelationIdAndMessageIdAreNone
        | MgmtError::StatusCodeNotFound
        | MgmtError::DecodeError(_) => {
            SourceError::Cbs("malformed put-token response from the broker".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn conn(credential: Credential) -> ConnectionString {
        ConnectionString {
            host: "ns.example".into(),
            port: 5671,
            tls: true,
            credential,
            entity_path: None,
            emulator: false,
            websockets: false,
            port_explicit: false,
        }
    }

    #[test]
    fn key_tokens_are_signed_for_the_audience_and_expire() {
        let t = Tokens::new(
            &conn(Credential::Key {
                name: "K".into(),
                key: Secret::new("TOPSECRET"),
            }),
            Duration::from_secs(120),
        );
        assert!(t.renewable());
        let aud = t.audience("topic/Subscriptions/sub");
        assert_eq!(aud, "sb://ns.example/topic/Subscriptions/sub");
        assert_eq!(t.audience("/queue/q"), "sb://ns.example/queue/q");
        let (tok, exp) = t.token(&aud);
        let exp = exp.unwrap();
        assert!((sas::now_unix() + 115..=sas::now_unix() + 121).contains(&exp));
        assert!(tok.contains("sr=sb%3A%2F%2Fns.example%2Ftopic%2FSubscriptions%2Fsub"));
        assert!(!tok.contains("TOPSECRET"));
        assert!(!format!("{t:?}").contains("TOPSECRET"));
    }

    #[test]
    fn given_signature_is_used_as_is() {
        let sig = "SharedAccessSignature sr=x&sig=abc&se=1900000000&skn=K";
        let t = Tokens::new(
            &conn(Credential::Signature(Secret::new(sig))),
            Duration::from_secs(60),
        );
        assert!(!t.renewable());
        assert_eq!(t.token("sb://ns/x"), (sig.to_string(), Some(1_900_000_000)));
        assert!(!format!("{t:?}").contains("abc"));
        assert_eq!(token_expiry("SharedAccessSignature sr=x&sig=y"), None);
    }
}
