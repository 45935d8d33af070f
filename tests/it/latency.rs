//! The latency histograms on `/metrics` of the real daemon (emulator, mosquitto, a
//! WebSocket panel): `asbgw_event_age_seconds` and `asbgw_gateway_latency_seconds`
//! parse as Prometheus text (the `prometheus-client` parser), count each live event
//! once per panel write and once per broker acknowledgement, and not the history a
//! panel replays with `since`; and their values: a Service Bus backlog shows in the age
//! (measured from `x-opt-enqueued-time`), not in the gateway's own latency.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use asb_gateway::emulator::EmulatorHandle;
use asb_gateway::emulator::client::Publisher;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::daemon::Daemon;
use crate::support::mosquitto::Mosquitto;
use crate::support::{self, http};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const T: Duration = Duration::from_secs(20);

/// (family, `to` label, sample suffix and `le`) → value, for the two latency families,
/// as the prometheus-client parser reads `/metrics` (it fails on text it cannot parse).
async fn parsed(d: &Daemon) -> BTreeMap<String, f64> {
    let (status, _, body) = http::get(d.panels(), "/metrics").await;
    assert_eq!(status, 200);
    let script = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    if fam.name in ("asbgw_event_age_seconds", "asbgw_gateway_latency_seconds"):
        assert fam.type == "histogram", fam.type
        for s in fam.samples:
            key = "%s|%s|%s" % (s.name, s.labels.get("to"), s.labels.get("le", ""))
            out[key] = s.value
print(json.dumps(out))
"#;
    let mut child = tokio::process::Command::new(".venv/bin/python")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect(".venv/bin/python (scripts/setup/panels.sh installs prometheus-client)");
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(body.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "the parser refused /metrics: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn count(m: &BTreeMap<String, f64>, family: &str, to: &str) -> u64 {
    m[&format!("asbgw_{family}_count|{to}|")] as u64
}

/// Buckets are cumulative, end in +Inf = count, and the sum is not negative.
fn well_formed(m: &BTreeMap<String, f64>, family: &str, to: &str) {
    let prefix = format!("asbgw_{family}_bucket|{to}|");
    let mut buckets: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(&prefix)?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            Some((le, *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    assert_eq!(buckets.len(), 16, "{family} {to}: 15 buckets and +Inf");
    assert_eq!(buckets[0].0, 0.001);
    assert_eq!(buckets[14].0, 60.0);
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{family} {to}: cumulative: {buckets:?}"
    );
    assert_eq!(buckets[15].1 as u64, count(m, family, to));
    assert!(m[&format!("asbgw_{family}_sum|{to}|")] >= 0.0);
}

async fn publish(em: &EmulatorHandle, from: u32, to: u32) {
    let mut p = Publisher::connect(&em.connection_string(), "operational-events")
        .await
        .unwrap();
    for i in from..to {
        p.send_json(
            &format!("line1/press/e{i}"),
            &[],
            format!("{{\"i\":{i}}}"),
            "application/json",
        )
        .await
        .unwrap();
    }
    p.close().await.unwrap();
}

async fn panel(d: &Daemon, query: &str) -> Ws {
    let url = format!("ws://{}/v1/stream?{query}", d.panels());
    let (ws, _) = tokio::time::timeout(T, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect within 20 s")
        .unwrap();
    ws
}

/// Read until `n` event frames arrived (after the hello).
async fn events(ws: &mut Ws, n: usize) -> (String, u64) {
    let (mut got, mut epoch, mut last) = (0, String::new(), 0);
    while got < n {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{n} events within 20 s; got {got}"));
        if let Some(Ok(Message::Text(t))) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            match v["type"].as_str() {
                Some("hello") => epoch = v["epoch"].as_str().unwrap().to_string(),
                Some("event") => {
                    got += 1;
                    last = v["seq"].as_u64().unwrap();
                }
                _ => {}
            }
        }
    }
    (epoch, last)
}

async fn until(d: &Daemon, what: &str, ok: impl Fn(&BTreeMap<String, f64>) -> bool) {
    let t0 = Instant::now();
    loop {
        let m = parsed(d).await;
        if ok(&m) {
            return;
        }
        assert!(t0.elapsed() < T, "{what}: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_histograms_count_live_events_per_panel_and_per_broker_ack() {
    let em = support::emulator::start_default().await;
    let broker = Mosquitto::start();
    let dir = support::TempDir::new("latency");
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\nconnection_string = {:?}\n[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n[panels]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nurl = {:?}\nclient_id = \"latency-{}\"\nrequired = true\n",
            em.connection_string(),
            broker.url(),
            std::process::id()
        ),
    )
    .unwrap();
    let d = Daemon::with_config_file(&cfg).start();
    // Nothing observed yet: the families exist, empty.
    let m = parsed(&d).await;
    for family in ["event_age_seconds", "gateway_latency_seconds"] {
        for to in ["panels", "mirror"] {
            well_formed(&m, family, to);
            assert_eq!(count(&m, family, to), 0);
        }
    }
    let mut live = panel(&d, "").await;
    publish(&em, 0, 20).await;
    let (epoch, last) = events(&mut live, 20).await;
    until(&d, "20 live events per panel and per ack", |m| {
        ["event_age_seconds", "gateway_latency_seconds"]
            .iter()
            .all(|f| count(m, f, "panels") == 20 && count(m, f, "mirror") == 20)
    })
    .await;
    // A panel replaying the history adds nothing (the replay is old on purpose) …
    let mut replay = panel(&d, &format!("since={epoch}:0")).await;
    let (_, replayed) = events(&mut replay, 20).await;
    assert_eq!(replayed, last);
    // … and is live from there: one more event counts once per panel (the fence that
    // shows the replay was not counted late) and once for the broker.
    publish(&em, 20, 21).await;
    events(&mut live, 1).await;
    events(&mut replay, 1).await;
    until(&d, "the next event once per panel", |m| {
        count(m, "event_age_seconds", "panels") == 22
            && count(m, "gateway_latency_seconds", "panels") == 22
            && count(m, "event_age_seconds", "mirror") == 21
    })
    .await;
    let m = parsed(&d).await;
    for family in ["event_age_seconds", "gateway_latency_seconds"] {
        for to in ["panels", "mirror"] {
            well_formed(&m, family, to);
        }
    }
    // On loopback every event is younger than a minute.
    assert_eq!(
        m["asbgw_event_age_seconds_bucket|panels|60"] as u64, 22,
        "{m:?}"
    );
    em.shutdown().await;
}

/// Observations of `family`/`to` at most `le` seconds (the cumulative bucket).
fn at_most(m: &BTreeMap<String, f64>, family: &str, to: &str, le: f64) -> u64 {
    let prefix = format!("asbgw_{family}_bucket|{to}|");
    let v = m
        .iter()
        .find(|(k, _)| {
            k.strip_prefix(&prefix)
                .is_some_and(|b| b != "+Inf" && b.parse::<f64>().unwrap() == le)
        })
        .unwrap_or_else(|| panic!("no {family} {to} bucket le={le}: {m:?}"));
    *v.1 as u64
}

fn signal(d: &Daemon, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig}");
}

/// Wait until every thread of the daemon is stopped: `kill` returns when SIGSTOP is
/// queued, and the other threads stop only once one of them has taken it.
async fn stopped(d: &Daemon) {
    let t0 = Instant::now();
    loop {
        let dir = std::fs::read_dir(format!("/proc/{}/task", d.pid())).unwrap();
        let states: Vec<String> = dir
            .flatten()
            .filter_map(|t| {
                let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                let after = &stat[stat.rfind(')')? + 1..];
                after.split_whitespace().next().map(str::to_string)
            })
            .collect();
        if !states.is_empty() && states.iter().all(|s| s == "T") {
            return;
        }
        assert!(
            t0.elapsed() < T,
            "the daemon's threads did not stop: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_bus_backlog_shows_in_the_age_and_not_in_the_gateway_latency() {
    const N: u32 = 20;
    const HELD: Duration = Duration::from_millis(1500);
    let em = support::emulator::start_default().await;
    let dir = support::TempDir::new("latency-backlog");
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\nconnection_string = {:?}\n[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n[panels]\nlisten = \"127.0.0.1:0\"\n",
            em.connection_string(),
        ),
    )
    .unwrap();
    let d = Daemon::with_config_file(&cfg).start();
    let mut live = panel(&d, "").await;
    // One event through first: the source is attached and the panel is live.
    publish(&em, 0, 1).await;
    events(&mut live, 1).await;
    until(&d, "the first event", |m| {
        count(m, "event_age_seconds", "panels") == 1
            && count(m, "gateway_latency_seconds", "panels") == 1
    })
    .await;
    let before = parsed(&d).await;

    // The gateway is not running (SIGSTOP, every thread stopped) while N events are
    // enqueued and wait in Service Bus; it takes them only after HELD.
    signal(&d, "-STOP");
    stopped(&d).await;
    publish(&em, 1, 1 + N).await;
    let enqueued = Instant::now();
    tokio::time::sleep(HELD).await;
    let held = enqueued.elapsed();
    signal(&d, "-CONT");
    events(&mut live, N as usize).await;
    until(&d, "the backlog once per panel", |m| {
        count(m, "event_age_seconds", "panels") == 1 + u64::from(N)
            && count(m, "gateway_latency_seconds", "panels") == 1 + u64::from(N)
    })
    .await;
    let after = parsed(&d).await;
    let delta = |family: &str, le: f64| {
        at_most(&after, family, "panels", le) - at_most(&before, family, "panels", le)
    };
    let n = u64::from(N);
    // Every backlog event was older than 1 s when written to the panel: its age counts
    // the time it waited in Service Bus …
    assert_eq!(delta("event_age_seconds", 1.0), 0, "{after:?}");
    assert_eq!(delta("event_age_seconds", 60.0), n, "{after:?}");
    let age_sum = after["asbgw_event_age_seconds_sum|panels|"]
        - before["asbgw_event_age_seconds_sum|panels|"];
    assert!(
        age_sum >= n as f64 * held.as_secs_f64() - 0.01 * n as f64,
        "the age includes the {held:?} in Service Bus: sum {age_sum} for {n} events"
    );
    // … and the gateway itself took well under a second for each.
    assert_eq!(delta("gateway_latency_seconds", 1.0), n, "{after:?}");
    for family in ["event_age_seconds", "gateway_latency_seconds"] {
        well_formed(&after, family, "panels");
    }
    em.shutdown().await;
}
