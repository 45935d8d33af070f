//! Claims-based security (DESIGN §5): tokens put on the `$cbs` node, one per link
//! audience (`sb://HOST/<address>`), renewed on the live connection before they expire:
//! SAS tokens signed with the connection string's key (or its ready-made signature),
//! or Microsoft Entra ID access tokens (type `jwt`, [`crate::identity`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp_cbs::{client::CbsClient, token::CbsToken};
use fe2o3_amqp_management::error::Error as MgmtError;
use fe2o3_amqp_types::primitives::Timestamp;

use super::error::SourceError;
use crate::config::{ConnectionString, Credential};
use crate::identity::{AccessToken, TokenClient};
use crate::sas;

/// The token type ASB expects for SAS tokens.
pub const TOKEN_TYPE: &str = "servicebus.windows.net:sastoken";
/// The token type of Entra ID access tokens.
pub const JWT_TOKEN_TYPE: &str = "jwt";

/// Makes the tokens of one namespace.
#[derive(Clone)]
pub struct Tokens {
    host: String,
    credential: Credential,
    ttl: Duration,
    /// Entra ID: the token client and the last token (with when it was obtained).
    entra: Option<Arc<Entra>>,
}

struct Entra {
    client: TokenClient,
    cached: Mutex<Option<(AccessToken, u64)>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("host", &self.host)
            .field("credential", &self.credential)
            .field("ttl", &self.ttl)
            .field("entra", &self.entra.as_ref().map(|e| &e.client))
            .finish()
    }
}

impl Tokens {
    pub fn new(conn: &ConnectionString, ttl: Duration) -> Self {
        Tokens {
            host: conn.host.clone(),
            credential: conn.credential.clone(),
            ttl,
            entra: None,
        }
    }

    /// Tokens from Microsoft Entra ID instead of the connection string.
    pub fn with_entra(mut self, client: TokenClient) -> Self {
        self.entra = Some(Arc::new(Entra {
            client,
            cached: Mutex::new(None),
        }));
        self
    }

    /// Forget the cached Entra ID token, so the next put gets a new one (before the
    /// one in use expires).
    pub fn renew_entra(&self) {
        if let Some(e) = &self.entra {
            *e.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// How long until the tokens put last should be put again: 80 % of the Entra ID
    /// token's remaining life (at least 1 s), or None for SAS tokens (their interval is
    /// the TTL's).
    pub fn entra_refresh_in(&self) -> Option<Duration> {
        let e = self.entra.as_ref()?;
        let cached = e.cached.lock().unwrap_or_else(|p| p.into_inner());
        let left = cached
            .as_ref()
            .map_or(0, |(t, _)| t.expires_on.saturating_sub(sas::now_unix()));
        Some(
            Duration::from_secs(left)
                .mul_f64(0.8)
                .max(Duration::from_secs(1)),
        )
    }

    /// The Entra ID token to put: the cached one while more than half of its life is
    /// left, else a new one.
    async fn entra_token(&self, e: &Entra) -> Result<AccessToken, SourceError> {
        let now = sas::now_unix();
        if let Some((t, obtained)) = e.cached.lock().unwrap_or_else(|p| p.into_inner()).clone()
            && t.expires_on.saturating_sub(now).saturating_mul(2)
                > t.expires_on.saturating_sub(obtained)
        {
            return Ok(t);
        }
        let t = e.client.token().await?;
        log::debug!(
            "source: Entra ID token obtained, valid for {} s",
            t.expires_on.saturating_sub(now)
        );
        *e.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((t.clone(), now));
        Ok(t)
    }

    /// The audience (and put-token name) of a link source address.
    pub fn audience(&self, address: &str) -> String {
        format!("sb://{}/{}", self.host, address.trim_start_matches('/'))
    }

    /// Signed locally or obtained from Entra ID (and so renewable), or a ready-made
    /// signature used as given?
    pub fn renewable(&self) -> bool {
        self.entra.is_some() || matches!(self.credential, Credential::Key { .. })
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
            // Entra ID tokens come from `put`; the config refuses CBS without either.
            Credential::None => (String::new(), None),
        }
    }

    /// Put a token for `audience` on the `$cbs` node.
    ///
    /// Errors: [`SourceError::Identity`] when no Entra ID token could be obtained,
    /// [`SourceError::TokenRejected`]/[`SourceError::Cbs`] when the broker refused it.
    pub async fn put(&self, cbs: &mut CbsClient, audience: &str) -> Result<(), SourceError> {
        let (token, expiry, kind) = match &self.entra {
            Some(e) => {
                let t = self.entra_token(e).await?;
                (t.token, Some(t.expires_on), JWT_TOKEN_TYPE)
            }
            None => {
                let (t, expiry) = self.token(audience);
                (t, expiry, TOKEN_TYPE)
            }
        };
        // A ready-made signature's `se=` is whatever the operator pasted.
        let expires = expiry.map(|s| {
            Timestamp::from_milliseconds(i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000))
        });
        let token = CbsToken::new(token, kind, expires);
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
                s.description
                    .map(|d| format!(" ({})", crate::redact::peer_text(&d)))
                    .unwrap_or_default()
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
