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
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("the panel connects within 10 s")
    .unwrap();
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
        tokio::time::timeout(Duration::from_secs(30), load)
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: the publisher finished {n} sends within 30 s")
            })
            .unwrap();
        eprintln!(
            "round {round}: {n} sent, {} events, {} lost gaps",
            seen.events, seen.lost
        );
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

const ENTITY: &str = "operational-events/Subscriptions/edge";

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_events_reach_the_mirror_after_a_restart_and_panels_see_them_once() {
    use crate::support::Subscriber;
    use crate::support::mosquitto::Mosquitto;
    // The mirror is required and its broker is down: 8 events are appended and pinned,
    // the rest wait in ASB. SIGTERM releases the 8; the snapshot keeps them pinned.
    let mut broker = Mosquitto::start();
    broker.stop();
    let em = emulator().await;
    let dir = TempDir::new("durable-pinned");
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = config(
        &em,
        &state,
        &format!(
            "unsettled = 8\n[mqtt]\nurl = {:?}\nprefix = \"pin\"\nrequired = true\n",
            broker.url()
        ),
    );
    let mut d = start(&dir, &cfg);
    let (mut ws, hello) = panel(&d, None).await;
    let epoch = hello["epoch"].as_str().unwrap().to_string();
    publish(&em, "p", 30).await;
    let got = events(&mut ws, 8).await;
    assert_eq!(got.last().unwrap()["seq"], 8);
    wait_for("8 locked", || em.stats()[ENTITY].locked == 8).await;
    assert_eq!(d.terminate().0, Some(0), "log: {}", d.log_text());
    wait_for("released", || em.stats()[ENTITY].locked == 0).await;
    assert_eq!(em.stats()[ENTITY].completed, 0);

    // Broker back, daemon restarted: the 8 restored events are published once, their
    // redeliveries are recognised (not appended again) and completed, the rest follow.
    broker.start_again();
    let mut sub = Subscriber::start(broker.port, "pin/#", false).await;
    sub.wait_subscribed(1).await;
    let d = start(&dir, &cfg);
    wait_for("30 completed", || em.stats()[ENTITY].completed == 30).await;
    let mut bodies = Vec::new();
    while let Some(r) = sub.next(Duration::from_secs(2)).await {
        if !r.topic.ends_with("/status") {
            let v: Value = serde_json::from_slice(&r.payload).unwrap();
            bodies.push(v["i"].as_u64().unwrap());
        }
    }
    bodies.sort_unstable();
    assert_eq!(
        bodies,
        (0..30).collect::<Vec<_>>(),
        "each event once on MQTT"
    );
    let s = em.stats()[ENTITY].clone();
    assert_eq!((s.active, s.locked, s.dead_lettered), (0, 0, 0), "{s:?}");
    // A panel resuming from seq 8 gets 9..=30 and nothing else: no event twice.
    let (mut ws, hello) = panel(&d, Some((&epoch, 8))).await;
    assert_eq!(hello["epoch"], epoch.as_str());
    assert_eq!(hello["latest"], 30, "redeliveries were not appended again");
    let got = events(&mut ws, 22).await;
    let mut is: Vec<u64> = got
        .iter()
        .map(|f| f["body"]["i"].as_u64().unwrap())
        .collect();
    is.sort_unstable();
    assert_eq!(is, (8..30).collect::<Vec<_>>());
    assert!(next(&mut ws, Duration::from_millis(300)).await.is_none());
    em.shutdown().await;
}

/// The binary the benches below run: `ASBGW_BENCH_BIN` (e.g. target/release/asb-gateway),
/// else the test build.
fn bench_bin() -> String {
    std::env::var("ASBGW_BENCH_BIN").unwrap_or_else(|_| crate::support::EXE.to_string())
}

/// Bench (BENCHMARKS.md "Journal snapshot"): with a full journal of ~300 B events, the
/// bytes the daemon writes to disk (`/proc/PID/io` write_bytes) and the fsyncs it makes
/// (strace -c, when `ASBGW_BENCH_STRACE=1`) over `ASBGW_BENCH_SECS` (60) at
/// `ASBGW_BENCH_RATE` (10) events/s with the default checkpoint, extrapolated per hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --run-ignored only"]
async fn bench_snapshot_write_volume() {
    let rate: u64 = std::env::var("ASBGW_BENCH_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let secs: u64 = std::env::var("ASBGW_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let em = emulator().await;
    let dir = TempDir::new("durable-bench-io");
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(&path, config(&em, &state, "")).unwrap();
    let d = Daemon::with_config_file(&path)
        .env_remove("STATE_DIRECTORY")
        .program(&bench_bin())
        .start();
    let pid = d.pid();
    let body = format!("{{\"v\":\"{}\"}}", "x".repeat(290));
    let mut p = Publisher::connect(&em.connection_string(), "operational-events")
        .await
        .unwrap();
    // Fill the journal first (4096 events): the steady state of a box that runs for hours.
    for i in 0..4096 {
        p.send_json(&format!("fill-{i}"), &[], body.clone(), "application/json")
            .await
            .unwrap();
    }
    wait_for("filled", || em.stats()[ENTITY].completed == 4096).await;
    let strace = std::env::var("ASBGW_BENCH_STRACE").is_ok().then(|| {
        std::process::Command::new("strace")
            .args(["-f", "-c", "-e", "trace=fsync,fdatasync,rename", "-o"])
            .arg(dir.join("strace.txt"))
            .args(["-p", &pid.to_string()])
            .spawn()
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let w0 = crate::support::procfs::io_field(pid, "write_bytes");
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed() < Duration::from_secs(secs) {
        let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            p.send_json(&format!("e-{sent}"), &[], body.clone(), "application/json")
                .await
                .unwrap();
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let w = crate::support::procfs::io_field(pid, "write_bytes") - w0;
    let took = t0.elapsed().as_secs_f64();
    if let Some(mut s) = strace {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &s.id().to_string()])
            .status();
        let _ = s.wait();
        println!(
            "{}",
            std::fs::read_to_string(dir.join("strace.txt")).unwrap_or_default()
        );
    }
    let snap = std::fs::metadata(state.join("journal.snap"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "rate {rate}/s for {took:.1} s: {sent} events, write_bytes {w} ({:.1} MiB/h), snapshot {snap} B",
        w as f64 * 3600.0 / took / (1 << 20) as f64
    );
    let _ = p.close().await;
    drop(d);
    em.shutdown().await;
}

/// Bench: start -> READY ("running: panels on" logged after sd_notify READY) with a full
/// 8 MiB journal snapshot, and RSS after the restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --run-ignored only"]
async fn bench_start_with_a_full_snapshot() {
    use asb_gateway::event::{EncodedEvent, EventMeta, IdString, Topic};
    let dir = TempDir::new("durable-bench-start");
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    let em = emulator().await;
    // ASBGW_BENCH_JOURNAL_MIB=16 makes the snapshot file itself ~8 MiB (it holds the
    // postcard frames only, about half of the journal's bytes).
    let mib: usize = std::env::var("ASBGW_BENCH_JOURNAL_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let text = config(
        &em,
        &state,
        &format!("memory_mib = {mib}\n[budget]\nmemory_mib = {}\n", 40 + mib),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, &text).unwrap();
    // Fill a journal of the default limits (4096 events, 8 MiB) and save it.
    let cfg = asb_gateway::config::Config::parse(&text, &Default::default()).unwrap();
    let r = asb_gateway::durable::restore(
        asb_gateway::durable::DurableSettings {
            state: asb_gateway::journal::snapshot::StateDir::new(&state),
            checkpoint: Duration::from_secs(30),
            subscriptions: vec![ENTITY.into()],
            mirror_required: false,
        },
        cfg.journal_limits(),
        4096,
        "bench".into(),
        std::sync::Arc::new(asb_gateway::metrics::Metrics::default()),
    );
    let topic = Topic::try_from("line1/temp").unwrap();
    let body = format!("{{\"v\":\"{}\"}}", "x".repeat(1900));
    for i in 0..4096u64 {
        let meta = EventMeta {
            message_id: Some(IdString::try_from(format!("m-{i}").as_str()).unwrap()),
            content_type: Some("application/json".try_into().unwrap()),
            ..Default::default()
        };
        let ev = EncodedEvent::encode(r.journal.next_seq(), &topic, &meta, body.as_bytes());
        r.journal.append(ev, false).unwrap();
    }
    r.persistence.as_ref().unwrap().checkpoint(true).unwrap();
    let (events, bytes) = (r.journal.len(), r.journal.bytes());
    drop(r);
    let snap = std::fs::metadata(state.join("journal.snap")).unwrap().len();
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        let mut d = Daemon::with_config_file(&path)
            .env_remove("STATE_DIRECTORY")
            .program(&bench_bin())
            .start();
        let ready = t0.elapsed();
        best = best.min(ready);
        assert!(
            d.log_text()
                .contains(&format!("restored {events} event(s)")),
            "{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = crate::support::procfs::status_field(&d.pid().to_string(), "VmRSS").unwrap_or(0);
        let hwm = crate::support::procfs::status_field(&d.pid().to_string(), "VmHWM").unwrap_or(0);
        println!(
            "start -> panels on (READY): {ready:?}; {events} events, {bytes} B in the journal, \
             snapshot {snap} B; VmRSS {rss} kB, VmHWM {hwm} kB"
        );
        assert_eq!(d.terminate().0, Some(0));
    }
    println!("best start -> READY: {best:?}");
    em.shutdown().await;
}
