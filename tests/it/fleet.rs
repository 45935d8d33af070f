//! A fleet of boxes with Service Bus as the engine (issue 17, README "Several boxes",
//! `docs/fleet.md`): two real `asb-gateway run` processes against one emulator, real
//! AMQP, real WebSocket panels.
//! - Partition by subscription: one subscription per box, each with a rule selecting its
//!   lines (a Correlation filter and an SQL filter on the `line` application property);
//!   each box's panel gets exactly its lines, and together they got every event once.
//! - Hot spare: two subscriptions of the whole topic; a client following the failover
//!   algorithm of `docs/fleet.md` is on box A, A is killed (SIGKILL), the client moves to
//!   box B resuming with `since`, gets `gap` reason `epoch` and B's history, then live.
//! - Competing consumers: both boxes on one subscription; every message completed exactly
//!   once across them, and their panels together saw every event once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use asb_gateway::emulator::client::Publisher;
use asb_gateway::emulator::{EmulatorHandle, EmulatorOptions, Entities, EntityStats};
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::support;
use crate::support::daemon::Daemon;

/// Bound on every wait for a condition.
const WAIT: Duration = Duration::from_secs(20);
const TOPIC: &str = "operational-events";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The emulator with topic `operational-events` and these subscriptions (Config.json
/// entries, the format of Microsoft's emulator).
async fn emulator(subscriptions: &[String]) -> EmulatorHandle {
    let json = format!(
        r#"{{"UserConfig":{{"Namespaces":[{{"Name":"sbemulatorns","Topics":[{{"Name":"{TOPIC}","Subscriptions":[{}]}}]}}]}}}}"#,
        subscriptions.join(",")
    );
    let entities = Entities::from_json(&json).unwrap_or_else(|e| panic!("{e}\n{json}"));
    support::emulator::start(EmulatorOptions {
        entities,
        ..Default::default()
    })
    .await
}

/// A subscription of the whole topic (`$Default`).
fn whole(name: &str) -> String {
    format!(r#"{{"Name":"{name}"}}"#)
}

/// A subscription whose one rule is a Correlation filter on application properties.
fn correlation(name: &str, properties: &str) -> String {
    format!(
        r#"{{"Name":"{name}","Rules":[{{"Name":"lines","Properties":{{"FilterType":"Correlation","CorrelationFilter":{{"Properties":{properties}}}}}}}]}}"#
    )
}

/// A subscription whose one rule is an SQL filter.
fn sql(name: &str, expression: &str) -> String {
    format!(
        r#"{{"Name":"{name}","Rules":[{{"Name":"lines","Properties":{{"FilterType":"Sql","SqlFilter":{{"SqlExpression":"{expression}"}}}}}}]}}"#
    )
}

fn entity(subscription: &str) -> String {
    format!("{TOPIC}/Subscriptions/{subscription}")
}

/// One box: the gateway on `subscription`, topics `{line}/{subject}`, panels on a free
/// port, no snapshot (every start is a new epoch).
fn start_box(em: &EmulatorHandle, subscription: &str) -> Daemon {
    let config = format!(
        "[source]\nconnection_string = {:?}\n[[source.subscriptions]]\ntopic = \"{TOPIC}\"\nsubscription = \"{subscription}\"\n\
         [routing]\ntopic = \"{{prop:line}}/{{subject}}\"\n[panels]\nlisten = \"127.0.0.1:0\"\n",
        em.connection_string()
    );
    Daemon::with_config(&config)
        .env_remove("STATE_DIRECTORY")
        .start()
}

/// Publish one message per `(line, i)`: subject `temp`, application property `line`,
/// body `{"i":i}`.
async fn publish(em: &EmulatorHandle, items: impl IntoIterator<Item = (&str, u64)>) {
    let mut p = Publisher::connect(&em.connection_string(), TOPIC)
        .await
        .unwrap();
    for (line, i) in items {
        p.send_json(
            "temp",
            &[("line", line)],
            format!("{{\"i\":{i}}}"),
            "application/json",
        )
        .await
        .unwrap();
    }
    p.close().await.unwrap();
}

/// `(line, i)` for `i` in `range`, the line cycling through line1, line2, line3.
fn mix(range: std::ops::Range<u64>) -> Vec<(&'static str, u64)> {
    const LINES: [&str; 3] = ["line1", "line2", "line3"];
    range.map(|i| (LINES[(i % 3) as usize], i)).collect()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stats(em: &EmulatorHandle, subscription: &str) -> EntityStats {
    em.stats()
        .get(&entity(subscription))
        .cloned()
        .unwrap_or_else(|| panic!("no entity {}", entity(subscription)))
}

/// Connect a plain panel to a box; returns the socket and its `hello`.
async fn panel(addr: SocketAddr, query: &str) -> (Ws, Value) {
    let url = format!("ws://{addr}/v1/stream?{query}");
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .unwrap_or_else(|_| panic!("a panel connects to {addr} within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let hello = next_json(&mut ws, "hello").await;
    assert_eq!(hello["type"], "hello", "{hello}");
    (ws, hello)
}

/// The next text frame as JSON; panics on timeout, close or error.
async fn next_json(ws: &mut Ws, what: &str) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).unwrap(),
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("waiting for {what}: the stream ended: {other:?}"),
            Err(_) => panic!("waiting for {what}: nothing within {WAIT:?}"),
        }
    }
}

/// The next `n` event frames (any other frame fails the test).
async fn events(ws: &mut Ws, n: usize, what: &str) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let f = next_json(ws, &format!("{what}: event {} of {n}", out.len() + 1)).await;
        assert_eq!(f["type"], "event", "{what}: only events expected, got {f}");
        out.push(f);
    }
    out
}

fn body_i(f: &Value) -> u64 {
    f["body"]["i"]
        .as_u64()
        .unwrap_or_else(|| panic!("body.i in {f}"))
}

fn line_of(f: &Value) -> &str {
    f["props"]["line"]
        .as_str()
        .unwrap_or_else(|| panic!("props.line in {f}"))
}

// ------------------------------------------------------------------------ partition

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_boxes_each_receive_exactly_their_lines() {
    let em = emulator(&[
        correlation("box-line1", r#"{"line":"line1"}"#),
        sql("box-line23", "line IN ('line2', 'line3')"),
    ])
    .await;
    let a = start_box(&em, "box-line1");
    let b = start_box(&em, "box-line23");
    let (mut pa, _) = panel(a.panels(), "").await;
    let (mut pb, _) = panel(b.panels(), "").await;

    publish(&em, mix(0..60)).await;
    let got_a = events(&mut pa, 20, "box line1").await;
    let got_b = events(&mut pb, 40, "box line2+3").await;
    for f in &got_a {
        assert_eq!(line_of(f), "line1", "box line1 got {f}");
        assert!(f["topic"].as_str().unwrap().starts_with("line1/"), "{f}");
    }
    for f in &got_b {
        assert!(
            ["line2", "line3"].contains(&line_of(f)),
            "box line2+3 got {f}"
        );
    }
    // Each subscription was given exactly its share, and each box completed all of it.
    wait_for("each box completed its share", || {
        let (sa, sb) = (stats(&em, "box-line1"), stats(&em, "box-line23"));
        sa.completed == 20
            && sb.completed == 40
            && sa.active + sa.locked + sb.active + sb.locked == 0
    })
    .await;
    for sub in ["box-line1", "box-line23"] {
        assert_eq!(stats(&em, sub).dead_lettered, 0, "{sub}");
        assert!(em.dead_letters(&entity(sub)).is_empty(), "{sub}");
    }
    // Nothing else is in either journal: a new panel's hello says how many events it has.
    assert_eq!(panel(a.panels(), "").await.1["latest"], 20);
    assert_eq!(panel(b.panels(), "").await.1["latest"], 40);
    // Together: every event exactly once.
    let mut all: Vec<u64> = got_a.iter().chain(&got_b).map(body_i).collect();
    all.sort_unstable();
    assert_eq!(all, (0..60).collect::<Vec<_>>());
    em.shutdown().await;
}

// ------------------------------------------------------------------------ hot spare

/// What a [`FailoverClient`] observed.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// Connected to gateway `index` of the list.
    Connected(usize),
    Hello {
        epoch: String,
        oldest: u64,
        latest: u64,
    },
    Gap {
        from: u64,
        to: u64,
        reason: String,
    },
    Event {
        seq: u64,
        i: u64,
    },
}

/// A panel client following the failover algorithm of `docs/fleet.md`: a list of
/// gateways; on a lost connection (or one that cannot be opened) try the next one in
/// the list, wrapping around, with backoff (0.5 s doubling, at most 4 s here, reset by a
/// `hello`); every connection resumes with `since=EPOCH:SEQ` of the last event seen; a
/// `hello` in another epoch means the sequence numbers restarted (the box answers with
/// a `gap` reason `epoch` and replays its own history).
struct FailoverClient {
    gateways: Vec<SocketAddr>,
    current: usize,
    ws: Option<Ws>,
    epoch: Option<String>,
    last_seq: Option<u64>,
    backoff: Duration,
    seen: Vec<Seen>,
}

impl FailoverClient {
    fn new(gateways: Vec<SocketAddr>) -> Self {
        FailoverClient {
            gateways,
            current: 0,
            ws: None,
            epoch: None,
            last_seq: None,
            backoff: Duration::from_millis(500),
            seen: Vec::new(),
        }
    }

    fn url(&self) -> String {
        let mut url = format!("ws://{}/v1/stream", self.gateways[self.current]);
        if let (Some(e), Some(s)) = (&self.epoch, self.last_seq) {
            url += &format!("?since={e}:{s}");
        }
        url
    }

    /// Open a connection to the current gateway, moving on through the list while
    /// connects fail; panics when none succeeds before `deadline`.
    async fn open(&mut self, deadline: Instant) {
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(self.url()),
            )
            .await;
            if let Ok(Ok((ws, _))) = attempt {
                self.ws = Some(ws);
                self.seen.push(Seen::Connected(self.current));
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no gateway of {:?} accepted a connection; seen: {:?}",
                self.gateways,
                self.seen
            );
            self.fail_over().await;
        }
    }

    /// The next gateway in the list, after the backoff.
    async fn fail_over(&mut self) {
        self.ws = None;
        self.current = (self.current + 1) % self.gateways.len();
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(4));
    }

    /// Read until `n` more events arrived (connecting and failing over as needed);
    /// panics if that takes longer than [`WAIT`].
    async fn events(&mut self, n: usize) {
        let deadline = Instant::now() + WAIT;
        let mut got = 0;
        while got < n {
            if let Seen::Event { .. } = self.next(deadline, &format!("{n} events")).await {
                got += 1;
            }
        }
    }

    /// Connect and read up to the `hello`.
    async fn connect(&mut self) {
        let deadline = Instant::now() + WAIT;
        while !matches!(self.next(deadline, "hello").await, Seen::Hello { .. }) {}
    }

    /// The next thing seen: a frame, or a connection made (after failing over when the
    /// connection is lost).
    async fn next(&mut self, deadline: Instant, what: &str) -> Seen {
        loop {
            if self.ws.is_none() {
                self.open(deadline).await;
                return self.seen.last().unwrap().clone();
            }
            let ws = self.ws.as_mut().unwrap();
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match tokio::time::timeout(left, ws.next()).await {
                Err(_) => panic!("{what}: not within {WAIT:?}; seen: {:?}", self.seen),
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => {
                    // The box went away: the next one.
                    self.fail_over().await;
                    continue;
                }
                Ok(Some(Ok(_))) => continue,
            };
            let f: Value = serde_json::from_str(&msg).unwrap();
            let seen = match f["type"].as_str() {
                Some("hello") => {
                    self.backoff = Duration::from_millis(500);
                    let epoch = f["epoch"].as_str().unwrap().to_string();
                    if self.epoch.as_ref() != Some(&epoch) {
                        // Sequence numbers restarted: what we had means nothing here.
                        self.epoch = Some(epoch.clone());
                        self.last_seq = None;
                    }
                    Seen::Hello {
                        epoch,
                        oldest: f["oldest"].as_u64().unwrap(),
                        latest: f["latest"].as_u64().unwrap(),
                    }
                }
                Some("gap") => Seen::Gap {
                    from: f["from"].as_u64().unwrap(),
                    to: f["to"].as_u64().unwrap(),
                    reason: f["reason"].as_str().unwrap().to_string(),
                },
                Some("event") => {
                    let seq = f["seq"].as_u64().unwrap();
                    self.last_seq = Some(seq);
                    Seen::Event { seq, i: body_i(&f) }
                }
                _ => panic!("unexpected frame {f}"),
            };
            self.seen.push(seen.clone());
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panel_fails_over_to_the_hot_spare_and_keeps_receiving() {
    let em = emulator(&[whole("box-a"), whole("box-b")]).await;
    let mut a = start_box(&em, "box-a");
    let b = start_box(&em, "box-b");
    let mut client = FailoverClient::new(vec![a.panels(), b.panels()]);

    // On box A: events 0..10, seq 1..=10 of A's epoch.
    client.connect().await;
    publish(&em, mix(0..10)).await;
    client.events(10).await;
    let Some(Seen::Hello { epoch: epoch_a, .. }) = client.seen.get(1).cloned() else {
        panic!("hello from box A first: {:?}", client.seen)
    };
    assert_eq!(client.seen[0], Seen::Connected(0));
    let on_a: Vec<Seen> = (0..10).map(|i| Seen::Event { seq: i + 1, i }).collect();
    assert_eq!(client.seen[2..], on_a[..]);
    // The spare has them too (its own subscription of the whole topic).
    wait_for("box B completed the first 10", || {
        stats(&em, "box-b").completed == 10
    })
    .await;

    a.kill(); // kill -9: no close frame, the socket just dies
    let mark = client.seen.len();
    publish(&em, mix(10..15)).await;
    // 10 events of B's history (the same messages A had), then 5 new ones.
    client.events(15).await;
    let after = &client.seen[mark..];
    assert_eq!(
        after[0],
        Seen::Connected(1),
        "failed over to box B: {after:?}"
    );
    let Seen::Hello {
        epoch: epoch_b,
        oldest,
        ..
    } = &after[1]
    else {
        panic!("hello from box B: {after:?}")
    };
    assert_ne!(epoch_b, &epoch_a, "two boxes, two epochs");
    assert_eq!(*oldest, 1);
    // B does not know A's epoch: it says so, and replays its history from its oldest.
    assert_eq!(
        after[2],
        Seen::Gap {
            from: 1,
            to: 0,
            reason: "epoch".into()
        },
        "{after:?}"
    );
    let on_b: Vec<Seen> = (0..15).map(|i| Seen::Event { seq: i + 1, i }).collect();
    assert_eq!(after[3..], on_b[..], "B's history, then live");
    // It stays on B and keeps receiving.
    publish(&em, mix(15..20)).await;
    let mark = client.seen.len();
    client.events(5).await;
    let live: Vec<Seen> = (15..20).map(|i| Seen::Event { seq: i + 1, i }).collect();
    assert_eq!(client.seen[mark..], live[..]);
    em.shutdown().await;
}

// ---------------------------------------------------------------- competing consumers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_boxes_complete_every_message_exactly_once() {
    const SUB: &str = "shared";
    let em = emulator(&[whole(SUB)]).await;
    let a = start_box(&em, SUB);
    let b = start_box(&em, SUB);
    let (mut pa, _) = panel(a.panels(), "").await;
    let (mut pb, _) = panel(b.panels(), "").await;
    for d in [&a, &b] {
        let deadline = Instant::now() + WAIT;
        while support::http::get(d.panels(), "/healthz").await.0 != 200 {
            assert!(Instant::now() < deadline, "box {} not healthy", d.panels());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Publish in rounds until both boxes have taken part (two receivers with credit on
    // one subscription share its messages; a box that never got one would show the
    // emulator handing everything to one link).
    let mut n = 0u64;
    let mut journals = (0, 0);
    while journals.0 == 0 || journals.1 == 0 {
        assert!(n < 300, "one box got nothing of {n} messages: {journals:?}");
        publish(&em, mix(n..n + 20)).await;
        n += 20;
        wait_for("the round completed", || stats(&em, SUB).completed == n).await;
        journals = (
            panel(a.panels(), "").await.1["latest"].as_u64().unwrap(),
            panel(b.panels(), "").await.1["latest"].as_u64().unwrap(),
        );
    }
    let s = stats(&em, SUB);
    assert_eq!(
        (
            s.completed,
            s.delivered,
            s.dead_lettered,
            s.active,
            s.locked
        ),
        (n, n, 0, 0, 0),
        "each message delivered once and completed once: {s:?}"
    );
    assert!(em.dead_letters(&entity(SUB)).is_empty());
    // Each box's journal holds its part; the panels together saw every event once.
    assert_eq!(journals.0 + journals.1, n, "{journals:?}");
    let got_a = events(&mut pa, journals.0 as usize, "box A's part").await;
    let got_b = events(&mut pb, journals.1 as usize, "box B's part").await;
    let mut all: BTreeMap<u64, usize> = BTreeMap::new();
    for f in got_a.iter().chain(&got_b) {
        *all.entry(body_i(f)).or_default() += 1;
    }
    assert!(all.values().all(|&c| c == 1), "an event on both boxes");
    assert_eq!(
        all.keys().copied().collect::<Vec<_>>(),
        (0..n).collect::<Vec<_>>()
    );
    eprintln!("{n} messages: box A {}, box B {}", journals.0, journals.1);
    em.shutdown().await;
}
