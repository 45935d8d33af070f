//! Throughput of the MQTT mirror: journal → mirror → mosquitto (QoS 1) → a subscriber,
//! with acknowledgement-coupled settlement (`required = true`: the producer, standing in
//! for the source, keeps at most `unsettled` events unacknowledged), against the same
//! producer with the mirror off (a journal reader stands in for a panel).
//!
//! Then the whole gateway: the ASB emulator → source → journal (→ mirror → mosquitto →
//! subscriber) → complete, with the mirror off, on over loopback TCP, and on over
//! mosquitto's Unix-domain socket, in the same run. The gateway runs on its own runtime
//! (threads named `gateway`), the emulator and the test subscriber on another (`peers`),
//! so that the CPU each path costs is reported apart: the gateway's threads, the peers'
//! threads, mosquitto.
//!
//! Run: `cargo bench --bench mirror` (needs mosquitto: scripts/setup/mirror.sh).
//! Optional: `MIRROR_BENCH_EVENTS=50000`, `MIRROR_BENCH_GATEWAY_EVENTS=10000`,
//! `MIRROR_BENCH_ROUNDS=3` (gateway rounds, off and on alternating; medians and their
//! ratio are printed), `MIRROR_BENCH_ONLY=gateway` (skip the mirror-alone part; `gateway-on`: only the
//! mirror-on gateway path, for a profiler). To test what bounds the gateway path:
//! `MIRROR_BENCH_INFLIGHT=32` (`mqtt.inflight`), `MIRROR_BENCH_UNSETTLED=256`
//! (`journal.unsettled`), `MIRROR_BENCH_BROKER='max_inflight_messages 0'` (lines added to
//! mosquitto.conf, `\n` between them; this one lifts the Receive Maximum of 20),
//! `MIRROR_BENCH_GATEWAY_WORKERS=2` (worker threads of the gateway's runtime).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use asb_gateway::app::Context;
use asb_gateway::config::{Config, LoadEnv};
use asb_gateway::event::{ContentType, EncodedEvent, EventMeta, IdString, Topic};
use asb_gateway::{mirror, shutdown};
use fe2o3_amqp::types::messaging::{ApplicationProperties, Batch, Body, Data, Message, Properties};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

const CS: &str = "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true";
const UNSETTLED: usize = 256;

/// Worker threads of the gateway's runtime: `MIRROR_BENCH_GATEWAY_WORKERS`, else 2 (what
/// `asb-gateway run` starts on a box of two cores or more).
fn gateway_workers() -> usize {
    std::env::var("MIRROR_BENCH_GATEWAY_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1)
}

/// `journal.unsettled` of the gateway path: `MIRROR_BENCH_UNSETTLED`, else [`UNSETTLED`].
fn gateway_unsettled() -> usize {
    std::env::var("MIRROR_BENCH_UNSETTLED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(UNSETTLED)
}

fn context(mqtt: Option<String>) -> Arc<Context> {
    let text = format!(
        "[source]\nconnection_string = \"{CS}\"\n[[source.subscriptions]]\n\
         topic = \"operational-events\"\nsubscription = \"edge\"\n\
         [journal]\nevents = 4096\nunsettled = {UNSETTLED}\n[budget]\nmemory_mib = 256\n{}",
        mqtt.map(|m| format!("[mqtt]\n{m}\n")).unwrap_or_default()
    );
    Context::new(Config::parse(&text, &LoadEnv::default()).unwrap())
}

fn event(seq: u64) -> EncodedEvent {
    let meta = EventMeta {
        message_id: Some(IdString::try_from(format!("m-{seq}").as_str()).unwrap()),
        content_type: Some(ContentType::try_from("application/json").unwrap()),
        subject: Some(IdString::try_from("temp").unwrap()),
        ..Default::default()
    };
    let topic = Topic::try_from(format!("line{}/temp", seq % 4).as_str()).unwrap();
    // about 200 bytes of JSON body
    let body = format!(
        "{{\"seq\":{seq},\"line\":\"line{}\",\"sensor\":\"temp\",\"value\":21.5,\"unit\":\"C\",\
         \"status\":\"ok\",\"note\":\"{}\"}}",
        seq % 4,
        "x".repeat(90)
    );
    EncodedEvent::encode(seq, &topic, &meta, body.as_bytes())
}

/// Wait until the subscriber has `n` messages; a bench must not hang.
async fn wait_count(count: &AtomicU64, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while count.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "subscriber got {} of {n}",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Mirror on: the producer appends pinned events, keeping at most UNSETTLED not yet
/// acknowledged, as the source does. Returns events/s until the subscriber has all.
async fn mirror_on(port: u16, n: u64, inflight: usize, protocol: &str) -> (f64, f64) {
    let prefix = format!("bench/{inflight}/{}", protocol.replace('.', ""));
    let ctx = context(Some(format!(
        "url = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"bench-gw-{inflight}-{protocol}\"\n\
         prefix = \"{prefix}\"\ninflight = {inflight}\nprotocol = \"{protocol}\"\nqos = 1\n"
    )));
    let (count, sub) = support::mqtt::counter(port, &format!("{prefix}/#")).await;
    let (trigger, sd) = shutdown::channel();
    let (ack_tx, mut ack_rx) = mpsc::channel(UNSETTLED);
    let task = tokio::spawn({
        let (settings, shared) = ctx.mirror_inputs().expect("[mqtt]");
        mirror::run(settings, shared, ack_tx, sd)
    });
    while ctx.metrics.mirror_state.get() != asb_gateway::metrics::PartState::Up {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start = Instant::now();
    let mut next = 1u64;
    let mut acked = 0u64;
    while acked < n {
        while next <= n && (next - 1 - acked) < UNSETTLED as u64 {
            ctx.journal.append(event(next), true).unwrap();
            next += 1;
        }
        // Unpin on each handoff, as the source does.
        if let Some(h) = ack_rx.recv().await {
            ctx.journal.handed_on(h.seq());
            acked += 1;
        }
        while let Ok(h) = ack_rx.try_recv() {
            ctx.journal.handed_on(h.seq());
            acked += 1;
        }
    }
    let acked_at = start.elapsed();
    wait_count(&count, n).await;
    let all = start.elapsed();
    trigger.fire();
    let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    sub.abort();
    (
        n as f64 / acked_at.as_secs_f64(),
        n as f64 / all.as_secs_f64(),
    )
}

/// Mirror off: the same producer, unpinned appends, one journal reader.
async fn mirror_off(n: u64) -> f64 {
    let ctx = context(None);
    let reader_ctx = ctx.clone();
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut rx = reader_ctx.journal.subscribe();
        let mut cursor = 1u64;
        let mut got = 0u64;
        let mut buf = Vec::with_capacity(256);
        while got < n {
            buf.clear();
            reader_ctx.journal.read(&mut cursor, &mut buf, 256);
            got += buf.len() as u64;
            if buf.is_empty() {
                let _ = rx.changed().await;
            }
        }
    });
    for seq in 1..=n {
        ctx.journal.append(event(seq), false).unwrap();
        if seq % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
    reader.await.unwrap();
    n as f64 / start.elapsed().as_secs_f64()
}

/// A message as the .NET SDK sends one: message id, subject, content type, an
/// application property `line`, a Data body.
fn asb_message(i: u64, body: &str) -> Message<Body<Value>> {
    Message::builder()
        .properties(
            Properties::builder()
                .message_id(format!("m-{i}"))
                .subject("temp".to_string())
                .content_type("application/json")
                .build(),
        )
        .application_properties(
            ApplicationProperties::builder()
                .insert("line", SimpleValue::String(format!("line{}", i % 4)))
                .build(),
        )
        .body(Body::Data(Batch::new(vec![Data(Binary::from(
            body.as_bytes().to_vec(),
        ))])))
        .build()
}

/// CPU seconds (user + system) in a `/proc/…/stat` line, 0 when it cannot be read.
fn stat_cpu_secs(stat: &str) -> f64 {
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds (user + system) of a process so far, from `/proc/PID/stat`.
fn cpu_secs(pid: &str) -> f64 {
    stat_cpu_secs(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// CPU seconds of this process's threads named `name` (`/proc/self/task/*/stat`; the
/// name is the runtime's `thread_name`, cut to 15 bytes by the kernel). Threads that
/// ended are not counted, so the runtimes keep theirs alive (no blocking-pool expiry
/// within a run).
fn threads_cpu_secs(name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter(|stat| {
            let comm = stat.split_once('(').and_then(|(_, r)| r.rsplit_once(')'));
            comm.is_some_and(|(c, _)| c == name)
        })
        .map(|stat| stat_cpu_secs(&stat))
        .sum()
}

/// Thread names of the two runtimes.
const GATEWAY_THREADS: &str = "gateway";
const PEER_THREADS: &str = "peers";

/// emulator → source → journal (→ mirror → mosquitto QoS 1 → subscriber) → complete.
/// N messages are loaded into the emulator first; the time runs from starting the
/// gateway until the emulator has N completed (and, with the mirror, the subscriber has
/// all N). Returns events/s. The emulator and the subscriber run on `peers`.
async fn gateway_path(broker: &Broker, peers: &Handle, n: u64, via: Via) -> Path {
    let port = broker.port;
    let with_mirror = via != Via::Off;
    let emu = peers
        .spawn(support::emulator::start_default())
        .await
        .unwrap();
    // Straight into the emulator's store: the time is the gateway's, not a publisher's.
    let body = format!(
        "{{\"value\":21.5,\"unit\":\"C\",\"note\":\"{}\"}}",
        "x".repeat(150)
    );
    let store = emu.store();
    for i in 0..n {
        store
            .publish("operational-events", asb_message(i, &body))
            .expect("preload");
    }
    let prefix = format!("gw/{via:?}");
    let url = match via {
        Via::Unix => broker.unix_url(),
        _ => broker.url(),
    };
    let mqtt = with_mirror.then(|| {
        format!(
            "url = \"{url}\"\nclient_id = \"bench-gwpath\"\n\
             prefix = \"{prefix}\"\ninflight = {}\nqos = 1\nrequired = true\n",
            std::env::var("MIRROR_BENCH_INFLIGHT").unwrap_or_else(|_| "32".into())
        )
    });
    let text = format!(
        "[source]\nconnection_string = \"{}\"\n[[source.subscriptions]]\n\
         topic = \"operational-events\"\nsubscription = \"edge\"\n\
         [journal]\nevents = 4096\nunsettled = {}\n[budget]\nmemory_mib = 256\n{}",
        emu.connection_string(),
        gateway_unsettled(),
        mqtt.map(|m| format!("[mqtt]\n{m}\n")).unwrap_or_default()
    );
    let ctx = Context::new(Config::parse(&text, &LoadEnv::default()).unwrap());
    let sub = if with_mirror {
        let filter = format!("{prefix}/#");
        Some(
            peers
                .spawn(async move { support::mqtt::counter(port, &filter).await })
                .await
                .unwrap(),
        )
    } else {
        None
    };
    let (trigger, sd) = shutdown::channel();
    let (ack_tx, ack_rx) = mpsc::channel(UNSETTLED * 2);
    let start = Instant::now();
    let cpu0 = Cpu::now(broker);
    let cx = ctx.source_context();
    let src = tokio::spawn(asb_gateway::source::run(cx, ack_rx, sd.clone()));
    let mir = if with_mirror {
        Some(tokio::spawn({
            let (settings, shared) = ctx.mirror_inputs().expect("[mqtt]");
            mirror::run(settings, shared, ack_tx, sd)
        }))
    } else {
        drop(ack_tx);
        None
    };
    let entity = "operational-events/Subscriptions/edge";
    while emu.stats()[entity].completed < n {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if let Some((count, _)) = &sub {
        wait_count(count, n).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let path = Path {
        rate,
        cpu: Cpu::now(broker).per_event_since(&cpu0, n),
    };
    trigger.fire();
    let _ = tokio::time::timeout(Duration::from_secs(5), src).await;
    if let Some(m) = mir {
        let _ = tokio::time::timeout(Duration::from_secs(3), m).await;
    }
    if let Some((_, task)) = sub {
        task.abort();
    }
    peers.spawn(emu.shutdown()).await.unwrap();
    path
}

/// The mirror in a gateway path run: off, or to mosquitto over loopback TCP or over its
/// Unix-domain socket (`mqtt.url = "unix:///…"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Off,
    Tcp,
    Unix,
}

/// One gateway path run: events/s, and CPU µs per event.
struct Path {
    rate: f64,
    cpu: Cpu,
}

/// CPU seconds so far (or, from [`Cpu::per_event_since`], µs per event): this whole
/// process, its gateway threads, its peer threads (emulator, test subscriber), mosquitto.
#[derive(Clone, Copy)]
struct Cpu {
    process: f64,
    gateway: f64,
    peers: f64,
    broker: f64,
}

impl Cpu {
    fn now(broker: &Broker) -> Cpu {
        Cpu {
            process: cpu_secs("self"),
            gateway: threads_cpu_secs(GATEWAY_THREADS),
            peers: threads_cpu_secs(PEER_THREADS),
            broker: broker.cpu(),
        }
    }

    fn per_event_since(&self, before: &Cpu, n: u64) -> Cpu {
        let us = |now: f64, then: f64| (now - then) * 1e6 / n as f64;
        Cpu {
            process: us(self.process, before.process),
            gateway: us(self.gateway, before.gateway),
            peers: us(self.peers, before.peers),
            broker: us(self.broker, before.broker),
        }
    }

    const NAN: Cpu = Cpu {
        process: f64::NAN,
        gateway: f64::NAN,
        peers: f64::NAN,
        broker: f64::NAN,
    };
}

impl std::fmt::Display for Cpu {
    /// µs per event: gateway threads + peer threads + mosquitto.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} gateway + {:.1} peers + {:.1} mosquitto µs CPU/event",
            self.gateway, self.peers, self.broker
        )
    }
}

type Broker = support::mosquitto::Mosquitto;

trait BrokerCpu {
    fn cpu(&self) -> f64;
}

impl BrokerCpu for Broker {
    fn cpu(&self) -> f64 {
        self.pid().map_or(0.0, |p| cpu_secs(&p.to_string()))
    }
}

fn main() {
    let n: u64 = std::env::var("MIRROR_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    // Blocking-pool threads live for the whole run: a thread that ended would take its
    // CPU time out of the per-thread sums.
    let runtime = |name: &str, workers: usize| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(name)
            .thread_keep_alive(Duration::from_secs(3600))
            .enable_all()
            .build()
            .unwrap()
    };
    let rt = runtime(GATEWAY_THREADS, gateway_workers());
    let peers_rt = runtime(PEER_THREADS, 2);
    let peers = peers_rt.handle().clone();
    let gw_n: u64 = std::env::var("MIRROR_BENCH_GATEWAY_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    // A subscriber slower than the mirror must not have messages dropped by the broker's
    // per-client queue limit (default 1000).
    let broker = support::mosquitto::Mosquitto::start_with(support::mosquitto::MosquittoOptions {
        // MIRROR_BENCH_BROKER: more mosquitto.conf lines (e.g. `max_inflight_messages 0`,
        // the broker's Receive Maximum).
        extra: format!(
            "max_queued_messages 0\nmax_queued_bytes 0\n{}",
            std::env::var("MIRROR_BENCH_BROKER")
                .unwrap_or_default()
                .replace("\\n", "\n")
        ),
        unix_socket: true,
        ..Default::default()
    });
    let rounds: usize = std::env::var("MIRROR_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let only = std::env::var("MIRROR_BENCH_ONLY").unwrap_or_default();
    let only_gateway = only.starts_with("gateway");
    // `gateway-on`: the mirror-on path alone (for a profiler).
    let skip_off = only == "gateway-on";
    rt.block_on(async {
        if !only_gateway {
            mirror_alone(broker.port, n).await;
        }
        println!(
            "\ngateway: {gw_n} messages preloaded in the emulator, unsettled = {}, \
             {rounds} round(s) alternating",
            gateway_unsettled()
        );
        let (mut offs, mut ons, mut unixes) = (Vec::new(), Vec::new(), Vec::new());
        // The gateway threads' CPU µs per event: off, on over TCP, on over the socket.
        let mut gw_cpu: [Vec<f64>; 3] = Default::default();
        for round in 1..=rounds {
            let off = if skip_off {
                Path {
                    rate: f64::NAN,
                    cpu: Cpu::NAN,
                }
            } else {
                gateway_path(&broker, &peers, gw_n, Via::Off).await
            };
            // TCP and the Unix socket take turns going first.
            let (on, unix) = if round % 2 == 1 {
                let on = gateway_path(&broker, &peers, gw_n, Via::Tcp).await;
                (on, gateway_path(&broker, &peers, gw_n, Via::Unix).await)
            } else {
                let unix = gateway_path(&broker, &peers, gw_n, Via::Unix).await;
                (gateway_path(&broker, &peers, gw_n, Via::Tcp).await, unix)
            };
            println!("  round {round}:");
            for (what, p) in [
                ("mirror off", &off),
                ("mirror on, TCP", &on),
                ("mirror on, Unix socket", &unix),
            ] {
                println!(
                    "    {what:<24} {:>8.0} events/s ({}; process {:.1})",
                    p.rate, p.cpu, p.cpu.process
                );
            }
            offs.push(off.rate);
            ons.push(on.rate);
            unixes.push(unix.rate);
            gw_cpu[0].push(off.cpu.gateway);
            gw_cpu[1].push(on.cpu.gateway);
            gw_cpu[2].push(unix.cpu.gateway);
        }
        let (off, on, unix) = (median(&mut offs), median(&mut ons), median(&mut unixes));
        let [gw_off, gw_on, gw_unix] = gw_cpu.map(|mut v| median(&mut v));
        println!(
            "{:<44} {:>12.0} events/s completed (median)",
            "emulator -> gateway, mirror off", off
        );
        println!(
            "{:<44} {:>12.0} events/s completed and at the subscriber (median)",
            "emulator -> gateway -> mosquitto QoS 1", on
        );
        println!(
            "{:<44} {:>12.0} events/s completed and at the subscriber (median)",
            "same, mirror over mosquitto's Unix socket", unix
        );
        println!("{:<44} {:>12.2}", "mirror on / mirror off", on / off);
        println!(
            "{:<44} {:>12.2}",
            "mirror on (Unix socket) / mirror off",
            unix / off
        );
        // What the gateway alone would sustain on cores of its own, its peers (the
        // emulator standing in for ASB, the broker and its subscriber) elsewhere: the
        // ratio of its CPU per event.
        println!(
            "{:<44} {:>12.1} off, {:.1} on (TCP), {:.1} on (Unix socket)",
            "gateway threads, CPU µs/event (median)", gw_off, gw_on, gw_unix
        );
        println!(
            "{:<44} {:>12.2} (TCP), {:.2} (Unix socket)",
            "gateway CPU/event, mirror off / mirror on",
            gw_off / gw_on,
            gw_off / gw_unix
        );
    });
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Part 1: the mirror alone (journal → mirror → mosquitto → subscriber) against a bare
/// journal reader.
async fn mirror_alone(port: u16, n: u64) {
    {
        println!("mirror bench: {n} events of ~200 B body, mosquitto on loopback, QoS 1,");
        println!("required = true (acks coupled), unsettled = {UNSETTLED}\n");
        let off = mirror_off(n).await;
        println!(
            "{:<44} {:>12.0} events/s",
            "mirror off (journal + 1 reader)", off
        );
        for (inflight, proto) in [(32, "5"), (8, "5"), (128, "5"), (32, "3.1.1")] {
            let (acked, delivered) = mirror_on(port, n, inflight, proto).await;
            println!(
                "{:<44} {:>12.0} events/s acked, {:>8.0} events/s at the subscriber",
                format!("mirror on, MQTT {proto}, inflight {inflight}"),
                acked,
                delivered
            );
        }
    }
}
