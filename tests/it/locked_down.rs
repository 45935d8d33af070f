//! Reaching Service Bus from a locked-down plant, with the real daemon: AMQP over
//! WebSockets (`ws://` and `wss://` with a plant CA in `source.ca_file`) against the
//! emulator's WebSocket listener, and through a real HTTP proxy (Debian's tinyproxy,
//! with and without basic auth, by `source.proxy` and by `HTTPS_PROXY`). Each message is
//! completed exactly once and reaches the panel once, also across a dropped WebSocket; a
//! certificate from an unknown CA and a wrong proxy password (401/407) are clear errors that name
//! the host or the proxy, never the password, and are retried with backoff.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use asb_gateway::emulator::{EmulatorHandle, EmulatorOptions, client::Publisher};
use asb_gateway::tls::{CertFiles, server::ServerTls};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::daemon::Daemon;
use crate::support::tinyproxy::Tinyproxy;
use crate::support::{self, TempDir};

const ENTITY: &str = "operational-events/Subscriptions/edge";
const T: Duration = Duration::from_secs(30);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The emulator with a WebSocket listener (in TLS with `tls`).
async fn emulator(tls: Option<CertFiles>) -> EmulatorHandle {
    support::emulator::start(EmulatorOptions {
        websocket: Some("127.0.0.1:0".parse().unwrap()),
        websocket_tls: tls.map(|f| ServerTls::load(f).unwrap()),
        ..Default::default()
    })
    .await
}

fn config(connection_string: &str, extra: &str) -> String {
    format!(
        "[source]\nconnection_string = {connection_string:?}\n{extra}\n\
         [[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n\
         [panels]\nlisten = \"127.0.0.1:0\"\n"
    )
}

/// Publish `subjects` over plain AMQP (the emulator's TCP port).
async fn publish(em: &EmulatorHandle, subjects: impl IntoIterator<Item = String>) {
    let mut p = Publisher::connect(&em.connection_string(), "operational-events")
        .await
        .unwrap();
    for s in subjects {
        p.send_json(&s, &[], "{}".to_string(), "application/json")
            .await
            .unwrap();
    }
    p.close().await.unwrap();
}

async fn panel(d: &Daemon) -> Ws {
    let url = format!("ws://{}/v1/stream", d.panels());
    let (ws, _) = tokio::time::timeout(T, tokio_tungstenite::connect_async(url))
        .await
        .expect("panel connects")
        .unwrap();
    ws
}

/// Read events until `n` distinct subjects were seen; returns how often each came.
async fn read_subjects(ws: &mut Ws, seen: &mut BTreeMap<String, usize>, n: usize) {
    while seen.len() < n {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .unwrap_or_else(|_| panic!("events: {} of {n} subjects in {T:?}", seen.len()));
        if let Some(Ok(Message::Text(t))) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "event" {
                *seen
                    .entry(v["subject"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
        }
    }
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 20 messages, a dropped connection, 20 more: each completed once, each seen once by
/// the panel, nothing dead-lettered.
async fn flows_and_survives_a_drop(em: &EmulatorHandle, d: &Daemon, tag: &str) {
    let mut ws = panel(d).await;
    let mut seen = BTreeMap::new();
    publish(em, (0..20).map(|i| format!("{tag}-{i:02}"))).await;
    read_subjects(&mut ws, &mut seen, 20).await;
    wait_for("20 completed", || em.stats()[ENTITY].completed == 20).await;
    // The emulator cuts every connection (the WebSocket's TCP too); the source
    // reconnects through the same transport.
    em.drop_connections();
    publish(em, (20..40).map(|i| format!("{tag}-{i:02}"))).await;
    read_subjects(&mut ws, &mut seen, 40).await;
    wait_for("40 completed", || em.stats()[ENTITY].completed == 40).await;
    let s = em.stats()[ENTITY].clone();
    assert_eq!(
        (s.completed, s.dead_lettered, s.active),
        (40, 0, 0),
        "{tag}: {s:?}"
    );
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{tag}: seen more than once: {twice:?}");
    let _ = ws.close(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_over_ws_and_wss_completes_each_message_once_and_survives_a_dropped_websocket() {
    // ws:// — TransportType=AmqpWebSockets with the emulator flag.
    let em = emulator(None).await;
    let cs = em.websocket_connection_string().unwrap();
    assert!(cs.contains("TransportType=AmqpWebSockets"), "{cs}");
    let d = Daemon::start(&config(&cs, ""));
    flows_and_survives_a_drop(&em, &d, "ws").await;
    let log = d.log_text();
    assert!(
        log.contains(&format!(
            "connected to 127.0.0.1:{} over WebSockets",
            em.websocket_addr().unwrap().port()
        )),
        "{log}"
    );
    drop(d);
    em.shutdown().await;

    // wss:// — a certificate from the plant's CA, trusted through source.ca_file; the
    // transport chosen by source.transport instead of the connection string.
    let dir = TempDir::new("wss");
    support::tls::make_ca(dir.path(), "plant-ca");
    let (cert, key) = support::tls::server_cert(dir.path(), "plant-ca", "ns", 2);
    let em = emulator(Some(CertFiles { cert, key })).await;
    let cs = em
        .websocket_connection_string()
        .unwrap()
        .replace(";TransportType=AmqpWebSockets", "");
    assert!(!cs.contains("UseDevelopmentEmulator"), "{cs}");
    let ca = dir.join("plant-ca.pem");
    let d = Daemon::start(&config(
        &cs,
        &format!(
            "transport = \"websockets\"\nca_file = {:?}",
            ca.display().to_string()
        ),
    ));
    flows_and_survives_a_drop(&em, &d, "wss").await;
    drop(d);

    // Without the plant CA the certificate does not verify: a clear error naming the
    // host and the reason, retried, and nothing received.
    let before = em.stats()[ENTITY].delivered;
    let d = Daemon::start(&config(&cs, "transport = \"websockets\""));
    let deadline = Instant::now() + T;
    loop {
        let log = d.log_text();
        if log.contains("TLS handshake with localhost failed") {
            assert!(
                log.contains("UnknownIssuer") || log.contains("unknown issuer"),
                "the reason is named: {log}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no TLS error logged: {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish(&em, ["after-ca".to_string()]).await;
    let (status, _, body) = support::http::get(d.panels(), "/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        em.stats()[ENTITY].delivered,
        before,
        "nothing delivered without the CA"
    );
    drop(d);
    em.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_tinyproxy_with_and_without_basic_auth_and_a_wrong_password_is_a_clear_error() {
    let em = emulator(None).await;
    let ws_port = em.websocket_addr().unwrap().port();
    let ws_cs = em.websocket_connection_string().unwrap();

    // An open proxy, named by source.proxy: AMQP over WebSockets, tunnelled.
    let open = Tinyproxy::start(None);
    let d = Daemon::start(&config(&ws_cs, &format!("proxy = {:?}", open.url(None))));
    flows_and_survives_a_drop(&em, &d, "open").await;
    assert!(open.connects_to(ws_port) >= 2, "{}", open.log());
    assert!(
        d.log_text().contains(&format!(
            "over WebSockets via proxy http://127.0.0.1:{}",
            open.port
        )),
        "{}",
        d.log_text()
    );
    drop(d);

    // A proxy with basic auth, from HTTPS_PROXY; plain AMQP (port 5672) tunnelled too.
    const USER: &str = "gw";
    const PASSWORD: &str = "s3cret-Proxy-pw";
    let authed = Tinyproxy::start(Some((USER, PASSWORD)));
    let amqp_port = em.addr().port();
    let d = Daemon::with_config(&config(&em.connection_string(), ""))
        .env("HTTPS_PROXY", authed.url(Some((USER, PASSWORD))))
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .rust_log("trace")
        .start();
    let mut ws = panel(&d).await;
    let mut seen = BTreeMap::new();
    publish(&em, (0..10).map(|i| format!("authed-{i}"))).await;
    read_subjects(&mut ws, &mut seen, 10).await;
    wait_for("50 completed", || em.stats()[ENTITY].completed == 50).await;
    assert!(authed.connects_to(amqp_port) >= 1, "{}", authed.log());
    let log = d.log_text();
    assert!(!log.contains(PASSWORD), "the proxy password is in the log");
    drop(d);

    // NO_PROXY naming the namespace's host: no tunnel.
    let before = authed.connects_to(amqp_port);
    let d = Daemon::with_config(&config(&em.connection_string(), ""))
        .env("HTTPS_PROXY", authed.url(Some((USER, PASSWORD))))
        .env("NO_PROXY", "localhost,127.0.0.1")
        .start();
    let mut ws = panel(&d).await;
    let mut seen = BTreeMap::new();
    publish(&em, ["direct".to_string()]).await;
    read_subjects(&mut ws, &mut seen, 1).await;
    assert_eq!(
        authed.connects_to(amqp_port),
        before,
        "NO_PROXY was ignored"
    );
    drop(d);

    // A wrong password: 407, an error naming the proxy (not the password), backoff.
    const WRONG: &str = "Wrong-pw-4711";
    let d = Daemon::with_config(&config(
        &ws_cs,
        &format!("proxy = {:?}", authed.url(Some((USER, WRONG)))),
    ))
    .rust_log("debug")
    .start();
    // tinyproxy answers a wrong BasicAuth with 401 (others with 407): both are
    // authentication failures.
    let want = format!(
        "proxy http://127.0.0.1:{} answered 401 Unauthorized: the user name or password in the proxy URL is wrong",
        authed.port
    );
    let deadline = Instant::now() + T;
    while !d.log_text().contains(&want) {
        assert!(Instant::now() < deadline, "no 407 error: {}", d.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Backoff doubles from 100 ms: a handful of attempts in 3 s, not hundreds (each
    // retry logs one debug line).
    let retries = |log: &str| log.matches("source still down: proxy").count();
    let at_first = retries(&d.log_text());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = retries(&d.log_text()) - at_first;
    assert!(attempts >= 1, "retried: {}", d.log_text());
    assert!(attempts <= 8, "{attempts} attempts in 3 s: no backoff");
    let log = d.log_text();
    assert!(!log.contains(WRONG), "the wrong password is in the log");
    assert_eq!(
        log.matches(&format!("source down: {want}")).count(),
        1,
        "the failure is logged once as a warning, the retries at debug level"
    );
    let (status, _, body) = support::http::get(d.panels(), "/healthz").await;
    assert_eq!(status, 503, "{body}");
    drop(d);
    em.shutdown().await;
}

#[tokio::test]
async fn bad_proxy_and_ca_settings_name_their_key_and_never_the_password() {
    use asb_gateway::config::{Config, LoadEnv};
    let dir = TempDir::new("ldcfg");
    let cs = "Endpoint=sb://ns.example/;SharedAccessKeyName=k;SharedAccessKey=v";
    let parse = |extra: &str, env: &LoadEnv| Config::parse(&config(cs, extra), env);
    let env = LoadEnv::default();
    let e = parse("proxy = \"https://u:pw-secret@proxy:3128\"", &env)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("source.proxy: must start with http://"),
        "{e}"
    );
    assert!(!e.contains("pw-secret"), "{e}");
    let e = parse("proxy = \"http://u:pw-secret@proxy:99999\"", &env)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("source.proxy") && !e.contains("pw-secret"),
        "{e}"
    );
    let bad_env = LoadEnv {
        https_proxy: Some("socks5://u:pw-secret@proxy:1080".into()),
        ..LoadEnv::default()
    };
    let e = parse("", &bad_env).unwrap_err().to_string();
    assert!(
        e.starts_with("HTTPS_PROXY (environment):") && !e.contains("pw-secret"),
        "{e}"
    );
    // source.proxy = "" turns the environment's proxy off; NO_PROXY excludes the host.
    let c = parse("proxy = \"\"", &bad_env).unwrap();
    assert!(c.source_proxy.is_none());
    let ok_env = LoadEnv {
        https_proxy: Some("http://proxy.plant:3128".into()),
        no_proxy: Some(".example".into()),
        ..LoadEnv::default()
    };
    let route = parse("", &ok_env).unwrap().source_proxy.unwrap();
    assert!(route.for_host("ns.example").is_none());
    // NO_PROXY is checked per host: the token endpoint still goes through the proxy.
    assert!(route.for_host("login.microsoftonline.com").is_some());
    let ok_env = LoadEnv {
        no_proxy: Some("other.example".into()),
        ..ok_env
    };
    let route = parse("", &ok_env).unwrap().source_proxy.unwrap();
    let p = route.for_host("ns.example").unwrap();
    assert_eq!(p.display(), "http://proxy.plant:3128");
    // The transport key and the CA file.
    let e = parse("transport = \"tcp\"", &env).unwrap_err().to_string();
    assert!(e.contains("transport"), "{e}");
    let c = parse("transport = \"websockets\"", &env).unwrap();
    assert_eq!((c.connection.websockets, c.connection.port), (true, 443));
    let missing = dir.join("missing.pem");
    let e = parse(
        &format!("ca_file = {:?}", missing.display().to_string()),
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("source.ca_file:") && e.contains("missing.pem"),
        "{e}"
    );
    let e = Config::parse(
        &config(
            "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true",
            &format!("ca_file = {:?}", missing.display().to_string()),
        ),
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("applies to TLS only"), "{e}");
}
