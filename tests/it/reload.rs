//! `systemctl reload` (SIGHUP) on the real daemon, under a stand-in `NOTIFY_SOCKET`,
//! with the emulator and real WebSocket panels:
//! - tokens rotated with 100 panels connected: only the panels whose token is gone or no
//!   longer allows their filters are closed with 1008 and the reason; the others keep
//!   receiving; new connections follow the new tokens; `RELOADING=1` … `READY=1`; one
//!   line says what was applied and what needs a restart; no token in the log.
//! - a config that fails validation on reload is refused with the error, and everything
//!   stays as it was.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use asb_gateway::emulator::EmulatorHandle;
use asb_gateway::emulator::client::Publisher;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::daemon::Daemon;
use crate::support::panels::hex;
use crate::support::{self, TempDir};

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
