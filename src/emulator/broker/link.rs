//! Links on a session: each attach is routed by its address — to the `$cbs` node, to a
//! `$management` node, or to an entity, refused as ASB refuses it (unknown entity,
//! wrong direction, no token, sessions) — then served: a client sender's transfers are
//! stored and settled, a client receiver gets peek-locked deliveries within its credit.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SupportedReceiverSettleModes,
};
use fe2o3_amqp::types::definitions::{AmqpError, LinkError, ReceiverSettleMode, Role};
use fe2o3_amqp::types::messaging::message::__private::Deserializable;
use fe2o3_amqp::types::messaging::{Body, Message, TargetArchetype};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Delivery, Receiver, Sender};

use super::reply::{Node, ReplySlot};
use super::{ConnShared, cbs, error, management, normalize_address, not_found, refuse};
use crate::emulator::Shared;
use crate::emulator::store::{Address, CreditTracker, PublishError};

/// Message format of an ASB batch: each Data section is one encoded message.
const BATCH_FORMAT: u32 = 0x8001_3700;
/// Largest message a sender may send (ASB premium allows up to 100 MB; 1 MiB is plenty
/// for tests and keeps the emulator's memory bounded).
const MAX_MESSAGE_SIZE: u64 = 1024 * 1024;
/// The attach source filter of a session receiver.
const SESSION_FILTER: &str = "com.microsoft:session-filter";

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

pub(super) async fn serve_session(
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
        let lower = path.to_ascii_lowercase();
        // A client receiver on a request/response node: its reply address is registered
        // before the attach is answered (a dropped slot unregisters it again).
        let reply_node = if lower == cbs::ADDRESS {
            Some(Node::Cbs)
        } else {
            management::entity_of(&lower).map(|_| Node::Management)
        };
        let slot = match reply_node {
            Some(node) if role == Role::Receiver => {
                Some(ReplySlot::reserve(&conn, node, reply_addr))
            }
            _ => None,
        };
        let link = match acceptor.accept_incoming_attach(attach, &mut session).await {
            Ok(l) => l,
            Err(e) => {
                log::info!("emulator: attach to '{path}' failed: {e}");
                continue;
            }
        };
        if lower == cbs::ADDRESS {
            cbs::attach(link, slot, &shared, &conn);
            continue;
        }
        if let Some(entity) = management::entity_of(&lower) {
            management::attach(link, &path, entity, slot, &shared, &conn);
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
    tracker: Arc<CreditTracker>,
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
                // Competing receivers share an entity's messages, as on ASB: let another
                // link's task take the next one rather than this one taking them all.
                if store.has_competitors(&key, link_id) {
                    tokio::task::yield_now().await;
                }
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
