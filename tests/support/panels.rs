//! Shared helpers for the panel tests: a context with a known epoch, events, a running
//! panel server on a free loopback port, and WebSocket clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use asb_gateway::app::Context;
use asb_gateway::config::{Config, LoadEnv};
use asb_gateway::event::{ContentType, EncodedEvent, EventMeta, IdString, Topic};
use asb_gateway::panels::{self, Options};
use asb_gateway::shutdown::{self, Trigger};
use futures_util::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const EPOCH: &str = "0123456789ab";
pub const T: Duration = Duration::from_secs(10);

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A config with `extra` TOML appended (sections other than `[source]`).
pub fn config(extra: &str) -> Config {
    let text = format!(
        "[source]\nconnection_string = \"Endpoint=sb://127.0.0.1/;SharedAccessKeyName=k;SharedAccessKey=v\"\n\
         [[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n{extra}"
    );
    Config::parse(&text, &LoadEnv::default()).expect("test config")
}

pub fn ctx(extra: &str) -> Arc<Context> {
    Context::with_epoch(config(extra), EPOCH.to_string())
}

pub fn event(seq: u64, topic: &str, body: &str) -> EncodedEvent {
    let mut meta = EventMeta {
        subject: Some(IdString::try_from(topic.rsplit('/').next().unwrap_or("x")).unwrap()),
        message_id: Some(IdString::try_from(format!("m-{seq}").as_str()).unwrap()),
        content_type: Some(ContentType::try_from("application/json").unwrap()),
        enqueued_at_ms: Some(1_795_000_000_000 + seq as i64),
        asb_seq: Some(1000 + seq as i64),
        ..Default::default()
    };
    meta.push_prop("line", topic.split('/').next().unwrap_or(""));
    EncodedEvent::encode(
        seq,
        &Topic::try_from(topic).unwrap(),
        &meta,
        body.as_bytes(),
    )
}

/// Append one event on `topic`; returns its seq.
pub fn append(ctx: &Context, topic: &str, body: &str) -> u64 {
    let seq = ctx.journal.next_seq();
    ctx.journal
        .append(event(seq, topic, body), false)
        .expect("append")
}

pub struct Running {
    pub addr: SocketAddr,
    pub trigger: Trigger,
    pub task: JoinHandle<Result<(), panels::PanelsError>>,
}

impl Running {
    pub async fn stop(self) {
        self.trigger.fire();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

pub async fn start(ctx: Arc<Context>, opts: Options) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, sd) = shutdown::channel();
    let task = tokio::spawn(panels::serve_with(
        listener,
        ctx.journal.clone(),
        ctx.metrics.clone(),
        ctx.panel_settings(),
        sd,
        opts,
    ));
    Running {
        addr,
        trigger,
        task,
    }
}

/// Connect to `/v1/stream?{query}` with optional subprotocol and extra headers.
pub async fn try_connect(
    addr: SocketAddr,
    query: &str,
    protocol: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}/v1/stream?{query}")
        .into_client_request()
        .unwrap();
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    for (k, v) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName = k.parse().unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    let (ws, resp) = tokio::time::timeout(T, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect timed out")?;
    if let Some(p) = protocol {
        assert_eq!(
            resp.headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok()),
            Some(p.split(',').next().unwrap().trim()),
            "the chosen subprotocol is echoed"
        );
    }
    Ok(ws)
}

pub async fn connect(addr: SocketAddr, query: &str) -> Client {
    try_connect(addr, query, None, &[]).await.expect("connect")
}

/// The next data message (pings and pongs skipped), or panics after `T`.
pub async fn next_msg(ws: &mut Client) -> Message {
    loop {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("stream ended")
            .expect("websocket error");
        match m {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

/// The next JSON frame.
pub async fn next_json(ws: &mut Client) -> serde_json::Value {
    match next_msg(ws).await {
        Message::Text(t) => serde_json::from_str(t.as_str()).expect("frame is JSON"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Send a JSON op.
pub async fn send_op(ws: &mut Client, op: serde_json::Value) {
    use futures_util::SinkExt;
    ws.send(Message::text(op.to_string())).await.unwrap();
}

/// Send `{"op":"ping"}` and wait for the pong, returning the frames that came before it.
/// The server handles ops in order, so this is a barrier after subscribe/unsubscribe.
pub async fn barrier(ws: &mut Client) -> Vec<serde_json::Value> {
    send_op(ws, serde_json::json!({"op": "ping"})).await;
    let mut before = Vec::new();
    loop {
        let f = next_json(ws).await;
        if f["type"] == "pong" {
            return before;
        }
        before.push(f);
    }
}

/// Poll `cond` every 10 ms until it holds; panics after `T`.
pub async fn wait_until(mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(t0.elapsed() < T, "condition not reached within {T:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Lowercase hex (a token's SHA-256 for `panels.tokens`).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The HTTP status of a refused upgrade.
pub fn status_of(r: Result<Client, tokio_tungstenite::tungstenite::Error>) -> u16 {
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got a WebSocket"),
    }
}
