//! The emulator's message store: per entity (queue, subscription, dead-letter queue) the
//! active messages in sequence order and the locked ones, with ASB's peek-lock rules.
//! A [`Store`] is an `Arc`: pass it to a new emulator to "restart the broker" without
//! losing messages (locked ones stay locked until their lock expires, as on ASB).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fe2o3_amqp::types::messaging::{
    ApplicationProperties, DeliveryAnnotations, Header, MessageAnnotations, Outcome,
};
use fe2o3_amqp::types::primitives::{SimpleValue, Timestamp, Uuid, Value};
use tokio::sync::Notify;

use super::entities::{Entities, EntityConfig};
use super::filter::{Rule, any_matches};
use super::message::StoredMessage;

/// Default [`Store::with_capacity`]: messages per entity.
pub const DEFAULT_ENTITY_CAPACITY: usize = 100_000;

/// Why a message was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("the messaging entity '{0}' could not be found")]
    NotFound(String),
    #[error("QuotaExceeded: the entity '{entity}' holds its maximum of {capacity} messages")]
    Full { entity: String, capacity: usize },
}

pub const DLQ_SUFFIX: &str = "/$DeadLetterQueue";
const DEAD_LETTER_CONDITION: &str = "com.microsoft:dead-letter";

/// Counts for one entity, as served by `GET /stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntityStats {
    /// Waiting to be delivered.
    pub active: u64,
    /// Delivered and locked, not settled yet.
    pub locked: u64,
    /// Settled with accept (completed).
    pub completed: u64,
    /// Moved to this entity's dead-letter queue (for a `$DeadLetterQueue` entity: 0).
    pub dead_lettered: u64,
    /// Transfers sent to receivers (redeliveries included).
    pub delivered: u64,
    /// High-water mark of `locked`.
    pub max_locked: u64,
    /// Link credit currently granted by the receivers attached to this entity.
    pub credit: u64,
    /// Locks renewed with `com.microsoft:renew-lock` (one per lock token).
    #[serde(default)]
    pub renewed: u64,
}

/// Why a `com.microsoft:renew-lock` request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewError {
    /// ASB's 410 `com.microsoft:message-lock-lost`: a token is unknown, its lock has
    /// expired or its message was settled (or a fault was injected).
    #[error(
        "The lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue, or was received by a different receiver instance."
    )]
    LockLost,
    #[error("The messaging entity '{0}' could not be found.")]
    NotFound(String),
}

/// Renewal faults of one entity: how many requests still fail (`u32::MAX`: all).
const RENEW_FAIL_ALWAYS: u32 = u32::MAX;

/// One message in a dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    pub sequence_number: i64,
    pub message_id: Option<String>,
    pub reason: Option<String>,
    pub description: Option<String>,
    pub delivery_count: u32,
}

#[derive(Debug, Clone)]
struct Stored {
    seq: i64,
    msg: StoredMessage,
    /// Failed deliveries so far (the AMQP header delivery-count).
    delivery_count: u32,
}

#[derive(Debug)]
struct Locked {
    stored: Stored,
    until: Instant,
}

#[derive(Debug)]
struct Entity {
    path: String,
    lock_duration: Duration,
    max_delivery_count: u32,
    /// Lowercase key of the dead-letter queue (None for a dead-letter queue).
    dlq: Option<String>,
    active: BTreeMap<i64, Stored>,
    locked: HashMap<u64, Locked>,
    completed: u64,
    dead_lettered: u64,
    delivered: u64,
    max_locked: u64,
    renewed: u64,
    /// Receivers must ask for a session (ASB's RequiresSession).
    requires_session: bool,
    /// Subscription rules (empty: every message).
    rules: Vec<Rule>,
    /// Renew-lock requests that will fail (fault injection).
    renew_faults: u32,
    notify: Arc<Notify>,
}

impl Entity {
    fn new(path: String, cfg: Option<&EntityConfig>, dlq: Option<String>) -> Self {
        Entity {
            path,
            lock_duration: cfg
                .map(|c| c.lock_duration)
                .unwrap_or(super::entities::DEFAULT_LOCK_DURATION),
            max_delivery_count: cfg.map(|c| c.max_delivery_count).unwrap_or(u32::MAX),
            dlq,
            active: BTreeMap::new(),
            locked: HashMap::new(),
            completed: 0,
            dead_lettered: 0,
            delivered: 0,
            max_locked: 0,
            renewed: 0,
            requires_session: cfg.is_some_and(|c| c.requires_session),
            rules: cfg.map(|c| c.rules.clone()).unwrap_or_default(),
            renew_faults: 0,
            notify: Arc::new(Notify::new()),
        }
    }
}

/// Where a sender may publish: a topic (fan-out) or a queue.
#[derive(Debug)]
struct Sink {
    next_seq: i64,
    targets: Vec<String>,
}

#[derive(Debug, Default)]
struct State {
    entities: HashMap<String, Entity>,
    sinks: HashMap<String, Sink>,
    next_lock: u64,
    /// Credit trackers of attached receiver links, by link id: (entity key, tracker).
    links: HashMap<u64, (String, Arc<CreditTracker>)>,
    next_link: u64,
    /// Most messages one entity holds (active + locked); senders are refused beyond.
    capacity: usize,
    /// First half of every lock token of this store (the second half is the lock id),
    /// so tokens from another emulator are not mistaken for ours.
    token_prefix: [u8; 8],
}

/// What a link address names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A topic or queue: senders publish here.
    Sink(String),
    /// A queue, subscription or dead-letter queue: receivers take from here.
    Source(String),
    /// Both (a queue).
    Queue(String),
}

/// The message store, shared by every connection of one (or successive) emulators.
#[derive(Clone)]
pub struct Store {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = lock(&self.state);
        f.debug_struct("Store")
            .field("entities", &st.entities.len())
            .field("capacity", &st.capacity)
            .finish_non_exhaustive()
    }
}

/// The link credit a receiver granted, mirrored from its flow frames (see `tap`).
#[derive(Debug, Default)]
pub struct CreditTracker {
    /// delivery-count_rcv + link-credit_rcv, as last sent by the receiver.
    limit: AtomicU32,
    /// Transfers sent (our delivery-count).
    sent: AtomicU32,
    pub(crate) notify: Notify,
}

impl CreditTracker {
    pub fn credit(&self) -> u32 {
        let d = self
            .limit
            .load(Ordering::Acquire)
            .wrapping_sub(self.sent.load(Ordering::Acquire));
        if d > i32::MAX as u32 { 0 } else { d }
    }

    /// A flow frame from the receiver.
    pub fn on_flow(&self, delivery_count: Option<u32>, link_credit: Option<u32>, drain: bool) {
        if let Some(credit) = link_credit {
            // Before the receiver knows our delivery-count it assumes the initial one (0).
            let limit = delivery_count.unwrap_or(0).wrapping_add(credit);
            self.limit.store(limit, Ordering::Release);
        }
        if drain {
            // fe2o3's sender answers a drain by consuming all credit at once.
            self.sent
                .store(self.limit.load(Ordering::Acquire), Ordering::Release);
        }
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    pub fn on_sent(&self) {
        self.sent.fetch_add(1, Ordering::AcqRel);
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves consistent-enough counters for an emulator.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn annotate(msg: &mut StoredMessage, key: &str, value: Value) {
    let ann = msg
        .message_annotations
        .get_or_insert_with(|| MessageAnnotations::builder().build());
    ann.0.insert(key.into(), value);
}

impl Store {
    /// A store holding at most [`DEFAULT_ENTITY_CAPACITY`] messages per entity.
    pub fn new(entities: &Entities) -> Self {
        Self::with_capacity(entities, DEFAULT_ENTITY_CAPACITY)
    }

    /// A store holding at most `capacity` messages (active + locked) per entity; a send
    /// that would exceed it is refused (`amqp:resource-limit-exceeded`, ASB's
    /// QuotaExceeded), so the emulator's memory is bounded.
    pub fn with_capacity(entities: &Entities, capacity: usize) -> Self {
        let mut st = State {
            capacity,
            token_prefix: fastrand::u64(..).to_be_bytes(),
            ..State::default()
        };
        let add = |st: &mut State, path: String, cfg: &EntityConfig| {
            let key = path.to_ascii_lowercase();
            let dlq_path = format!("{path}{DLQ_SUFFIX}");
            let dlq_key = dlq_path.to_ascii_lowercase();
            st.entities
                .insert(dlq_key.clone(), Entity::new(dlq_path, Some(cfg), None));
            if let Some(d) = st.entities.get_mut(&dlq_key) {
                // Messages in a dead-letter queue are not dead-lettered again; it takes
                // plain receivers and has no rules.
                d.max_delivery_count = u32::MAX;
                d.requires_session = false;
                d.rules.clear();
            }
            st.entities
                .insert(key.clone(), Entity::new(path, Some(cfg), Some(dlq_key)));
            key
        };
        for q in &entities.queues {
            let key = add(&mut st, q.name.clone(), q);
            st.sinks.insert(
                key.clone(),
                Sink {
                    next_seq: 1,
                    targets: vec![key],
                },
            );
        }
        for t in &entities.topics {
            let mut targets = Vec::new();
            for s in &t.subscriptions {
                targets.push(add(
                    &mut st,
                    format!("{}/Subscriptions/{}", t.name, s.name),
                    s,
                ));
            }
            st.sinks.insert(
                t.name.to_ascii_lowercase(),
                Sink {
                    next_seq: 1,
                    targets,
                },
            );
        }
        Store {
            state: Arc::new(Mutex::new(st)),
        }
    }

    /// Resolve a (normalised) link address, case-insensitively.
    pub fn resolve(&self, path: &str) -> Option<Address> {
        let key = path.to_ascii_lowercase();
        let st = lock(&self.state);
        match (st.sinks.contains_key(&key), st.entities.contains_key(&key)) {
            (true, true) => Some(Address::Queue(key)),
            (true, false) => Some(Address::Sink(key)),
            (false, true) => Some(Address::Source(key)),
            (false, false) => None,
        }
    }

    /// The display path of an entity key.
    pub fn display_path(&self, key: &str) -> String {
        lock(&self.state)
            .entities
            .get(key)
            .map(|e| e.path.clone())
            .unwrap_or_else(|| key.to_string())
    }

    /// Store a message sent to a topic (one copy per subscription) or a queue, stamped
    /// with `x-opt-sequence-number` and `x-opt-enqueued-time`.
    pub fn publish(&self, sink: &str, msg: StoredMessage) -> Result<(), PublishError> {
        self.publish_tampered(sink, msg, |_| {})
    }

    /// Test hook: [`Store::publish`], then let `tamper` change the stamped message before
    /// it is stored, e.g. to give the `x-opt-*` annotations the wrong types, as a
    /// misbehaving broker would.
    #[doc(hidden)]
    pub fn publish_tampered(
        &self,
        sink: &str,
        mut msg: StoredMessage,
        tamper: impl FnOnce(&mut StoredMessage),
    ) -> Result<(), PublishError> {
        let mut st = lock(&self.state);
        let cap = st.capacity;
        let Some(s) = st.sinks.get(sink) else {
            return Err(PublishError::NotFound(sink.to_string()));
        };
        let seq = s.next_seq;
        annotate(&mut msg, "x-opt-sequence-number", Value::Long(seq));
        annotate(
            &mut msg,
            "x-opt-enqueued-time",
            Value::Timestamp(Timestamp::from_milliseconds(now_ms())),
        );
        tamper(&mut msg);
        // Subscriptions whose rules take the message (a queue has none: all).
        let targets: Vec<String> = s
            .targets
            .iter()
            .filter(|t| {
                st.entities
                    .get(*t)
                    .is_some_and(|e| e.rules.is_empty() || any_matches(&e.rules, &msg))
            })
            .cloned()
            .collect();
        for t in &targets {
            if let Some(e) = st.entities.get(t)
                && e.active.len() + e.locked.len() >= cap
            {
                return Err(PublishError::Full {
                    entity: e.path.clone(),
                    capacity: cap,
                });
            }
        }
        if let Some(s) = st.sinks.get_mut(sink) {
            s.next_seq += 1;
        }
        for t in targets {
            if let Some(e) = st.entities.get_mut(&t) {
                e.active.insert(
                    seq,
                    Stored {
                        seq,
                        msg: msg.clone(),
                        delivery_count: 0,
                    },
                );
                e.notify.notify_waiters();
                e.notify.notify_one();
            }
        }
        Ok(())
    }

    /// The notifier of an entity: fires when messages become active.
    pub fn notifier(&self, key: &str) -> Option<Arc<Notify>> {
        lock(&self.state)
            .entities
            .get(key)
            .map(|e| e.notify.clone())
    }

    /// Take the next active message of `key` under a peek-lock. Returns the lock id and
    /// the message to transfer (header delivery-count and `x-opt-locked-until` set).
    pub fn lock_next(&self, key: &str) -> Option<(u64, StoredMessage)> {
        let mut st = lock(&self.state);
        st.next_lock += 1;
        let lock_id = st.next_lock;
        let token = lock_token(st.token_prefix, lock_id);
        let e = st.entities.get_mut(key)?;
        let (_, stored) = e.active.pop_first()?;
        let until = Instant::now() + e.lock_duration;
        let until_ms = now_ms() + e.lock_duration.as_millis() as i64;
        let mut msg = stored.msg.clone();
        let header = msg.header.get_or_insert_with(Header::default);
        header.delivery_count = stored.delivery_count;
        header.first_acquirer = stored.delivery_count == 0;
        annotate(
            &mut msg,
            "x-opt-locked-until",
            Value::Timestamp(Timestamp::from_milliseconds(until_ms)),
        );
        // fe2o3's sender numbers its delivery tags itself (4 bytes), so the lock token
        // cannot be the tag as on ASB; it travels as the delivery annotation the SDKs
        // read when the tag is not a token (`x-opt-lock-token`, a uuid).
        msg.delivery_annotations
            .get_or_insert_with(|| DeliveryAnnotations(Default::default()))
            .0
            .insert("x-opt-lock-token".into(), Value::Uuid(Uuid::from(token)));
        e.locked.insert(lock_id, Locked { stored, until });
        e.delivered += 1;
        e.max_locked = e.max_locked.max(e.locked.len() as u64);
        Some((lock_id, msg))
    }

    /// A receiver settled a locked message. Settlements of locks that have expired (or
    /// were never taken) are ignored, as ASB refuses them.
    pub fn settle(&self, key: &str, lock_id: u64, outcome: &Outcome) {
        let mut st = lock(&self.state);
        let Some(e) = st.entities.get_mut(key) else {
            return;
        };
        let Some(locked) = e.locked.remove(&lock_id) else {
            log::debug!(
                "emulator: settlement of an expired lock on {} ignored",
                e.path
            );
            return;
        };
        let mut stored = locked.stored;
        match outcome {
            Outcome::Accepted(_) => e.completed += 1,
            Outcome::Rejected(r) => {
                let (reason, description) = match &r.error {
                    Some(err) => {
                        let cond = condition_str(&err.condition);
                        let info = |k: &str| {
                            err.info.as_ref().and_then(|i| {
                                i.iter().find_map(|(key, v)| match v {
                                    Value::String(s) if key.0 == k => Some(s.clone()),
                                    _ => None,
                                })
                            })
                        };
                        if cond == DEAD_LETTER_CONDITION {
                            (
                                info("DeadLetterReason"),
                                info("DeadLetterErrorDescription").or(err.description.clone()),
                            )
                        } else {
                            (Some(cond), err.description.clone())
                        }
                    }
                    None => (None, None),
                };
                dead_letter(&mut st, key, stored, reason, description);
            }
            Outcome::Released(_) => {
                stored.delivery_count += 1;
                requeue(&mut st, key, stored);
            }
            Outcome::Modified(m) => {
                if m.delivery_failed == Some(true) {
                    stored.delivery_count += 1;
                }
                if let Some(ann) = &m.message_annotations {
                    for (k, v) in ann.iter() {
                        annotate(&mut stored.msg, &k.0, v.clone());
                    }
                }
                requeue(&mut st, key, stored);
            }
            #[allow(unreachable_patterns)]
            _ => requeue(&mut st, key, stored),
        }
    }

    /// A locked message whose transfer could not be sent: back to active, unchanged.
    pub fn unlock_undelivered(&self, key: &str, lock_id: u64) {
        let mut st = lock(&self.state);
        let Some(e) = st.entities.get_mut(key) else {
            return;
        };
        if let Some(l) = e.locked.remove(&lock_id) {
            e.delivered = e.delivered.saturating_sub(1);
            e.active.insert(l.stored.seq, l.stored);
            e.notify.notify_waiters();
            e.notify.notify_one();
        }
    }

    /// Return messages whose lock has expired to their entity (delivery-count + 1), or
    /// dead-letter them once the count reaches MaxDeliveryCount. Returns the next expiry.
    pub fn expire_locks(&self, now: Instant) -> Option<Instant> {
        let mut st = lock(&self.state);
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        for (key, e) in st.entities.iter_mut() {
            let ids: Vec<u64> = e
                .locked
                .iter()
                .filter(|(_, l)| l.until <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if let Some(l) = e.locked.remove(&id) {
                    expired.push((key.clone(), l.stored));
                }
            }
            for l in e.locked.values() {
                next = Some(next.map_or(l.until, |n| n.min(l.until)));
            }
        }
        for (key, mut stored) in expired {
            stored.delivery_count += 1;
            requeue(&mut st, &key, stored);
        }
        next
    }

    /// Register a receiver link's credit tracker (for `credit` in the stats).
    pub fn register_link(&self, key: &str, tracker: Arc<CreditTracker>) -> u64 {
        let mut st = lock(&self.state);
        st.next_link += 1;
        let id = st.next_link;
        st.links.insert(id, (key.to_string(), tracker));
        id
    }

    /// Are other receiver links than `id` attached to the entity `key` (competing
    /// receivers)?
    pub fn has_competitors(&self, key: &str, id: u64) -> bool {
        lock(&self.state)
            .links
            .iter()
            .any(|(other, (k, _))| *other != id && k == key)
    }

    pub fn unregister_link(&self, id: u64) {
        lock(&self.state).links.remove(&id);
    }

    pub fn stats(&self) -> BTreeMap<String, EntityStats> {
        let st = lock(&self.state);
        let mut out = BTreeMap::new();
        for (key, e) in &st.entities {
            let credit = st
                .links
                .values()
                .filter(|(k, _)| k == key)
                .map(|(_, t)| u64::from(t.credit()))
                .sum();
            out.insert(
                e.path.clone(),
                EntityStats {
                    active: e.active.len() as u64,
                    locked: e.locked.len() as u64,
                    completed: e.completed,
                    dead_lettered: e.dead_lettered,
                    delivered: e.delivered,
                    max_locked: e.max_locked,
                    credit,
                    renewed: e.renewed,
                },
            );
        }
        out
    }

    /// Does the entity `key` require sessions (RequiresSession)?
    pub fn requires_session(&self, key: &str) -> bool {
        lock(&self.state)
            .entities
            .get(key)
            .is_some_and(|e| e.requires_session)
    }

    /// `com.microsoft:renew-lock` on `key`: extend each lock by the entity's
    /// LockDuration from now. All or nothing, as on ASB: one unknown or expired token
    /// (or an injected fault) fails the whole request with [`RenewError::LockLost`] and
    /// renews none. Returns the new locked-until times (ms since the Unix epoch) in
    /// the order of `tokens`. A renewed message is not redelivered when its first lock
    /// would have expired, and its delivery count does not change.
    ///
    /// `tokens` are lock tokens as AMQP uuids carry them (RFC 4122 byte order).
    pub fn renew_locks(&self, key: &str, tokens: &[[u8; 16]]) -> Result<Vec<i64>, RenewError> {
        let mut st = lock(&self.state);
        let prefix = st.token_prefix;
        let Some(e) = st.entities.get_mut(key) else {
            return Err(RenewError::NotFound(key.to_string()));
        };
        if e.renew_faults > 0 {
            if e.renew_faults != RENEW_FAIL_ALWAYS {
                e.renew_faults -= 1;
            }
            log::info!(
                "emulator: renew-lock on {} refused (fault injection)",
                e.path
            );
            return Err(RenewError::LockLost);
        }
        let now = Instant::now();
        let mut ids = Vec::with_capacity(tokens.len());
        for t in tokens {
            let id = lock_id_of(prefix, t).ok_or(RenewError::LockLost)?;
            match e.locked.get(&id) {
                Some(l) if l.until > now => ids.push(id),
                _ => return Err(RenewError::LockLost),
            }
        }
        let until = now + e.lock_duration;
        let until_ms = now_ms() + e.lock_duration.as_millis() as i64;
        for id in ids {
            if let Some(l) = e.locked.get_mut(&id) {
                l.until = until;
            }
            e.renewed += 1;
        }
        Ok(vec![until_ms; tokens.len()])
    }

    /// Fault injection: the next `count` renew-lock requests on `key` fail with
    /// message-lock-lost (`None`: every one until cleared with `Some(0)`). Returns false
    /// when there is no such entity.
    pub fn fail_renewals(&self, key: &str, count: Option<u32>) -> bool {
        let mut st = lock(&self.state);
        let Some(e) = st.entities.get_mut(key) else {
            return false;
        };
        e.renew_faults = count.map_or(RENEW_FAIL_ALWAYS, |n| n.min(RENEW_FAIL_ALWAYS - 1));
        true
    }

    /// The messages in the dead-letter queue of `entity` (a queue or subscription path,
    /// with or without the `/$DeadLetterQueue` suffix), in sequence order.
    pub fn dead_letters(&self, entity: &str) -> Vec<DeadLetter> {
        let mut key = entity.trim_matches('/').to_ascii_lowercase();
        if !key.ends_with(&DLQ_SUFFIX.to_ascii_lowercase()) {
            key.push_str(&DLQ_SUFFIX.to_ascii_lowercase());
        }
        let st = lock(&self.state);
        let Some(e) = st.entities.get(&key) else {
            return Vec::new();
        };
        let mut all: Vec<&Stored> = e
            .active
            .values()
            .chain(e.locked.values().map(|l| &l.stored))
            .collect();
        all.sort_by_key(|s| s.seq);
        all.into_iter()
            .map(|s| {
                let prop = |k: &str| {
                    s.msg.application_properties.as_ref().and_then(|p| {
                        p.get(k).and_then(|v| match v {
                            SimpleValue::String(s) => Some(s.clone()),
                            _ => None,
                        })
                    })
                };
                DeadLetter {
                    sequence_number: s.seq,
                    message_id: s
                        .msg
                        .properties
                        .as_ref()
                        .and_then(|p| p.message_id.as_ref())
                        // As the gateway shows it (and the filters match it), not a
                        // rendering of the emulator's own.
                        .map(crate::source::decode::message_id_string),
                    reason: prop("DeadLetterReason"),
                    description: prop("DeadLetterErrorDescription"),
                    delivery_count: s.delivery_count,
                }
            })
            .collect()
    }
}

/// The lock token of lock `id` (RFC 4122 byte order, as in an AMQP uuid).
fn lock_token(prefix: [u8; 8], id: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&prefix);
    t[8..].copy_from_slice(&id.to_be_bytes());
    t
}

fn lock_id_of(prefix: [u8; 8], token: &[u8; 16]) -> Option<u64> {
    if token[..8] != prefix {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&token[8..]);
    Some(u64::from_be_bytes(id))
}

/// The symbol of an error condition, e.g. `com.microsoft:dead-letter`.
pub fn condition_str(c: &fe2o3_amqp::types::definitions::ErrorCondition) -> String {
    match serde_amqp::to_value(c) {
        Ok(Value::Symbol(s)) => s.0,
        _ => format!("{c:?}"),
    }
}

/// Back to active, or to the dead-letter queue when MaxDeliveryCount is reached.
fn requeue(st: &mut State, key: &str, stored: Stored) {
    let Some(e) = st.entities.get_mut(key) else {
        return;
    };
    if stored.delivery_count >= e.max_delivery_count {
        let desc = format!(
            "Message could not be consumed after {} delivery attempts.",
            e.max_delivery_count
        );
        dead_letter(
            st,
            key,
            stored,
            Some("MaxDeliveryCountExceeded".into()),
            Some(desc),
        );
        return;
    }
    e.active.insert(stored.seq, stored);
    e.notify.notify_waiters();
    e.notify.notify_one();
}

fn dead_letter(
    st: &mut State,
    key: &str,
    mut stored: Stored,
    reason: Option<String>,
    description: Option<String>,
) {
    let Some(e) = st.entities.get_mut(key) else {
        return;
    };
    let Some(dlq) = e.dlq.clone() else {
        // Already in a dead-letter queue: back to active (ASB never dead-letters twice).
        e.active.insert(stored.seq, stored);
        e.notify.notify_one();
        return;
    };
    e.dead_lettered += 1;
    log::debug!(
        "emulator: message {} of {} dead-lettered ({})",
        stored.seq,
        e.path,
        reason.as_deref().unwrap_or("no reason")
    );
    let props = stored
        .msg
        .application_properties
        .get_or_insert_with(|| ApplicationProperties::builder().build());
    if let Some(r) = reason {
        props
            .0
            .insert("DeadLetterReason".into(), SimpleValue::String(r));
    }
    if let Some(d) = description {
        props
            .0
            .insert("DeadLetterErrorDescription".into(), SimpleValue::String(d));
    }
    if let Some(d) = st.entities.get_mut(&dlq) {
        d.active.insert(stored.seq, stored);
        d.notify.notify_waiters();
        d.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp::types::definitions::{self, AmqpError};
    use fe2o3_amqp::types::messaging::{AmqpValue, Body, Message, MessageId, Properties, Rejected};
    use fe2o3_amqp::types::primitives::Binary;

    use super::*;

    #[test]
    fn dead_letters_show_message_ids_as_the_gateway_does() {
        let entities = Entities {
            namespace: "ns".into(),
            queues: vec![EntityConfig::new("q", Duration::from_secs(60), 10)],
            topics: Vec::new(),
        };
        let store = Store::new(&entities);
        let uuid = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        let ids = [
            MessageId::String("m-1".into()),
            MessageId::Ulong(42),
            MessageId::Uuid(Uuid::from(uuid)),
            MessageId::Binary(Binary::from(vec![0xde, 0xad])),
        ];
        for id in &ids {
            let msg = Message::builder()
                .properties(Properties {
                    message_id: Some(id.clone()),
                    ..Default::default()
                })
                .body(Body::Value(AmqpValue(Value::Null)))
                .build();
            store.publish("q", msg).unwrap();
            let (lock_id, _) = store.lock_next("q").unwrap();
            let rejected = Rejected {
                error: Some(definitions::Error::new(AmqpError::NotAllowed, None, None)),
            };
            store.settle("q", lock_id, &Outcome::Rejected(rejected));
        }
        let shown: Vec<Option<String>> = store
            .dead_letters("q")
            .into_iter()
            .map(|d| d.message_id)
            .collect();
        let gateway: Vec<Option<String>> = ids
            .iter()
            .map(|id| Some(crate::source::decode::message_id_string(id)))
            .collect();
        assert_eq!(shown, gateway);
        assert_eq!(
            shown[2].as_deref(),
            Some("12345678-9abc-def0-0123-456789abcdef")
        );
    }
}
