//! Peek-lock renewal (issue 22): `com.microsoft:renew-lock` on an entity's management
//! node, as the Azure SDKs do it (`renew_message_lock` / `RenewMessageLockAsync`).
//!
//! Protocol (AMQP 1.0 request/response, ASB's management dialect):
//! - a sender link to `<entity path>/$management` (e.g.
//!   `operational-events/Subscriptions/edge/$management`) and a receiver link whose
//!   source is the same node and whose target is our reply address;
//! - request: application-properties `operation = "com.microsoft:renew-lock"`,
//!   `com.microsoft:server-timeout` (uint, ms), optionally `associated-link-name` (the
//!   name of the receiver link that holds the locks, as the .NET SDK sends it);
//!   properties `message-id` and `reply-to`; body an AMQP map
//!   `{"lock-tokens": array of uuid}`;
//! - response: application-properties `statusCode` (int; 200 = renewed) and
//!   `statusDescription` (string), `errorCondition` (symbol) on failure; properties
//!   `correlation-id` = the request's message-id; body `{"expirations": array of
//!   timestamp}` (ms since the Unix epoch), one per token, in the request's order.
//!   Status 410 with `com.microsoft:message-lock-lost` means a lock is gone (expired,
//!   settled, or held by a link that was lost); ASB renews none of the request's locks
//!   then.
//!
//! Lock tokens: ASB's delivery tag is the lock token's 16 bytes in .NET `Guid` byte
//! order (`Guid.ToByteArray()`: the first three groups little-endian); the request
//! carries the same GUID as an AMQP uuid, i.e. in RFC 4122 byte order. The Python SDK
//! does `uuid.UUID(bytes_le=delivery_tag)`; [`guid_to_uuid`] is that conversion. A
//! broker whose delivery tags are not 16 bytes (the project's emulator: fe2o3 numbers
//! its tags itself) sends the token as the `x-opt-lock-token` delivery annotation,
//! which the SDKs also read; [`lock_token`] takes either and returns the delivery-tag
//! form, so [`LockRenewer::renew`] always takes tag-form tokens.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp::Delivery;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp_management::MgmtClient;
use fe2o3_amqp_management::error::Error as MgmtError;
use fe2o3_amqp_management::request::Request;
use fe2o3_amqp_management::response::Response;
use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, MessageId, Properties,
};
use fe2o3_amqp_types::primitives::{Array, OrderedMap, SimpleValue, Uuid, Value};

/// `operation` of a renew-lock request.
pub const RENEW_LOCK_OPERATION: &str = "com.microsoft:renew-lock";
/// `errorCondition` of a 410 response.
pub const MESSAGE_LOCK_LOST: &str = "com.microsoft:message-lock-lost";
/// The delivery annotation carrying the lock token when the delivery tag does not.
pub const LOCK_TOKEN_ANNOTATION: &str = "x-opt-lock-token";
/// Default time to wait for a response (also sent as `com.microsoft:server-timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The management links could not be attached (e.g. `amqp:not-found` for an
    /// unknown entity, `amqp:unauthorized-access` without a token covering it).
    #[error("cannot attach to {node}: {reason}")]
    Attach { node: String, reason: String },
    /// Status 410 (`com.microsoft:message-lock-lost`): at least one lock is gone; none
    /// of the request's locks was renewed. The messages will be redelivered by the
    /// broker; do not settle them.
    #[error("lock lost: {0}")]
    LockLost(String),
    /// Any other status code.
    #[error("renew-lock answered {code}{}: {description}", condition.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status {
        code: u16,
        condition: Option<String>,
        description: String,
    },
    /// The request could not be sent or the response not received: the management links
    /// are gone; attach a new [`LockRenewer`] (on a live session).
    #[error("renew-lock link failed: {0}")]
    Link(String),
    /// No response within the timeout (a late response is discarded by the next call).
    #[error("no renew-lock response within {0:?}")]
    Timeout(Duration),
    /// A 200 response whose body is not `{"expirations": [timestamp; n]}`.
    #[error("malformed renew-lock response: {0}")]
    Response(String),
}

impl RenewError {
    pub fn is_lock_lost(&self) -> bool {
        matches!(self, RenewError::LockLost(_))
    }
}

/// .NET `Guid` byte order (ASB's delivery tag) → RFC 4122 byte order (an AMQP uuid):
/// the first three groups are reversed. The conversion is its own inverse.
pub fn guid_to_uuid(b: &[u8; 16]) -> [u8; 16] {
    [
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
        b[14], b[15],
    ]
}

/// The lock token of a peek-locked delivery, in delivery-tag (.NET `Guid`) byte order:
/// the delivery tag when it is 16 bytes (ASB), else the `x-opt-lock-token` delivery
/// annotation (a uuid). `None`: the broker gave no lock token (e.g. a settled
/// delivery, or a broker other than ASB).
pub fn lock_token<T>(delivery: &Delivery<T>) -> Option<[u8; 16]> {
    if let Ok(tag) = <[u8; 16]>::try_from(&delivery.delivery_tag()[..]) {
        return Some(tag);
    }
    let ann = delivery.message().delivery_annotations.as_ref()?;
    match ann.0.get(&OwnedKey::from(LOCK_TOKEN_ANNOTATION))? {
        Value::Uuid(u) => Some(guid_to_uuid(u.as_inner())),
        _ => None,
    }
}

/// A renew-lock client for one queue or subscription, over the management node's two
/// links on a session of the connection that received the messages (ASB ties locks to
/// the connection's receiver link; renewing from another connection works on ASB, but
/// a link lost means its locks are lost anyway).
#[derive(Debug)]
pub struct LockRenewer {
    client: MgmtClient,
    node: String,
    associated_link: Option<String>,
    timeout: Duration,
    next_id: u64,
}

impl LockRenewer {
    /// Attach to `<entity>/$management`; `entity` is the link address of the receiver
    /// (`<topic>/Subscriptions/<subscription>` or a queue name).
    pub async fn attach(session: &mut SessionHandle<()>, entity: &str) -> Result<Self, RenewError> {
        Self::attach_with(session, entity, None, DEFAULT_TIMEOUT).await
    }

    /// [`attach`](Self::attach), naming the receiver link that holds the locks (sent as
    /// `associated-link-name`, as the .NET SDK does) and the response timeout.
    pub async fn attach_with(
        session: &mut SessionHandle<()>,
        entity: &str,
        associated_link: Option<String>,
        timeout: Duration,
    ) -> Result<Self, RenewError> {
        let node = format!("{}/$management", entity.trim_end_matches('/'));
        let client_node = format!(
            "{}-renew-{:08x}",
            entity.trim_matches('/').replace('/', "-"),
            fastrand::u32(..)
        );
        let attach = MgmtClient::builder()
            .management_node_address(node.clone())
            .client_node_addr(client_node)
            .attach(session);
        let client = match tokio::time::timeout(timeout, attach).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(RenewError::Attach {
                    node,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                return Err(RenewError::Attach {
                    node,
                    reason: format!("no attach within {timeout:?}"),
                });
            }
        };
        Ok(LockRenewer {
            client,
            node,
            associated_link,
            timeout,
            next_id: 1,
        })
    }

    /// The management node address, e.g. `events/Subscriptions/edge/$management`.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Renew the locks of `tokens` (delivery-tag form, see [`lock_token`]) in one
    /// request. Returns the new locked-until time of each, in the same order. All or
    /// nothing: on [`RenewError::LockLost`] no lock was renewed. An empty `tokens`
    /// sends nothing and returns an empty vector.
    pub async fn renew(&mut self, tokens: &[[u8; 16]]) -> Result<Vec<SystemTime>, RenewError> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let request = RenewLockRequest {
            tokens: tokens.iter().map(|t| Uuid::from(guid_to_uuid(t))).collect(),
            message_id: id,
            server_timeout_ms: u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX),
            associated_link: self.associated_link.clone(),
        };
        let timeout = self.timeout;
        let exchange = async {
            let outcome = self
                .client
                .send_request(request)
                .await
                .map_err(|e| RenewError::Link(e.to_string()))?;
            if let Err(o) = outcome.accepted_or_else(|o| o) {
                return Err(RenewError::Link(format!("request not accepted: {o:?}")));
            }
            loop {
                let r: RenewLockResponse = self
                    .client
                    .recv_response()
                    .await
                    .map_err(|e| RenewError::Link(e.to_string()))?;
                if r.correlation_id == Some(MessageId::Ulong(id)) {
                    return Ok(r);
                }
                log::debug!(
                    "renew-lock on {}: stale response {:?} discarded",
                    self.node,
                    r.correlation_id
                );
            }
        };
        let r = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| RenewError::Timeout(timeout))??;
        match r.status {
            200 => {}
            410 => return Err(RenewError::LockLost(r.description)),
            code => {
                if r.condition.as_deref() == Some(MESSAGE_LOCK_LOST) {
                    return Err(RenewError::LockLost(r.description));
                }
                return Err(RenewError::Status {
                    code,
                    condition: r.condition,
                    description: r.description,
                });
            }
        }
        let expirations = expirations(&r.body)?;
        if expirations.len() != tokens.len() {
            return Err(RenewError::Response(format!(
                "{} expirations for {} lock tokens",
                expirations.len(),
                tokens.len()
            )));
        }
        Ok(expirations)
    }

    /// Detach both links.
    pub async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// `{"expirations": [timestamp, …]}` → times.
fn expirations(body: &Body<Value>) -> Result<Vec<SystemTime>, RenewError> {
    let Body::Value(AmqpValue(Value::Map(map))) = body else {
        return Err(RenewError::Response(format!(
            "body is not a map: {}",
            crate::redact::peer_text(&format!("{body:?}"))
        )));
    };
    let list = map
        .iter()
        .find_map(|(k, v)| match k {
            Value::String(s) if s == "expirations" => Some(v),
            Value::Symbol(s) if s.0 == "expirations" => Some(v),
            _ => None,
        })
        .ok_or_else(|| RenewError::Response("no 'expirations' in the body".into()))?;
    let items: Vec<&Value> = match list {
        Value::Array(a) => a.iter().collect(),
        Value::List(l) => l.iter().collect(),
        other => {
            return Err(RenewError::Response(format!(
                "'expirations' is not an array: {}",
                crate::redact::peer_text(&format!("{other:?}"))
            )));
        }
    };
    items
        .into_iter()
        .map(|v| match v {
            Value::Timestamp(t) => {
                let ms = t.milliseconds();
                Ok(if ms >= 0 {
                    UNIX_EPOCH + Duration::from_millis(ms as u64)
                } else {
                    UNIX_EPOCH
                })
            }
            other => Err(RenewError::Response(format!(
                "an expiration is not a timestamp: {other:?}"
            ))),
        })
        .collect()
}

struct RenewLockRequest {
    /// RFC 4122 byte order.
    tokens: Vec<Uuid>,
    message_id: u64,
    server_timeout_ms: u32,
    associated_link: Option<String>,
}

impl Request for RenewLockRequest {
    const OPERATION: &'static str = RENEW_LOCK_OPERATION;
    type Response = RenewLockResponse;
    type Body = AmqpValue<Value>;

    fn encode_properties(&mut self) -> Option<Properties> {
        Some(Properties {
            message_id: Some(MessageId::Ulong(self.message_id)),
            ..Default::default()
        })
    }

    fn encode_application_properties(&mut self) -> Option<ApplicationProperties> {
        let mut b = ApplicationProperties::builder().insert(
            "com.microsoft:server-timeout",
            SimpleValue::Uint(self.server_timeout_ms),
        );
        if let Some(link) = &self.associated_link {
            b = b.insert("associated-link-name", SimpleValue::String(link.clone()));
        }
        Some(b.build())
    }

    fn encode_body(self) -> Self::Body {
        let mut map = OrderedMap::new();
        map.insert(
            Value::String("lock-tokens".into()),
            Value::Array(Array::from(
                self.tokens.into_iter().map(Value::Uuid).collect::<Vec<_>>(),
            )),
        );
        AmqpValue(Value::Map(map))
    }
}

/// Any response: the status is checked by [`LockRenewer::renew`], not by the
/// management crate (which would fail before the correlation id is seen).
#[derive(Debug)]
struct RenewLockResponse {
    status: u16,
    description: String,
    condition: Option<String>,
    correlation_id: Option<MessageId>,
    body: Body<Value>,
}

impl Response for RenewLockResponse {
    const STATUS_CODE: u16 = 200;
    type Body = Body<Value>;
    type Error = MgmtError;

    fn decode_message(message: Message<Self::Body>) -> Result<Self, Self::Error> {
        Self::from_message(message)
    }

    fn from_message(message: Message<Self::Body>) -> Result<Self, Self::Error> {
        let prop = |names: &[&str]| {
            message
                .application_properties
                .as_ref()
                .and_then(|p| names.iter().find_map(|n| p.get(*n)).cloned())
        };
        // A status that is not an HTTP-style code (a 65736 would read as 200 if cut to
        // 16 bits) is a malformed answer.
        let status = match prop(&["statusCode", "status-code"]) {
            Some(SimpleValue::Int(n)) => u16::try_from(n).ok(),
            Some(SimpleValue::Uint(n)) => u16::try_from(n).ok(),
            Some(SimpleValue::Long(n)) => u16::try_from(n).ok(),
            Some(SimpleValue::Ulong(n)) => u16::try_from(n).ok(),
            Some(SimpleValue::Short(n)) => u16::try_from(n).ok(),
            Some(SimpleValue::Ushort(n)) => Some(n),
            _ => None,
        }
        .ok_or(MgmtError::StatusCodeNotFound)?;
        let text = |v: Option<SimpleValue>| match v {
            Some(SimpleValue::String(s)) => Some(s),
            Some(SimpleValue::Symbol(s)) => Some(s.0),
            _ => None,
        };
        Ok(RenewLockResponse {
            status,
            description: text(prop(&["statusDescription", "status-description"]))
                .map(|d| crate::redact::peer_text(&d).into_owned())
                .unwrap_or_default(),
            condition: text(prop(&["errorCondition", "error-condition"]))
                .map(|c| crate::redact::peer_text(&c).into_owned()),
            correlation_id: message
                .properties
                .as_ref()
                .and_then(|p| p.correlation_id.clone()),
            body: message.body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_byte_order_matches_dotnet() {
        // Guid.Parse("00112233-4455-6677-8899-aabbccddeeff").ToByteArray()
        let tag = [
            0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        let uuid = guid_to_uuid(&tag);
        assert_eq!(
            uuid,
            [
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
        assert_eq!(guid_to_uuid(&uuid), tag);
    }
    #[test]
    fn a_status_code_outside_16_bits_is_malformed() {
        use fe2o3_amqp_types::messaging::ApplicationProperties;
        let answer = |status: SimpleValue| {
            let props = ApplicationProperties::builder()
                .insert("statusCode", status)
                .build();
            let msg = Message::builder()
                .application_properties(props)
                .body(Body::Value(AmqpValue(Value::Null)))
                .build();
            RenewLockResponse::from_message(msg).map(|r| r.status)
        };
        assert_eq!(answer(SimpleValue::Int(200)).unwrap(), 200);
        assert_eq!(answer(SimpleValue::Long(410)).unwrap(), 410);
        for bad in [
            SimpleValue::Int(65_736),
            SimpleValue::Int(-56),
            SimpleValue::Ulong(u64::MAX),
        ] {
            assert!(
                matches!(answer(bad.clone()), Err(MgmtError::StatusCodeNotFound)),
                "{bad:?}"
            );
        }
    }
}
