//! The `$cbs` node: `put-token` requests (token types `jwt` and
//! `servicebus.windows.net:sastoken`) carrying a SAS string validated against the key,
//! or — with `--jwt-public-key` — a Microsoft Entra ID access token (RS256, audience
//! `https://servicebus.azure.net`, not expired), which covers the whole namespace. An
//! accepted token authorises links to the entities it covers until it expires.

use std::sync::Arc;

use fe2o3_amqp::Receiver;
use fe2o3_amqp::acceptor::LinkEndpoint;
use fe2o3_amqp::types::messaging::{AmqpValue, ApplicationProperties, Body};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};

use super::reply::{self, Node, ReplySlot};
use super::{ConnShared, normalize_address};
use crate::emulator::Shared;
use crate::emulator::message::StoredMessage;

/// Token types the SDKs send; both carry a SAS string.
const TOKEN_TYPES: [&str; 2] = ["jwt", "servicebus.windows.net:sastoken"];

/// The address of the node.
pub(super) const ADDRESS: &str = "$cbs";

/// A link attached to `$cbs`: the client's sender carries requests, the client's
/// receiver (at the address `slot` registered before the attach was answered) gets the
/// responses.
pub(super) fn attach(
    link: LinkEndpoint,
    slot: Option<ReplySlot>,
    shared: &Arc<Shared>,
    conn: &Arc<ConnShared>,
) {
    match link {
        LinkEndpoint::Receiver(r) => {
            tokio::spawn(requests(r, shared.clone(), conn.clone()));
        }
        LinkEndpoint::Sender(s) => slot
            .unwrap_or_else(|| ReplySlot::reserve(conn, Node::Cbs, None))
            .serve(s),
    }
}

/// Requests to the `$cbs` node: put-token, answered with `status-code` and
/// `status-description`.
async fn requests(receiver: Receiver, shared: Arc<Shared>, conn: Arc<ConnShared>) {
    let c = conn.clone();
    reply::serve_requests(receiver, conn, Node::Cbs, move |msg| {
        let (code, description) = put_token(msg, &shared, &c);
        let props = ApplicationProperties::builder()
            .insert("status-code", SimpleValue::Int(code))
            .insert("status-description", SimpleValue::String(description))
            .build();
        (props, Value::Null)
    })
    .await
}

/// The audiences Service Bus accepts in an Entra ID token.
const AUDIENCES: [&str; 2] = [
    "https://servicebus.azure.net",
    "https://servicebus.azure.net/",
];

/// Check an Entra ID access token as Service Bus does: RS256 signature by `key`,
/// audience Service Bus, `exp` in the future (and `nbf`, if present, not); returns its
/// expiry (seconds since the Unix epoch) or the refusal's description.
fn entra_token(key: &crate::jwt::RsaVerifier, token: &str, now: u64) -> Result<u64, String> {
    let claims = key
        .verify(token)
        .map_err(|e| format!("InvalidSignature: {e}"))?;
    let aud = claims.get("aud").and_then(|a| a.as_str()).unwrap_or("");
    if !AUDIENCES.contains(&aud) {
        return Err(format!(
            "InvalidAudience: the token's audience {aud:?} is not Service Bus"
        ));
    }
    let exp = claims
        .get("exp")
        .and_then(|e| e.as_u64())
        .ok_or("InvalidToken: no exp claim")?;
    if exp <= now {
        return Err(format!("ExpiredToken: the token expired at {exp}"));
    }
    if claims
        .get("nbf")
        .and_then(|n| n.as_u64())
        .is_some_and(|nbf| nbf > now + 300)
    {
        return Err("InvalidToken: the token is not valid yet (nbf)".into());
    }
    Ok(exp)
}

/// Validate one put-token request; returns the status code and description.
fn put_token(msg: &StoredMessage, shared: &Shared, conn: &ConnShared) -> (i32, String) {
    let prop = |k: &str| {
        msg.application_properties.as_ref().and_then(|p| {
            p.get(k).and_then(|v| match v {
                SimpleValue::String(s) => Some(s.clone()),
                SimpleValue::Symbol(s) => Some(s.0.clone()),
                _ => None,
            })
        })
    };
    if prop("operation").as_deref() != Some("put-token") {
        return (400, "Only the put-token operation is supported.".into());
    }
    let Some(kind) = prop("type") else {
        return (400, "The token type is missing.".into());
    };
    if !TOKEN_TYPES.contains(&kind.as_str()) {
        return (400, format!("The token type '{kind}' is not supported."));
    }
    let Some(audience) = prop("name") else {
        return (400, "The audience (name) is missing.".into());
    };
    let token = match &msg.body {
        Body::Value(AmqpValue(Value::String(s))) => s.clone(),
        Body::Value(AmqpValue(Value::Binary(b))) => String::from_utf8_lossy(b).into_owned(),
        _ => return (400, "The token must be a string.".into()),
    };
    if let Some(key) = &shared.jwt_key
        && kind == "jwt"
        && !token.starts_with(crate::sas::PREFIX)
    {
        return match entra_token(key, &token, crate::sas::now_unix()) {
            Ok(expiry) => {
                conn.add_token(normalize_address(&audience).to_ascii_lowercase(), expiry);
                (202, "Accepted".into())
            }
            Err(e) => {
                log::info!("emulator: put-token (jwt) for '{audience}' refused: {e}");
                (401, e)
            }
        };
    }
    match crate::sas::verify_sas(
        &token,
        &shared.key_name,
        &shared.key,
        crate::sas::now_unix(),
    ) {
        Ok(claims) => {
            let scope = normalize_address(&claims.resource).to_ascii_lowercase();
            let aud = normalize_address(&audience).to_ascii_lowercase();
            let covered = scope.is_empty()
                || aud == scope
                || aud
                    .strip_prefix(scope.as_str())
                    .is_some_and(|r| r.starts_with('/'));
            if !covered {
                return (
                    401,
                    format!(
                        "The token for '{}' does not cover '{audience}'.",
                        claims.resource
                    ),
                );
            }
            conn.add_token(aud, claims.expiry);
            (202, "Accepted".into())
        }
        Err(e) => {
            log::info!("emulator: put-token for '{audience}' refused: {e}");
            (401, format!("InvalidSignature: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::{RsaVerifier, test_signer};

    #[test]
    fn entra_tokens_are_checked_for_signature_audience_and_expiry() {
        let signer = test_signer();
        let key = RsaVerifier::of(&signer);
        let now = 1_800_000_000;
        let token = |aud: &str, exp: u64| {
            signer.sign(
                serde_json::Map::new(),
                &serde_json::json!({"aud": aud, "exp": exp, "nbf": now - 10}),
            )
        };
        let sb = "https://servicebus.azure.net";
        assert_eq!(entra_token(&key, &token(sb, now + 60), now), Ok(now + 60));
        assert_eq!(
            entra_token(&key, &token("https://servicebus.azure.net/", now + 1), now),
            Ok(now + 1)
        );
        let e = entra_token(&key, &token("https://storage.azure.com", now + 60), now).unwrap_err();
        assert!(e.starts_with("InvalidAudience"), "{e}");
        let e = entra_token(&key, &token(sb, now), now).unwrap_err();
        assert!(e.starts_with("ExpiredToken"), "{e}");
        let other = RsaVerifier::of(&test_signer());
        let e = entra_token(&other, &token(sb, now + 60), now).unwrap_err();
        assert!(e.starts_with("InvalidSignature"), "{e}");
    }
}
