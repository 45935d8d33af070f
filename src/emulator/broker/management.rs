//! The `<entity>/$management` node of each queue and subscription:
//! `com.microsoft:renew-lock` (lock tokens travel as the `x-opt-lock-token` delivery
//! annotation). Other operations get status 501, never a silent success.

use std::sync::Arc;

use fe2o3_amqp::Receiver;
use fe2o3_amqp::acceptor::LinkEndpoint;
use fe2o3_amqp::types::definitions::AmqpError;
use fe2o3_amqp::types::messaging::{AmqpValue, ApplicationProperties, Body};
use fe2o3_amqp::types::primitives::{Array, OrderedMap, SimpleValue, Symbol, Timestamp, Value};

use super::reply::{self, Node, ReplySlot};
use super::{ConnShared, error, not_found, refuse};
use crate::emulator::Shared;
use crate::emulator::message::StoredMessage;
use crate::emulator::store::{Address, RenewError};

/// Suffix of an entity's management node address.
const MANAGEMENT_SUFFIX: &str = "/$management";
const RENEW_LOCK: &str = "com.microsoft:renew-lock";
const LOCK_LOST: &str = "com.microsoft:message-lock-lost";

/// The entity (lowercase) whose `$management` node `lower` (a lowercase address) is.
pub(super) fn entity_of(lower: &str) -> Option<&str> {
    lower.strip_suffix(MANAGEMENT_SUFFIX)
}

/// A link attached to `<entity>/$management` (`path` as the client wrote it, `entity`
/// lowercase): refused for an unknown entity, a topic or without a token; otherwise the
/// client's sender carries requests and the client's receiver (at the address `slot`
/// registered before the attach was answered) gets the responses.
pub(super) fn attach(
    link: LinkEndpoint,
    path: &str,
    entity: &str,
    slot: Option<ReplySlot>,
    shared: &Arc<Shared>,
    conn: &Arc<ConnShared>,
) {
    let entity = entity.to_string();
    let refusal = match shared.store.resolve(&entity) {
        None => Some(not_found(conn, &path[..entity.len()])),
        Some(Address::Sink(_)) => Some(error(
            AmqpError::NotImplemented,
            format!(
                "The emulator's $management nodes serve queues and subscriptions, not the topic '{}'.",
                &path[..entity.len()]
            ),
        )),
        Some(_) if !conn.authorized(&entity) => Some(error(
            AmqpError::UnauthorizedAccess,
            format!("Unauthorized access to '{path}': put a valid token with $cbs first."),
        )),
        Some(_) => None,
    };
    if let Some(err) = refusal {
        refuse(link, path, err);
        return;
    }
    match link {
        LinkEndpoint::Receiver(r) => {
            tokio::spawn(requests(r, entity, shared.clone(), conn.clone()));
        }
        LinkEndpoint::Sender(s) => slot
            .unwrap_or_else(|| ReplySlot::reserve(conn, Node::Management, None))
            .serve(s),
    }
}

/// Requests to `<entity>/$management`: `com.microsoft:renew-lock`. Other operations get
/// status 501 (the emulator does not implement them; never a silent success).
async fn requests(receiver: Receiver, entity: String, shared: Arc<Shared>, conn: Arc<ConnShared>) {
    reply::serve_requests(receiver, conn, Node::Management, move |msg| {
        let (code, description, condition, body) = management(msg, &entity, &shared);
        let mut props = ApplicationProperties::builder()
            .insert("statusCode", SimpleValue::Int(code))
            .insert("statusDescription", SimpleValue::String(description));
        if let Some(c) = condition {
            props = props.insert("errorCondition", SimpleValue::Symbol(Symbol::from(c)));
        }
        (props.build(), body)
    })
    .await
}

/// One `$management` request on `entity`: (statusCode, statusDescription,
/// errorCondition, body).
fn management(
    msg: &StoredMessage,
    entity: &str,
    shared: &Shared,
) -> (i32, String, Option<&'static str>, Value) {
    let operation = msg.application_properties.as_ref().and_then(|p| {
        p.get("operation").and_then(|v| match v {
            SimpleValue::String(s) => Some(s.clone()),
            SimpleValue::Symbol(s) => Some(s.0.clone()),
            _ => None,
        })
    });
    let path = shared.store.display_path(entity);
    match operation.as_deref() {
        Some(RENEW_LOCK) => {}
        Some(other) => {
            log::info!("emulator: $management operation '{other}' on {path} is not implemented");
            return (
                501,
                format!("The operation '{other}' is not implemented by the emulator."),
                Some("amqp:not-implemented"),
                Value::Null,
            );
        }
        None => {
            return (
                400,
                "The request has no 'operation' application property.".into(),
                Some("amqp:invalid-field"),
                Value::Null,
            );
        }
    }
    let tokens = match lock_tokens(&msg.body) {
        Ok(t) => t,
        Err(why) => return (400, why, Some("amqp:invalid-field"), Value::Null),
    };
    match shared.store.renew_locks(entity, &tokens) {
        Ok(expirations) => {
            log::debug!("emulator: {} lock(s) on {path} renewed", tokens.len());
            let mut body = OrderedMap::new();
            body.insert(
                Value::String("expirations".into()),
                Value::Array(Array::from(
                    expirations
                        .into_iter()
                        .map(|ms| Value::Timestamp(Timestamp::from_milliseconds(ms)))
                        .collect::<Vec<_>>(),
                )),
            );
            (200, "OK".into(), None, Value::Map(body))
        }
        Err(e @ RenewError::LockLost) => (410, e.to_string(), Some(LOCK_LOST), Value::Null),
        Err(e @ RenewError::NotFound(_)) => {
            (404, e.to_string(), Some("amqp:not-found"), Value::Null)
        }
    }
}

/// The `lock-tokens` of a renew-lock request body: a map with an array (or list) of
/// uuids under the string (or symbol) key `lock-tokens`.
fn lock_tokens(body: &Body<Value>) -> Result<Vec<[u8; 16]>, String> {
    let Body::Value(AmqpValue(Value::Map(map))) = body else {
        return Err("The request body must be a map with 'lock-tokens'.".into());
    };
    let list = map.iter().find_map(|(k, v)| match k {
        Value::String(s) if s == "lock-tokens" => Some(v),
        Value::Symbol(s) if s.0 == "lock-tokens" => Some(v),
        _ => None,
    });
    let items: Vec<&Value> = match list {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(Value::List(l)) => l.iter().collect(),
        _ => return Err("'lock-tokens' must be an array of uuids.".into()),
    };
    items
        .into_iter()
        .map(|v| match v {
            Value::Uuid(u) => Ok(*u.as_inner()),
            other => Err(format!("'lock-tokens' holds {other:?}, not a uuid.")),
        })
        .collect()
}
