//! `systemctl reload` (SIGHUP) on the real daemon, under a stand-in `NOTIFY_SOCKET`,
//! with the emulator and real WebSocket panels:
//! - tokens rotated with 100 panels connected: only the panels whose token is gone or no
//!   longer allows their filters are closed with 1008 and the reason; the others keep
//!   receiving; new connections follow the new tokens; `RELOADING=1` … `READY=1`; one
//!   line says what was applied and what needs a restart; no token in the log.
//! - a config that fails validation on reload is refused with the error, and everything
//!   stays as it was.
//! - `panels.max_panels` lowered closes nobody and admits no one until fewer than the new
//!   limit remain; raised, it admits up to the new limit.
//! - `panels.allowed_origins` narrowed closes the panel whose origin is gone with 1008
//!   `origin no longer allowed`; the others keep receiving.
//! - `panels.slow_policy` changed from `skip` to `disconnect` applies to a panel connected
//!   before the reload: when it falls behind it is closed, not given a gap.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use asb_gateway::emulator::EmulatorHandle;
use asb_gateway::emulator::client::Publisher;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::daemon::Daemon;
use crate::support::panels::hex;
use crate::support::{self, TempDir, http};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const T: Duration = Duration::from_secs(20);

fn token(name: &str, secret: &str, allow: &str) -> String {
    format!(
        "[[panels.tokens]]\nname = {name:?}\nsha256 = \"{}\"\nallow = [{allow:?}]\n",
        hex(&Sha256::digest(secret.as_bytes()))
    )
}

fn config(em: &EmulatorHandle, panels_extra: &str, tail: &str) -> String {
    format!(
        "[source]\nconnection_string = {:?}\n[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n[panels]\nlisten = \"127.0.0.1:0\"\n{panels_extra}{tail}",
        em.connection_string()
    )
}

async fn panel(d: &Daemon, query: &str) -> Ws {
    let url = format!("ws://{}/v1/stream?{query}", d.panels());
    let (mut ws, _) = tokio::time::timeout(T, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect within 20 s")
        .expect("upgrade");
    let hello = next_text(&mut ws).await.expect("hello");
    assert!(hello.contains("\"hello\""), "{hello}");
    ws
}

/// The next text frame, `None` on close or error.
async fn next_text(ws: &mut Ws) -> Option<String> {
    loop {
        match tokio::time::timeout(T, ws.next())
            .await
            .expect("a frame within 20 s")
        {
            Some(Ok(Message::Text(t))) => return Some(t.to_string()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Frames until the close frame: its code and reason.
async fn close_of(ws: &mut Ws) -> (CloseCode, String) {
    loop {
        match tokio::time::timeout(T, ws.next())
            .await
            .expect("a frame within 20 s")
        {
            Some(Ok(Message::Close(Some(f)))) => return (f.code, f.reason.to_string()),
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                panic!("closed without a close frame")
            }
            Some(Ok(_)) => continue,
        }
    }
}

/// Frames until an event with `subject`; panics on close.
async fn event_with(ws: &mut Ws, subject: &str) {
    loop {
        let Some(t) = next_text(ws).await else {
            panic!("closed before the event {subject}")
        };
        if t.contains(&format!("\"subject\":\"{subject}\"")) {
            return;
        }
    }
}

async fn publish(em: &EmulatorHandle, subjects: &[&str]) {
    let mut p = Publisher::connect(&em.connection_string(), "operational-events")
        .await
        .unwrap();
    for s in subjects {
        p.send_json(s, &[], "{\"v\":1}".to_string(), "application/json")
            .await
            .unwrap();
    }
    p.close().await.unwrap();
}

/// SIGHUP, then the datagrams until `READY=1` follows `RELOADING=1`.
fn reload(d: &Daemon, sock: &UnixDatagram) -> Vec<String> {
    let st = std::process::Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    loop {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let reloading = got.iter().position(|m| m.contains("RELOADING=1"));
        if let Some(i) = reloading
            && got[i + 1..].iter().any(|m| m.contains("READY=1"))
        {
            return got;
        }
        assert!(t0.elapsed() < T, "no RELOADING=1 then READY=1: {got:?}");
    }
}

fn notify_socket(dir: &TempDir) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    (UnixDatagram::bind(&path).unwrap(), path)
}

fn wait_log(d: &Daemon, needle: &str) -> String {
    let t0 = Instant::now();
    loop {
        if let Some(l) = d.log().into_iter().find(|l| l.contains(needle)) {
            return l;
        }
        assert!(
            t0.elapsed() < T,
            "no log line with {needle:?}:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(cfg: &Path, notify: &Path) -> Daemon {
    // The config's log.level decides (RUST_LOG would override it).
    Daemon::with_config_file(cfg)
        .env_remove("RUST_LOG")
        .env("NOTIFY_SOCKET", notify)
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rotate_with_100_panels_connected_and_only_the_affected_are_closed() {
    let em = support::emulator::start_default().await;
    let dir = TempDir::new("reload-tokens");
    let (sock, sock_path) = notify_socket(&dir);
    let cfg = dir.join("config.toml");
    let before = format!(
        "max_panels = 200\n{}{}{}",
        token("press", "secret-press-1", "line1/#"),
        token("all", "secret-all-1", "#"),
        token("line2", "secret-line2-1", "line2/#"),
    );
    std::fs::write(&cfg, config(&em, &before, "")).unwrap();
    let d = start(&cfg, &sock_path);
    let mut press = Vec::new();
    let mut all = Vec::new();
    let mut line2 = Vec::new();
    for _ in 0..40 {
        press.push(panel(&d, "token=secret-press-1&filter=line1/%23").await);
    }
    for _ in 0..30 {
        all.push(panel(&d, "token=secret-all-1").await);
    }
    for _ in 0..30 {
        line2.push(panel(&d, "token=secret-line2-1&filter=line2/%23").await);
    }

    // "press" is gone, "all" is narrowed to line2/# (its panels read "#"), "line2" is
    // unchanged, "new" is added; the log level, the panel limit and the journal size
    // change too (the last needs a restart).
    let after = format!(
        "max_panels = 150\n{}{}{}",
        token("all", "secret-all-1", "line2/#"),
        token("line2", "secret-line2-1", "line2/#"),
        token("new", "secret-new-1", "#"),
    );
    std::fs::write(
        &cfg,
        config(
            &em,
            &after,
            "[log]\nlevel = \"debug\"\n[journal]\nevents = 2048\n",
        ),
    )
    .unwrap();
    let got = reload(&d, &sock);
    assert!(
        got.iter()
            .any(|m| m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC=")),
        "{got:?}"
    );
    for ws in &mut press {
        assert_eq!(
            close_of(ws).await,
            (CloseCode::Policy, "token revoked".to_string())
        );
    }
    for ws in &mut all {
        assert_eq!(
            close_of(ws).await,
            (
                CloseCode::Policy,
                "token no longer allows its filters".to_string()
            )
        );
    }
    // The unaffected panels are still connected and get what comes next.
    publish(&em, &["line2/press/temp"]).await;
    for ws in &mut line2 {
        event_with(ws, "line2/press/temp").await;
    }
    // New connections follow the new tokens.
    let url = |q: &str| format!("ws://{}/v1/stream?{q}", d.panels());
    let refused = tokio_tungstenite::connect_async(url("token=secret-press-1")).await;
    assert!(
        format!("{refused:?}").contains("401"),
        "the revoked token is refused: {refused:?}"
    );
    let mut fresh = panel(&d, "token=secret-new-1").await;
    publish(&em, &["line3/oven/state"]).await;
    event_with(&mut fresh, "line3/oven/state").await;

    let line = wait_log(&d, "reload: ");
    assert!(
        line.contains("applied panels.tokens, panels.max_panels, log.level"),
        "{line}"
    );
    assert!(
        line.contains("changed but kept until a restart: journal"),
        "{line}"
    );
    // log.level = debug is in force: a debug line appears after the reload.
    wait_log(&d, "DEBUG");
    let log = d.log_text();
    for secret in [
        "secret-press-1",
        "secret-all-1",
        "secret-line2-1",
        "secret-new-1",
    ] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
    em.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_fails_on_reload_is_refused_and_nothing_changes() {
    let em = support::emulator::start_default().await;
    let dir = TempDir::new("reload-bad");
    let (sock, sock_path) = notify_socket(&dir);
    let cfg = dir.join("config.toml");
    let tokens = token("press", "secret-press-1", "#");
    std::fs::write(&cfg, config(&em, &tokens, "")).unwrap();
    let d = start(&cfg, &sock_path);
    let mut ws = panel(&d, "token=secret-press-1").await;
    // A bad value (a reload must name the key and the reason) and, next, a budget the
    // running gateway would not fit.
    std::fs::write(
        &cfg,
        config(&em, &format!("max_panels = \"many\"\n{tokens}"), ""),
    )
    .unwrap();
    reload(&d, &sock);
    let line = wait_log(&d, "refused, the running config stays");
    assert!(line.contains("max_panels"), "names the key: {line}");
    std::fs::write(&cfg, config(&em, &tokens, "[budget]\nmemory_mib = 4\n")).unwrap();
    reload(&d, &sock);
    let t0 = Instant::now();
    while !d.log_text().contains("budget.memory_mib: the worst case") {
        assert!(t0.elapsed() < T, "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing changed: the panel is connected, the token still admits.
    publish(&em, &["line1/press/temp"]).await;
    event_with(&mut ws, "line1/press/temp").await;
    let _again = panel(&d, "token=secret-press-1").await;
    assert!(
        !d.log()
            .iter()
            .any(|l| l.contains("reload: ") && l.contains("applied")),
        "nothing applied:\n{}",
        d.log_text()
    );
    em.shutdown().await;
}

/// Upgrade to `/v1/stream?{query}` with extra headers: the panel after its hello, or the
/// HTTP status of the refusal.
async fn try_panel(d: &Daemon, query: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let mut req = format!("ws://{}/v1/stream?{query}", d.panels())
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http_header_value(v),
        );
    }
    match tokio::time::timeout(T, tokio_tungstenite::connect_async(req))
        .await
        .expect("an answer within 20 s")
    {
        Ok((mut ws, _)) => {
            let hello = next_text(&mut ws).await.expect("hello");
            assert!(hello.contains("\"hello\""), "{hello}");
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("upgrade failed without an HTTP status: {e}"),
    }
}

fn http_header_value(v: &str) -> tokio_tungstenite::tungstenite::http::HeaderValue {
    tokio_tungstenite::tungstenite::http::HeaderValue::from_str(v).unwrap()
}

/// Refused with 503 (the panel limit).
async fn refused_503(d: &Daemon, what: &str) {
    match try_panel(d, "", &[]).await {
        Err(status) => assert_eq!(status, 503, "{what}"),
        Ok(_) => panic!("{what}: admitted, expected 503"),
    }
}

/// Wait until `/healthz` reports `n` panels connected.
async fn connected(d: &Daemon, n: usize) {
    let want = format!("\"panels\":{n}}}");
    let t0 = Instant::now();
    loop {
        let (_, _, body) = http::get(d.panels(), "/healthz").await;
        if body.contains(&want) {
            return;
        }
        assert!(t0.elapsed() < T, "{n} panels connected: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Close from the client side and read until the server's answer.
async fn leave(mut ws: Ws) {
    ws.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(T, ws.next()).await {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_panels_lowered_admits_nobody_until_enough_left_and_raised_admits_more() {
    let em = support::emulator::start_default().await;
    let dir = TempDir::new("reload-max-panels");
    let (sock, sock_path) = notify_socket(&dir);
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        config(
            &em,
            "max_panels = 4
",
            "",
        ),
    )
    .unwrap();
    let d = start(&cfg, &sock_path);
    let mut panels = Vec::new();
    for _ in 0..4 {
        panels.push(panel(&d, "").await);
    }
    refused_503(&d, "the 5th of 4").await;

    // Lowered to 2 with 4 connected: nobody is closed, all 4 keep receiving.
    std::fs::write(
        &cfg,
        config(
            &em,
            "max_panels = 2
",
            "",
        ),
    )
    .unwrap();
    reload(&d, &sock);
    let line = wait_log(&d, "reload: ");
    assert!(line.contains("applied panels.max_panels"), "{line}");
    publish(&em, &["line1/press/after-lower"]).await;
    for ws in &mut panels {
        event_with(ws, "line1/press/after-lower").await;
    }
    connected(&d, 4).await;
    refused_503(&d, "4 connected, limit 2").await;
    // Two leave: 2 remain, which is still not below the new limit (the old one would
    // admit).
    leave(panels.pop().unwrap()).await;
    leave(panels.pop().unwrap()).await;
    connected(&d, 2).await;
    refused_503(&d, "2 connected, limit 2").await;
    // A third leaves: 1 remains, one more is admitted, and the next is refused.
    leave(panels.pop().unwrap()).await;
    connected(&d, 1).await;
    panels.push(panel(&d, "").await);
    connected(&d, 2).await;
    refused_503(&d, "2 connected again, limit 2").await;

    // Raised to 6: four more are admitted, the 7th is refused.
    std::fs::write(
        &cfg,
        config(
            &em,
            "max_panels = 6
",
            "",
        ),
    )
    .unwrap();
    reload(&d, &sock);
    for _ in 0..4 {
        panels.push(panel(&d, "").await);
    }
    connected(&d, 6).await;
    refused_503(&d, "the 7th of 6").await;
    publish(&em, &["line1/press/after-raise"]).await;
    for ws in &mut panels {
        event_with(ws, "line1/press/after-raise").await;
    }
    em.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_origins_narrowed_closes_only_the_panel_whose_origin_is_gone() {
    let em = support::emulator::start_default().await;
    let dir = TempDir::new("reload-origins");
    let (sock, sock_path) = notify_socket(&dir);
    let cfg = dir.join("config.toml");
    let origins = |list: &str| format!("allowed_origins = [{list}]\n");
    std::fs::write(
        &cfg,
        config(
            &em,
            &origins("\"http://hmi-a.plant\", \"http://hmi-b.plant\""),
            "",
        ),
    )
    .unwrap();
    let d = start(&cfg, &sock_path);
    let mut a = try_panel(&d, "", &[("Origin", "http://hmi-a.plant")])
        .await
        .expect("origin a admitted");
    let mut b = try_panel(&d, "", &[("Origin", "http://hmi-b.plant")])
        .await
        .expect("origin b admitted");
    // Not a browser: no Origin, never refused for it.
    let mut cli = panel(&d, "").await;
    publish(&em, &["line1/press/before"]).await;
    for ws in [&mut a, &mut b, &mut cli] {
        event_with(ws, "line1/press/before").await;
    }

    std::fs::write(&cfg, config(&em, &origins("\"http://hmi-b.plant\""), "")).unwrap();
    reload(&d, &sock);
    assert_eq!(
        close_of(&mut a).await,
        (CloseCode::Policy, "origin no longer allowed".to_string())
    );
    publish(&em, &["line1/press/after"]).await;
    event_with(&mut b, "line1/press/after").await;
    event_with(&mut cli, "line1/press/after").await;
    // New connections follow the new list.
    assert_eq!(
        try_panel(&d, "", &[("Origin", "http://hmi-a.plant")])
            .await
            .err(),
        Some(403)
    );
    let line = wait_log(&d, "reload: ");
    assert!(line.contains("applied panels.allowed_origins"), "{line}");
    em.shutdown().await;
}

/// A WebSocket over a socket with a tiny receive buffer that reads the hello and then
/// nothing: the gateway's writes to it stall once the TCP window is full.
async fn stalled_panel(d: &Daemon) -> Ws {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    let stream = sock.connect(d.panels()).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("ws://{}/v1/stream", d.panels()),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    let hello = next_text(&mut ws).await.expect("hello");
    assert!(hello.contains("\"hello\""), "{hello}");
    ws
}

/// Events of ~1 KiB through a 16-event journal: far more than a stalled panel's buffers
/// hold, so it falls behind the oldest retained event.
const STALL_EVENTS: u64 = 600;

/// Wait until the gateway has completed `n` messages at the source (each right after its
/// append to the journal).
async fn completed(d: &Daemon, n: u64) {
    let want = format!("asbgw_completed_total {n}");
    let t0 = Instant::now();
    loop {
        let (_, _, body) = http::get(d.panels(), "/metrics").await;
        if body.lines().any(|l| l == want) {
            return;
        }
        assert!(t0.elapsed() < T, "{want}:\n{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publish [`STALL_EVENTS`] events of ~1 KiB on `line1/`.
async fn flood(em: &EmulatorHandle, tag: &str) {
    let mut p = Publisher::connect(&em.connection_string(), "operational-events")
        .await
        .unwrap();
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(1000));
    for i in 0..STALL_EVENTS {
        p.send_json(
            &format!("line1/press/{tag}{i}"),
            &[],
            body.clone(),
            "application/json",
        )
        .await
        .unwrap();
    }
    p.close().await.unwrap();
}

/// Read a stalled panel again: the events it had buffered, then either a gap frame
/// (`Ok(reason)`) or its close (`Err((code, reason))`).
async fn drain_stalled(ws: &mut Ws) -> Result<String, (CloseCode, String)> {
    loop {
        match tokio::time::timeout(T, ws.next())
            .await
            .expect("a frame within 20 s")
        {
            Some(Ok(Message::Text(t))) => {
                let f: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                match f["type"].as_str() {
                    Some("event") => {}
                    Some("gap") => return Ok(f["reason"].as_str().unwrap().to_string()),
                    _ => panic!("unexpected {f}"),
                }
            }
            Some(Ok(Message::Close(Some(c)))) => return Err((c.code, c.reason.to_string())),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_policy_changed_to_disconnect_applies_to_a_connected_panel() {
    let em = support::emulator::start_default().await;
    let dir = TempDir::new("reload-slow");
    let (sock, sock_path) = notify_socket(&dir);
    let cfg = dir.join("config.toml");
    let journal = "[journal]\nevents = 16\nunsettled = 4\n";
    std::fs::write(&cfg, config(&em, "slow_policy = \"skip\"\n", journal)).unwrap();
    let d = start(&cfg, &sock_path);

    // Under "skip", a panel that stops reading and falls behind gets a gap.
    let mut before = stalled_panel(&d).await;
    flood(&em, "a").await;
    completed(&d, STALL_EVENTS).await;
    assert_eq!(drain_stalled(&mut before).await, Ok("lagged".to_string()));
    leave(before).await;

    // Connected under "skip", and reading.
    let mut later = stalled_panel(&d).await;
    publish(&em, &["line1/press/live"]).await;
    event_with(&mut later, "line1/press/live").await;

    std::fs::write(&cfg, config(&em, "slow_policy = \"disconnect\"\n", journal)).unwrap();
    reload(&d, &sock);
    let line = wait_log(&d, "reload: ");
    assert!(line.contains("applied panels.slow_policy"), "{line}");

    // The same panel stops reading now, falls behind, and is closed instead of getting
    // a gap.
    flood(&em, "b").await;
    completed(&d, 2 * STALL_EVENTS + 1).await;
    assert_eq!(
        drain_stalled(&mut later).await,
        Err((CloseCode::Policy, "too slow: events expired".to_string()))
    );
    let t0 = Instant::now();
    loop {
        let (_, _, body) = http::get(d.panels(), "/metrics").await;
        let has = |l: &str| body.lines().any(|x| x == l);
        if has("asbgw_panels_disconnected_slow_total 1") && has("asbgw_gaps_total 1") {
            break;
        }
        assert!(t0.elapsed() < T, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    em.shutdown().await;
}
