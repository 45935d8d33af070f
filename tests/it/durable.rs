//! The journal survives restarts (`journal.state_dir`): the real daemon, the emulator
//! and WebSocket panels.
//! - SIGTERM and restart: a panel resumes with `since=EPOCH:SEQ` in the same epoch with
//!   no gap, and new events continue the seq.
//! - kill -9 at seeded random points under load: no `(epoch, seq)` ever names two
//!   different events, and every seq a resuming panel skips is named in a gap.
//! - Damaged snapshots: the daemon starts a new epoch, logs one line naming the reason,
//!   and moves the file aside.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use asb_gateway::emulator::{EmulatorHandle, client::Publisher};
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::support::TempDir;
use crate::support::daemon::Daemon;
use crate::support::emulator::start_default as emulator;

fn config(em: &EmulatorHandle, state: &Path, extra: &str) -> String {
    format!(
        "[source]\nconnection_string = {:?}\n[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n[panels]\nlisten = \"127.0.0.1:0\"\n[journal]\nstate_dir = {:?}\n{extra}",
        em.connection_string(),
        state.display().to_string()
    )
}

fn start(dir: &TempDir, config: &str) -> Daemon {
    let path = dir.join("config.toml");
    std::fs::write(&path, config).unwrap();
    Daemon::with_config_file(&path)
        .env_remove("STATE_DIRECTORY")
        .start()
}

async fn publish(em: &EmulatorHandle, tag: &str, n: usize) {
    let mut p = Publisher::connect(&em.connection_string(), "operational-events")
        .await
        .unwrap();
    for i in 0..n {
        p.send_json(
            &format!("{tag}-{i}"),
            &[],
            format!("{{\"tag\":\"{tag}\",\"i\":{i}}}"),
            "application/json",
        )
        .await
        .unwrap();
    }
    p.close().await.unwrap();
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn panel(d: &Daemon, since: Option<(&str, u64)>) -> (Ws, Value) {
    let mut url = format!("ws://{}/v1/stream", d.panels());
    if let Some((e, s)) = since {
        url += &format!("?since={e}:{s}");
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = next(&mut ws, Duration::from_secs(10)).await.expect("hello");
    assert_eq!(hello["type"], "hello");
    (ws, hello)
}

/// The next text frame as JSON, `None` on timeout or close.
async fn next(ws: &mut Ws, wait: Duration) -> Option<Value> {
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

/// Frames until `n` events were read.
async fn events(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut evs = 0;
    while evs < n {
        let f = next(ws, Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("{n} events within 15 s; got {out:?}"));
        evs += usize::from(f["type"] == "event");
        out.push(f);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_restart_resume_in_the_same_epoch() {
    let em = emulator().await;
    let dir = TempDir::new("durable-term");
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = config(&em, &state, "");
    let mut d = start(&dir, &cfg);
    let (mut ws, hello) = panel(&d, None).await;
    let epoch = hello["epoch"].as_str().unwrap().to_string();
    publish(&em, "a", 10).await;
    let got = events(&mut ws, 10).await;
    let seqs: Vec<u64> = got.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    let (code, took) = d.terminate();
    assert_eq!(code, Some(0), "log: {}", d.log_text());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(state.join("journal.snap").is_file());

    let d = start(&dir, &cfg);
    assert!(
        d.log_text().contains("restored 10 event(s)"),
        "log: {}",
        d.log_text()
    );
    // the panel saw up to seq 6: it gets exactly 7..=10, same epoch, no gap
    let (mut ws, hello) = panel(&d, Some((&epoch, 6))).await;
    assert_eq!(hello["epoch"], epoch.as_str());
    assert_eq!(
        (hello["oldest"].as_u64(), hello["latest"].as_u64()),
        (Some(1), Some(10))
    );
    let got = events(&mut ws, 4).await;
    assert!(got.iter().all(|f| f["type"] == "event"), "no gap: {got:?}");
    let seqs: Vec<u64> = got.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![7, 8, 9, 10]);
    assert_eq!(got[0]["subject"], "a-6");
    assert_eq!(got[0]["body"]["i"], 6);
    // new events continue the seq
    publish(&em, "b", 3).await;
    let got = events(&mut ws, 3).await;
    let seqs: Vec<u64> = got.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![11, 12, 13]);
    assert_eq!(got[0]["subject"], "b-0");
    let (_, _, metrics) = crate::support::http::get(d.panels(), "/metrics").await;
    assert!(
        metrics.contains("asbgw_journal_restored_events 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("asbgw_journal_snapshot_errors_total 0"),
        "{metrics}"
    );
    em.shutdown().await;
}

/// What a panel observed: every seq of its stream is an event or inside a gap.
#[derive(Default)]
struct Observed {
    /// (epoch, seq) -> message_id and body, across all rounds.
    named: HashMap<(String, u64), String>,
    /// Where a resuming panel continues: epoch and the last seq it was told about.
    at: Option<(String, u64)>,
    events: u64,
    lost: u64,
}

impl Observed {
    fn name(&mut self, epoch: &str, f: &Value) {
        let seq = f["seq"].as_u64().unwrap();
        let what = format!("{}|{}", f["message_id"], f["body"]);
        if let Some(old) = self.named.insert((epoch.to_string(), seq), what.clone()) {
            assert_eq!(old, what, "({epoch}, {seq}) names two different events");
        }
    }

    /// Read a resumed stream until it goes quiet or closes; check contiguity.
    async fn follow(&mut self, ws: &mut Ws, hello: &Value, until: Instant) {
        let epoch = hello["epoch"].as_str().unwrap().to_string();
        let mut expect = match &self.at {
            Some((e, s)) if *e == epoch => s + 1,
            // another epoch (or the first start): the stream starts where it says
            _ => 0,
        };
        while Instant::now() < until {
            let Some(f) = next(ws, until.saturating_duration_since(Instant::now())).await else {
                break;
            };
            match f["type"].as_str().unwrap() {
                "event" => {
                    let seq = f["seq"].as_u64().unwrap();
                    assert!(
                        expect == 0 || seq == expect,
                        "event {seq} where {expect} was due, no gap named the skip"
                    );
                    self.name(&epoch, &f);
                    expect = seq + 1;
                    self.events += 1;
                }
                "gap" => {
                    let (from, to) = (f["from"].as_u64().unwrap(), f["to"].as_u64().unwrap());
                    assert!(
                        expect == 0 || from == expect,
                        "gap {f} where {expect} was due"
                    );
                    if f["reason"] == "lost" {
                        self.lost += 1;
                    }
                    expect = to + 1;
                }
                _ => {}
            }
            if expect > 0 {
                self.at = Some((epoch.clone(), expect - 1));
            }
        }
        if expect > 0 {
            self.at = Some((epoch, expect - 1));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_never_reuses_a_seq() {
    let seed: u64 = std::env::var("DURABLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(14);
    let mut rng = fastrand::Rng::with_seed(seed);
    let em = emulator().await;
    let dir = TempDir::new("durable-kill");
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = config(&em, &state, "checkpoint_secs = 1\nevents = 512\n");
    let mut seen = Observed::default();
    let mut epochs = std::collections::BTreeSet::new();
    const ROUNDS: usize = 20;
    for round in 0..ROUNDS {
        let mut d = start(&dir, &cfg);
        // Everything retained must match what was named before.
        let (mut full, hello) = panel(&d, Some(("x", 0))).await;
        let epoch = hello["epoch"].as_str().unwrap().to_string();
        epochs.insert(epoch.clone());
        let latest = hello["latest"].as_u64().unwrap();
        let mut read = hello["oldest"].as_u64().unwrap().saturating_sub(1);
        while read < latest {
            let Some(f) = next(&mut full, Duration::from_secs(5)).await else {
                panic!("retained events not served (round {round})");
            };
            if f["type"] == "event" {
                seen.name(&epoch, &f);
                read = f["seq"].as_u64().unwrap();
            }
            if f["type"] == "gap" {
                read = read.max(f["to"].as_u64().unwrap());
            }
        }
        drop(full);
        // The resuming panel, under load, until a seeded random kill -9.
        let since = seen.at.clone();
        let (mut ws, hello) = panel(&d, since.as_ref().map(|(e, s)| (e.as_str(), *s))).await;
        let tag = format!("r{round}");
        let n = 20 + rng.usize(..150);
        let em2 = em.connection_string();
        let load = tokio::spawn(async move {
            let mut p = Publisher::connect(&em2, "operational-events")
                .await
                .unwrap();
            for i in 0..n {
                let _ = p
                    .send_json(
                        &format!("{tag}-{i}"),
                        &[],
                        format!("{{\"i\":{i}}}"),
                        "application/json",
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = p.close().await;
        });
        let kill_at = Instant::now() + Duration::from_millis(300 + rng.u64(..1500));
        seen.follow(&mut ws, &hello, kill_at).await;
        d.kill();
        seen.follow(&mut ws, &hello, Instant::now() + Duration::from_millis(200))
            .await;
        let _ = load.await;
    }
    assert!(
        seen.events > 100,
        "load reached the panels ({} events)",
        seen.events
    );
    assert!(
        seen.lost > 0,
        "some crash landed between checkpoints ({} lost gaps)",
        seen.lost
    );
    assert_eq!(epochs.len(), 1, "the epoch survives crashes: {epochs:?}");
    em.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_snapshots_never_block_start() {
    let em = emulator().await;
    let dir = TempDir::new("durable-bad");
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = config(&em, &state, "");
    // A real snapshot to damage.
    let mut d = start(&dir, &cfg);
    let (mut ws, hello) = panel(&d, None).await;
    let epoch = hello["epoch"].as_str().unwrap().to_string();
    publish(&em, "a", 5).await;
    events(&mut ws, 5).await;
    assert_eq!(d.terminate().0, Some(0));
    let good = std::fs::read(state.join("journal.snap")).unwrap();
    let lease = std::fs::read(state.join("journal.lease")).unwrap();

    let mut flipped = good.clone();
    let at = good.len() / 2;
    flipped[at] ^= 0x10;
    let mut foreign = good.clone();
    foreign[8] = 99;
    let cases: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
        (
            "truncated",
            Some(good[..good.len() - 7].to_vec()),
            "truncated",
        ),
        ("bit-flipped", Some(flipped), "checksum mismatch"),
        ("empty", Some(Vec::new()), "the file is empty"),
        ("foreign version", Some(foreign), "format version 99"),
        ("unreadable (a directory)", None, "Is a directory"),
    ];
    for (kind, bytes, reason) in cases {
        let snap = state.join("journal.snap");
        let _ = std::fs::remove_file(&snap);
        let _ = std::fs::remove_dir_all(&snap);
        for e in std::fs::read_dir(&state).unwrap() {
            let p = e.unwrap().path();
            if p.to_string_lossy().contains(".corrupt-") {
                let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
            }
        }
        match &bytes {
            Some(b) => std::fs::write(&snap, b).unwrap(),
            None => {
                std::fs::create_dir(&snap).unwrap();
                std::fs::write(snap.join("x"), b"x").unwrap();
            }
        }
        std::fs::write(state.join("journal.lease"), &lease).unwrap();
        let d = start(&dir, &cfg);
        let (_ws, hello) = panel(&d, Some((&epoch, 5))).await;
        assert_ne!(hello["epoch"], epoch.as_str(), "{kind}: a new epoch");
        let lines: Vec<String> = d
            .log()
            .into_iter()
            .filter(|l| l.contains("saved state not used"))
            .collect();
        assert_eq!(lines.len(), 1, "{kind}: one line; log: {}", d.log_text());
        assert!(
            lines[0].contains(reason),
            "{kind}: names {reason:?}: {}",
            lines[0]
        );
        assert!(lines[0].contains("moved aside"), "{kind}: {}", lines[0]);
        let aside = std::fs::read_dir(&state)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("journal.snap.corrupt-")
            })
            .count();
        assert_eq!(aside, 1, "{kind}: moved aside");
        drop(d);
    }
    em.shutdown().await;
}
