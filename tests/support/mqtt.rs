//! A real MQTT 5 subscriber (rumqttc) for tests, and a counting one for benches.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{mpsc, watch};

/// One message as a subscriber saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    pub user: Vec<(String, String)>,
    pub content_type: Option<String>,
}

impl Received {
    pub fn user(&self, key: &str) -> Option<&str> {
        self.user
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A real MQTT 5 subscriber (rumqttc) on a filter; reconnects by itself.
pub struct Subscriber {
    pub rx: mpsc::Receiver<Received>,
    /// SUBACKs received so far (one per (re)subscription).
    pub subscribed: watch::Receiver<u32>,
    pub connects: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

static SUB_ID: AtomicU32 = AtomicU32::new(0);

impl Subscriber {
    /// `persistent`: keep the session (subscription and queued QoS 1 messages) at the
    /// broker while disconnected.
    pub async fn start(port: u16, filter: &str, persistent: bool) -> Subscriber {
        let id = format!(
            "test-sub-{}-{}",
            std::process::id(),
            SUB_ID.fetch_add(1, Ordering::Relaxed)
        );
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_start(!persistent);
        if persistent {
            opts.set_session_expiry_interval(Some(600));
        }
        let (client, mut el) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::channel(100_000);
        let (sub_tx, subscribed) = watch::channel(0u32);
        let connects = Arc::new(AtomicU32::new(0));
        let conns = connects.clone();
        let filter = filter.to_string();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        conns.fetch_add(1, Ordering::Relaxed);
                        if !ack.session_present {
                            let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                        } else {
                            sub_tx.send_modify(|n| *n += 1);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => sub_tx.send_modify(|n| *n += 1),
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let (user, content_type) = match p.properties {
                            Some(pp) => (pp.user_properties, pp.content_type),
                            None => (Vec::new(), None),
                        };
                        let r = Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload,
                            retain: p.retain,
                            user,
                            content_type,
                        };
                        if tx.send(r).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        let mut s = Subscriber {
            rx,
            subscribed,
            connects,
            task,
        };
        s.wait_subscribed(1).await;
        s
    }

    /// Wait until `n` subscriptions (or session resumptions) have been acknowledged.
    pub async fn wait_subscribed(&mut self, n: u32) {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.subscribed.wait_for(|c| *c >= n),
        )
        .await
        .expect("subscriber did not subscribe in time")
        .unwrap();
    }

    /// The next message, or None after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Received> {
        tokio::time::timeout(wait, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next message on a topic other than `skip`.
    pub async fn next_except(&mut self, skip: &str, wait: Duration) -> Option<Received> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let r = self.next(left).await?;
            if r.topic != skip {
                return Some(r);
            }
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts the messages on a filter (status topics `…/status` not counted): for benches,
/// where a [`Subscriber`]'s per-message channel would cost more than the mirror.
pub async fn counter(port: u16, filter: &str) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new(
        format!("bench-sub-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 64);
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let filter = filter.to_string();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if !p.topic.ends_with(b"/status") {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    ready_rx.await.unwrap();
    (count, task)
}
