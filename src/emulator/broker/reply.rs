//! The reply links of the request/response nodes (`$cbs`, `$management`): a client
//! attaches a receiver at its reply address; responses are sent there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::types::messaging::{AmqpValue, ApplicationProperties, Body, Message, Properties};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Delivery, Receiver, Sender};
use tokio::sync::mpsc;

use super::ConnShared;
use crate::emulator::message::StoredMessage;

/// The reply links of the `$cbs` node or of the `$management` nodes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Node {
    Cbs,
    Management,
}

/// The reply links of `node` on `conn`, by the client's reply address: the slot's id
/// and the channel its link sends from.
fn replies(conn: &ConnShared, node: Node) -> &Mutex<ReplyMap> {
    match node {
        Node::Cbs => &conn.cbs_replies,
        Node::Management => &conn.mgmt_replies,
    }
}

/// Reply links by the client's reply address (see [`ReplySlot`]).
pub(super) type ReplyMap = HashMap<String, (u64, mpsc::Sender<StoredMessage>)>;

/// Ids of reply slots, so a slot only ever unregisters itself.
static SLOT_IDS: AtomicU64 = AtomicU64::new(0);

/// The reply address of a client receiver on `$cbs` or `<entity>/$management`,
/// registered before its attach is answered: a client sends its first request as soon
/// as its attach completes, and that request must find the address (without this, a
/// response could be dropped and the client wait for it forever). Responses handed to
/// [`send`] wait in the slot until [`ReplySlot::serve`] sends them. Dropped, the slot
/// unregisters its address unless a newer link took it.
pub(super) struct ReplySlot {
    conn: Arc<ConnShared>,
    node: Node,
    key: String,
    id: u64,
    rx: Option<mpsc::Receiver<StoredMessage>>,
}

impl ReplySlot {
    /// Register `reply_addr` (empty when the client named none) for `node` on `conn`.
    pub(super) fn reserve(conn: &Arc<ConnShared>, node: Node, reply_addr: Option<String>) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let key = reply_addr.unwrap_or_default();
        let id = SLOT_IDS.fetch_add(1, Ordering::Relaxed);
        replies(conn, node)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), (id, tx));
        ReplySlot {
            conn: conn.clone(),
            node,
            key,
            id,
            rx: Some(rx),
        }
    }

    /// Send the responses to the client's receiver over `sender` until it detaches.
    pub(super) fn serve(mut self, mut sender: Sender) {
        let Some(mut rx) = self.rx.take() else { return };
        tokio::spawn(async move {
            cbs_reply_loop(&mut sender, &mut rx).await;
            drop(self);
            let _ = tokio::time::timeout(Duration::from_secs(2), sender.close()).await;
        });
    }
}

impl Drop for ReplySlot {
    fn drop(&mut self) {
        let mut map = replies(&self.conn, self.node)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if map.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.key);
        }
    }
}

/// Hand a response to the reply link attached with the request's reply-to address (for
/// `$cbs`, any reply link when there is no such address, as before).
pub(super) async fn send(conn: &ConnShared, node: Node, reply_to: &str, reply: StoredMessage) {
    let tx = {
        let replies = replies(conn, node)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        replies
            .get(reply_to)
            .or_else(|| match node {
                Node::Cbs => replies.values().next(),
                Node::Management => None,
            })
            .map(|(_, tx)| tx.clone())
    };
    match tx {
        Some(tx) => {
            let _ = tx.send(reply).await;
        }
        None => log::info!("emulator: {node:?} request without a reply link to '{reply_to}'"),
    }
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

/// Serve the requests the client sends on `receiver` to `node` until the link or the
/// connection goes: accept each request, let `answer` make the response (application
/// properties and body value), and send it to the request's `reply-to` with the
/// request's message-id as its correlation-id (the AMQP request/response pattern ASB's
/// `$cbs` and `$management` nodes follow).
pub(super) async fn serve_requests(
    mut receiver: Receiver,
    conn: Arc<ConnShared>,
    node: Node,
    mut answer: impl FnMut(&StoredMessage) -> (ApplicationProperties, Value),
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
        let (props, body) = answer(&msg);
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
            .application_properties(props)
            .body(Body::Value(AmqpValue(body)))
            .build();
        send(&conn, node, &reply_to, reply).await;
    }
}
