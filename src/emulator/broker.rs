//! The AMQP side of the emulator: connections (SASL ANONYMOUS/PLAIN), sessions, the
//! `$cbs` node, sender links to topics and queues, receiver links on subscriptions,
//! queues and dead-letter queues (peek-lock, credit respected exactly), and each
//! queue's and subscription's `$management` node (`com.microsoft:renew-lock`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SaslAcceptor,
    SessionAcceptor, SupportedReceiverSettleModes,
};
use fe2o3_amqp::types::definitions::{
    self, AmqpError, ErrorCondition, LinkError, ReceiverSettleMode, Role,
};
use fe2o3_amqp::types::messaging::message::__private::Deserializable;
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, Properties, TargetArchetype,
};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{Array, OrderedMap, SimpleValue, Symbol, Timestamp, Value};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use fe2o3_amqp::{Delivery, Receiver, Sender};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::Shared;
use super::message::StoredMessage;
use super::store::{Address, PublishError, RenewError};
use super::tap::{FlowMap, Kill, TapStream};

/// Message format of an ASB batch: each Data section is one encoded message.
const BATCH_FORMAT: u32 = 0x8001_3700;
/// Largest message a sender may send (ASB premium allows up to 100 MB; 1 MiB is plenty
/// for tests and keeps the emulator's memory bounded).
const MAX_MESSAGE_SIZE: u64 = 1024 * 1024;
/// Token types the SDKs send; both carry a SAS string.
const TOKEN_TYPES: [&str; 2] = ["jwt", "servicebus.windows.net:sastoken"];
/// The attach source filter of a session receiver.
const SESSION_FILTER: &str = "com.microsoft:session-filter";
/// Suffix of an entity's management node address.
const MANAGEMENT_SUFFIX: &str = "/$management";
const RENEW_LOCK: &str = "com.microsoft:renew-lock";
const LOCK_LOST: &str = "com.microsoft:message-lock-lost";

/// What one connection knows: its authorisation and its controls.
#[derive(Debug)]
pub struct ConnShared {
    /// Authenticated with SASL PLAIN and the key: namespace-wide access, no tokens.
    plain: AtomicBool,
    /// (scope path, expiry unix secs) of the tokens put on this connection.
    tokens: Mutex<Vec<(String, u64)>>,
    /// The latest token expiry (None: no token yet).
    expiry: watch::Sender<Option<u64>>,
    pub kill: Arc<Kill>,
    detach: watch::Sender<u64>,
    flows: Arc<FlowMap>,
    cbs_replies: Mutex<HashMap<String, mpsc::Sender<StoredMessage>>>,
    /// Reply links of `$management` nodes, by the client's reply address.
    mgmt_replies: Mutex<HashMap<String, mpsc::Sender<StoredMessage>>>,
    /// `host:port` the client connected to, for entity URIs in error descriptions.
    endpoint: String,
}

/// The reply links of the `$cbs` node or of the `$management` nodes.
#[derive(Debug, Clone, Copy)]
enum Node {
    Cbs,
    Management,
}

impl ConnShared {
    fn replies(&self, node: Node) -> &Mutex<HashMap<String, mpsc::Sender<StoredMessage>>> {
        match node {
            Node::Cbs => &self.cbs_replies,
            Node::Management => &self.mgmt_replies,
        }
    }

    fn new(endpoint: String) -> Self {
        ConnShared {
            plain: AtomicBool::new(false),
            tokens: Mutex::new(Vec::new()),
            expiry: watch::channel(None).0,
            kill: Arc::new(Kill::default()),
            detach: watch::channel(0).0,
            flows: Arc::new(FlowMap::default()),
            cbs_replies: Mutex::new(HashMap::new()),
            mgmt_replies: Mutex::new(HashMap::new()),
            endpoint,
        }
    }

    /// Is `path` (lowercase) covered by a PLAIN login or a live token?
    fn authorized(&self, path: &str) -> bool {
        if self.plain.load(Ordering::Acquire) {
            return true;
        }
        let now = crate::sas::now_unix();
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(scope, exp)| {
                *exp > now
                    && (scope.is_empty()
                        || path == scope
                        || path
                            .strip_prefix(scope.as_str())
                            .is_some_and(|r| r.starts_with('/')))
            })
    }

    fn add_token(&self, scope: String, expiry: u64) {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|(s, _)| *s != scope);
        t.push((scope, expiry));
        let latest = t.iter().map(|(_, e)| *e).max();
        self.expiry.send_replace(latest);
    }

    /// Treat every token of this connection as expired now.
    pub fn expire_tokens(&self) {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if self.plain.load(Ordering::Acquire) && t.is_empty() {
            return;
        }
        t.clear();
        self.expiry.send_replace(Some(0));
    }

    /// Detach every receiver link of this connection with an error.
    pub fn detach_links(&self) {
        self.detach.send_modify(|g| *g += 1);
    }
}

/// SASL: ANONYMOUS (then CBS) or PLAIN with the key name and key.
#[derive(Clone)]
struct Auth {
    key_name: Arc<str>,
    key: Arc<str>,
    conn: Arc<ConnShared>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("key_name", &self.key_name)
            .field("key", &"***")
            .finish()
    }
}

impl SaslAcceptor for Auth {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from("ANONYMOUS"), Symbol::from("PLAIN")])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let code = match init.mechanism.as_str() {
            "ANONYMOUS" => SaslCode::Ok,
            "PLAIN" => {
                let resp = init
                    .initial_response
                    .map(|b| b.into_vec())
                    .unwrap_or_default();
                let mut parts = resp.split(|b| *b == 0);
                let _authzid = parts.next();
                let user = parts.next().unwrap_or_default();
                let pass = parts.next().unwrap_or_default();
                if user == self.key_name.as_bytes() && pass == self.key.as_bytes() {
                    self.conn.plain.store(true, Ordering::Release);
                    SaslCode::Ok
                } else {
                    log::info!("emulator: SASL PLAIN refused (wrong key name or key)");
                    SaslCode::Auth
                }
            }
            other => {
                log::info!("emulator: SASL mechanism {other} refused");
                SaslCode::Auth
            }
        };
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Auth,
            additional_data: None,
        })
    }
}

/// `amqps://host:port/a/b`, `sb://host/a/b`, `/a/b`, `a/b` → `a/b`.
pub fn normalize_address(a: &str) -> String {
    let a = a.trim();
    let rest = match a.find("://") {
        Some(i) => {
            let after = &a[i + 3..];
            after.find('/').map(|j| &after[j + 1..]).unwrap_or("")
        }
        None => a,
    };
    rest.trim_matches('/').to_string()
}

fn error(
    condition: impl Into<ErrorCondition>,
    description: impl Into<String>,
) -> definitions::Error {
    definitions::Error::new(condition, Some(description.into()), None)
}

/// Serve one TCP connection until it closes.
pub async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let endpoint = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "localhost".into());
    let conn = Arc::new(ConnShared::new(endpoint));
    let id = shared.register_conn(conn.clone());
    let tap = TapStream::new(stream, conn.flows.clone(), conn.kill.clone());
    let acceptor = ConnectionAcceptor::builder()
        .container_id("asb-emulator")
        .max_frame_size(65_536)
        .sasl_acceptor(Auth {
            key_name: shared.key_name.clone(),
            key: shared.key.clone(),
            conn: conn.clone(),
        })
        .build();
    let opened = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tap)) => r,
        _ = conn.kill.killed() => { shared.unregister_conn(id); return; }
    };
    let mut connection = match opened {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            log::info!("emulator: connection from {peer:?} refused: {e}");
            shared.unregister_conn(id);
            return;
        }
        Err(_) => {
            log::info!("emulator: connection from {peer:?} timed out while opening");
            shared.unregister_conn(id);
            return;
        }
    };
    log::debug!("emulator: connection {id} from {peer:?} open");
    let mut expiry_rx = conn.expiry.subscribe();
    loop {
        let deadline = (*expiry_rx.borrow_and_update()).map(|exp| {
            let now = crate::sas::now_unix();
            tokio::time::Instant::now() + Duration::from_secs(exp.saturating_sub(now))
        });
        tokio::select! {
            _ = conn.kill.killed() => break,
            r = expiry_rx.changed() => { if r.is_err() { break; } }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                log::info!("emulator: connection {id}: token expired, closing");
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    connection.close_with_error(error(AmqpError::UnauthorizedAccess, "The token has expired.")),
                ).await;
                break;
            }
            s = connection.next_incoming_session() => {
                let Some(incoming) = s else { break };
                let channel = incoming.channel;
                match SessionAcceptor::new().accept_incoming_session(incoming, &mut connection).await {
                    Ok(session) => {
                        tokio::spawn(serve_session(session, channel, shared.clone(), conn.clone()));
                    }
                    Err(e) => log::info!("emulator: session refused: {e}"),
                }
            }
        }
    }
    // Dropping the handle stops the engine; a killed stream makes it stop at once.
    drop(connection);
    conn.kill.kill();
    shared.unregister_conn(id);
    log::debug!("emulator: connection {id} closed");
}

fn remote_address(attach: &Attach) -> Option<String> {
    match attach.role {
        Role::Sender => attach.target.as_ref().and_then(|t| match t.as_ref() {
            TargetArchetype::Target(t) => t.address.clone(),
            #[allow(unreachable_patterns)]
            _ => None,
        }),
        Role::Receiver => attach.source.as_ref().and_then(|s| s.address.clone()),
    }
}

async fn serve_session(
    mut session: ListenerSessionHandle,
    channel: u16,
    shared: Arc<Shared>,
    conn: Arc<ConnShared>,
) {
    // Client senders get receiver-settle-mode `first`, as ASB answers.
    let for_client_senders = LinkAcceptor::builder()
        .max_message_size(MAX_MESSAGE_SIZE)
        .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(ReceiverSettleMode::First)
        .build();
    let for_client_receivers = LinkAcceptor::builder().build();
    while let Some(attach) = session.next_incoming_attach().await {
        let role = attach.role.clone();
        let handle = attach.handle.0;
        let raw = remote_address(&attach).unwrap_or_default();
        let path = normalize_address(&raw);
        let reply_addr = match &attach.target {
            Some(t) => match t.as_ref() {
                TargetArchetype::Target(t) => t.address.clone(),
                #[allow(unreachable_patterns)]
                _ => None,
            },
            None => None,
        };
        // A client receiver asking for a session (ASB's session receivers do).
        let session_filter = role == Role::Receiver
            && attach
                .source
                .as_ref()
                .and_then(|s| s.filter.as_ref())
                .is_some_and(|f| f.keys().any(|k| k.0 == SESSION_FILTER));
        let acceptor = match role {
            Role::Sender => &for_client_senders,
            Role::Receiver => &for_client_receivers,
        };
        let link = match acceptor.accept_incoming_attach(attach, &mut session).await {
            Ok(l) => l,
            Err(e) => {
                log::info!("emulator: attach to '{path}' failed: {e}");
                continue;
            }
        };
        let lower = path.to_ascii_lowercase();
        if lower == "$cbs" {
            match link {
                LinkEndpoint::Receiver(r) => {
                    tokio::spawn(cbs_requests(r, shared.clone(), conn.clone()));
                }
                LinkEndpoint::Sender(s) => {
                    let (tx, rx) = mpsc::channel(16);
                    let key = reply_addr.unwrap_or_default();
                    conn.cbs_replies
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key.clone(), tx);
                    tokio::spawn(node_replies(s, rx, conn.clone(), key, Node::Cbs));
                }
            }
            continue;
        }
        if let Some(entity) = lower.strip_suffix(MANAGEMENT_SUFFIX) {
            let entity = entity.to_string();
            let refusal = match shared.store.resolve(&entity) {
                None => Some(not_found(&conn, &path[..entity.len()])),
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
                refuse(link, &path, err);
                continue;
            }
            match link {
                LinkEndpoint::Receiver(r) => {
                    tokio::spawn(mgmt_requests(r, entity, shared.clone(), conn.clone()));
                }
                LinkEndpoint::Sender(s) => {
                    let (tx, rx) = mpsc::channel(16);
                    let key = reply_addr.unwrap_or_default();
                    conn.mgmt_replies
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key.clone(), tx);
                    tokio::spawn(node_replies(s, rx, conn.clone(), key, Node::Management));
                }
            }
            continue;
        }
        let resolved = shared.store.resolve(&lower);
        let requires_session = shared.store.requires_session(&lower);
        let refusal = match (&resolved, &link) {
            (None, _) => Some(not_found(&conn, &path)),
            (Some(Address::Source(_)), LinkEndpoint::Receiver(_)) => Some(error(
                AmqpError::NotAllowed,
                format!("Cannot send to '{path}': send to its topic."),
            )),
            (Some(Address::Sink(_)), LinkEndpoint::Sender(_)) => Some(error(
                AmqpError::NotAllowed,
                format!("Cannot receive from the topic '{path}': use a subscription."),
            )),
            _ if !conn.authorized(&lower) => Some(error(
                AmqpError::UnauthorizedAccess,
                format!("Unauthorized access to '{path}': put a valid token with $cbs first."),
            )),
            (_, LinkEndpoint::Sender(_)) if requires_session && !session_filter => Some(error(
                AmqpError::NotAllowed,
                format!(
                    "It is not possible for an entity that requires sessions to create a non-sessionful message receiver. Entity: '{path}'."
                ),
            )),
            (_, LinkEndpoint::Sender(_)) if requires_session => Some(error(
                AmqpError::NotImplemented,
                format!(
                    "The emulator does not implement sessions (RequiresSession on '{path}'); test session receivers against Azure Service Bus."
                ),
            )),
            (_, LinkEndpoint::Sender(_)) if session_filter => Some(error(
                AmqpError::NotAllowed,
                format!(
                    "A sessionful message receiver cannot be created on an entity that does not require sessions. Ensure RequiresSession is set to true when creating a Queue or Subscription to enable sessionful behavior. Entity: '{path}'."
                ),
            )),
            _ => None,
        };
        if let Some(err) = refusal {
            refuse(link, &path, err);
            continue;
        }
        match link {
            LinkEndpoint::Receiver(r) => {
                tokio::spawn(accept_messages(r, lower, shared.clone(), conn.clone()));
            }
            LinkEndpoint::Sender(s) => {
                let tracker = conn.flows.tracker(channel, handle);
                tokio::spawn(deliver(s, lower, tracker, shared.clone(), conn.clone()));
            }
        }
    }
}

/// ASB's answer to a link on an entity that does not exist.
fn not_found(conn: &ConnShared, path: &str) -> definitions::Error {
    error(
        AmqpError::NotFound,
        format!(
            "The messaging entity 'sb://{}/{path}' could not be found. To know more visit https://aka.ms/sbResourceMgrExceptions.",
            conn.endpoint
        ),
    )
}

/// Complete the attach, then detach the link at once with `err` (as ASB refuses links).
fn refuse(link: LinkEndpoint, path: &str, err: definitions::Error) {
    log::info!(
        "emulator: link to '{path}' refused: {}",
        err.description.as_deref().unwrap_or("")
    );
    tokio::spawn(async move {
        let _ = match link {
            LinkEndpoint::Sender(s) => s.close_with_error(err).await,
            LinkEndpoint::Receiver(r) => r.close_with_error(err).await,
        };
    });
}

/// A client sender to a topic or queue: store each message, then accept it.
async fn accept_messages(
    mut receiver: Receiver,
    sink: String,
    shared: Arc<Shared>,
    conn: Arc<ConnShared>,
) {
    loop {
        let delivery: Delivery<Body<Value>> = tokio::select! {
            d = receiver.recv() => match d {
                Ok(d) => d,
                Err(e) => { log::debug!("emulator: sender link to {sink} ended: {e}"); return; }
            },
            _ = conn.kill.killed() => return,
        };
        let batch = *delivery.message_format() == Some(BATCH_FORMAT);
        let (info, msg) = delivery.into_parts();
        let mut result = Ok(());
        if batch {
            if let Body::Data(sections) = &msg.body {
                for d in sections.iter() {
                    result = match serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(
                        &d.0,
                    ) {
                        Ok(Deserializable(m)) => shared
                            .store
                            .publish(&sink, m)
                            .map_err(|e| error(AmqpError::ResourceLimitExceeded, e.to_string())),
                        Err(e) => Err(error(
                            AmqpError::DecodeError,
                            format!("A message of the batch cannot be decoded: {e}"),
                        )),
                    };
                    if result.is_err() {
                        break;
                    }
                }
            }
        } else {
            result = shared.store.publish(&sink, msg).map_err(|e| match e {
                PublishError::Full { .. } => error(AmqpError::ResourceLimitExceeded, e.to_string()),
                PublishError::NotFound(_) => error(AmqpError::NotFound, e.to_string()),
            });
        }
        let r = match result {
            Ok(()) => receiver.accept(info).await,
            Err(err) => {
                log::info!(
                    "emulator: message to {sink} refused: {}",
                    err.description.as_deref().unwrap_or("")
                );
                receiver.reject(info, err).await
            }
        };
        if r.is_err() {
            return;
        }
    }
}

/// A client receiver on a queue, subscription or dead-letter queue: peek-lock
/// deliveries, never more than the credit the client granted.
async fn deliver(
    mut sender: Sender,
    key: String,
    tracker: Arc<super::store::CreditTracker>,
    shared: Arc<Shared>,
    conn: Arc<ConnShared>,
) {
    let store = shared.store.clone();
    let Some(available) = store.notifier(&key) else {
        return;
    };
    let link_id = store.register_link(&key, tracker.clone());
    let mut detach_rx = conn.detach.subscribe();
    detach_rx.borrow_and_update();
    let forced = loop {
        // Wait for credit.
        let credit_changed = tracker.notify.notified();
        tokio::pin!(credit_changed);
        credit_changed.as_mut().enable();
        if tracker.credit() == 0 {
            tokio::select! {
                _ = credit_changed => continue,
                _ = sender.on_detach() => break false,
                _ = detach_rx.changed() => break true,
                _ = conn.kill.killed() => break false,
            }
        }
        let more = available.notified();
        tokio::pin!(more);
        more.as_mut().enable();
        let Some((lock_id, msg)) = store.lock_next(&key) else {
            tokio::select! {
                _ = more => continue,
                _ = sender.on_detach() => break false,
                _ = detach_rx.changed() => break true,
                _ = conn.kill.killed() => break false,
                // Credit may be taken back by a drain: re-check now and then.
                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), sender.send_batchable(msg)).await {
            Ok(Ok(outcome)) => {
                tracker.on_sent();
                let store = store.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    // A lost link leaves the message locked until its lock expires.
                    if let Ok(outcome) = outcome.await {
                        store.settle(&key, lock_id, &outcome);
                    }
                });
            }
            Ok(Err(e)) => {
                store.unlock_undelivered(&key, lock_id);
                log::debug!("emulator: receiver link on {key} ended: {e}");
                break false;
            }
            Err(_) => {
                // The client's credit was not there after all (e.g. drained).
                store.unlock_undelivered(&key, lock_id);
            }
        }
    };
    store.unregister_link(link_id);
    if forced {
        log::info!("emulator: detaching receiver link on {key} (fault injection)");
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            sender.close_with_error(error(
                LinkError::DetachForced,
                "The link was detached by the emulator (fault injection).",
            )),
        )
        .await;
    }
}

/// Requests to the `$cbs` node: put-token.
async fn cbs_requests(mut receiver: Receiver, shared: Arc<Shared>, conn: Arc<ConnShared>) {
    loop {
        let delivery: Delivery<Body<Value>> = tokio::select! {
            d = receiver.recv() => match d { Ok(d) => d, Err(_) => return },
            _ = conn.kill.killed() => return,
        };
        let (info, msg) = delivery.into_parts();
        if receiver.accept(info).await.is_err() {
            return;
        }
        let (code, description) = put_token(&msg, &shared, &conn);
        let message_id = msg.properties.as_ref().and_then(|p| p.message_id.clone());
        let reply_to = msg
            .properties
            .as_ref()
            .and_then(|p| p.reply_to.clone())
            .unwrap_or_default();
        let reply = Message::builder()
            .properties(Properties {
                correlation_id: message_id,
                ..Default::default()
            })
            .application_properties(
                ApplicationProperties::builder()
                    .insert("status-code", SimpleValue::Int(code))
                    .insert("status-description", SimpleValue::String(description))
                    .build(),
            )
            .body(Body::Value(AmqpValue(Value::Null)))
            .build();
        send_reply(&conn, Node::Cbs, &reply_to, reply).await;
    }
}

/// Hand a response to the reply link attached with the request's reply-to address (for
/// `$cbs`, any reply link when there is no such address, as before).
async fn send_reply(conn: &ConnShared, node: Node, reply_to: &str, reply: StoredMessage) {
    let tx = {
        let replies = conn.replies(node).lock().unwrap_or_else(|e| e.into_inner());
        replies
            .get(reply_to)
            .or_else(|| match node {
                Node::Cbs => replies.values().next(),
                Node::Management => None,
            })
            .cloned()
    };
    match tx {
        Some(tx) => {
            let _ = tx.send(reply).await;
        }
        None => log::info!("emulator: {node:?} request without a reply link to '{reply_to}'"),
    }
}

/// Requests to `<entity>/$management`: `com.microsoft:renew-lock`. Other operations get
/// status 501 (the emulator does not implement them; never a silent success).
async fn mgmt_requests(
    mut receiver: Receiver,
    entity: String,
    shared: Arc<Shared>,
    conn: Arc<ConnShared>,
) {
    loop {
        let delivery: Delivery<Body<Value>> = tokio::select! {
            d = receiver.recv() => match d { Ok(d) => d, Err(_) => return },
            _ = conn.kill.killed() => return,
        };
        let (info, msg) = delivery.into_parts();
        if receiver.accept(info).await.is_err() {
            return;
        }
        let (code, description, condition, body) = management(&msg, &entity, &shared);
        let message_id = msg.properties.as_ref().and_then(|p| p.message_id.clone());
        let reply_to = msg
            .properties
            .as_ref()
            .and_then(|p| p.reply_to.clone())
            .unwrap_or_default();
        let mut props = ApplicationProperties::builder()
            .insert("statusCode", SimpleValue::Int(code))
            .insert("statusDescription", SimpleValue::String(description));
        if let Some(c) = condition {
            props = props.insert("errorCondition", SimpleValue::Symbol(Symbol::from(c)));
        }
        let reply = Message::builder()
            .properties(Properties {
                correlation_id: message_id,
                ..Default::default()
            })
            .application_properties(props.build())
            .body(Body::Value(AmqpValue(body)))
            .build();
        send_reply(&conn, Node::Management, &reply_to, reply).await;
    }
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

/// A `$cbs` or `$management` reply link: send the responses put in `rx`.
async fn node_replies(
    mut sender: Sender,
    mut rx: mpsc::Receiver<StoredMessage>,
    conn: Arc<ConnShared>,
    key: String,
    node: Node,
) {
    cbs_reply_loop(&mut sender, &mut rx).await;
    conn.replies(node)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key);
    let _ = tokio::time::timeout(Duration::from_secs(2), sender.close()).await;
}

async fn cbs_reply_loop(sender: &mut Sender, rx: &mut mpsc::Receiver<StoredMessage>) {
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { break };
                match tokio::time::timeout(Duration::from_secs(10), sender.send_batchable(m)).await {
                    Ok(Ok(outcome)) => { tokio::spawn(outcome); }
                    _ => break,
                }
            }
            _ = sender.on_detach() => return,
        }
    }
}
