//! Panel server benchmark (not a test): N in-process WebSocket panels on loopback, events
//! appended to the journal at a fixed rate; delivered frames/s, append→receive latency
//! p50/p99, server CPU (its runtime threads only) and process peak RSS (VmHWM, server and
//! clients together). A variant stalls 5% of the panels (tiny receive buffer, never read).
//!
//! Run: `cargo bench --bench panels` (env PANELS_BENCH_SECS, PANELS_BENCH_RATE to change
//! the duration and the event rate).

#[path = "../tests/support/mod.rs"]
mod support;

use support::procfs;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use asb_gateway::app::Context;
use asb_gateway::config::{Config, LoadEnv};
use asb_gateway::event::{EncodedEvent, EventMeta, IdString, Topic};
use asb_gateway::panels::{self, Options};
use asb_gateway::shutdown;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

struct Scenario {
    panels: usize,
    stalled_pct: usize,
}

struct Result {
    delivered: u64,
    expected: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
    server_cpu_pct: f64,
    vm_hwm_kib: u64,
    vm_rss_kib: u64,
    gaps: u64,
}

fn config(max_panels: usize) -> Config {
    let text = format!(
        "[source]\nconnection_string = \"Endpoint=sb://127.0.0.1/;SharedAccessKeyName=k;SharedAccessKey=v\"\n\
         [[source.subscriptions]]\ntopic = \"t\"\nsubscription = \"s\"\n\
         [panels]\nmax_panels = {max_panels}\n"
    );
    Config::parse(&text, &LoadEnv::default()).unwrap()
}

fn seq_of(text: &str) -> Option<u64> {
    let rest = &text[text.find("\"seq\":")? + 6..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

fn run(s: &Scenario, rate: u64, secs: u64) -> Result {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("asbgw-srv")
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-cli")
        .enable_all()
        .build()
        .unwrap();
    let ctx = Context::with_epoch(config(s.panels + 16), "bench".into());
    let (trigger, sd) = shutdown::channel();
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = server_rt.spawn(panels::serve_with(
        listener,
        ctx.journal.clone(),
        ctx.metrics.clone(),
        ctx.panel_settings(),
        sd,
        Options::default(),
    ));

    let total = rate * secs;
    let t0 = Instant::now();
    // append time of each seq, ns since t0
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..=total + 1).map(|_| AtomicU64::new(0)).collect());
    let delivered = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let stalled = s.panels * s.stalled_pct / 100;
    let mut readers = Vec::new();
    for i in 0..s.panels {
        let (sent, delivered, ready, stop) =
            (sent.clone(), delivered.clone(), ready.clone(), stop.clone());
        let stall = i < stalled;
        // latency is sampled on up to 100 reading panels (keeps client memory small)
        let sample = i < stalled + 100;
        readers.push(client_rt.spawn(async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            if stall {
                sock.set_recv_buffer_size(2048).unwrap();
            }
            let stream = sock.connect(addr).await.unwrap();
            // small client buffers, so the process RSS is mostly the server's
            let config = WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(0)
                .max_write_buffer_size(16 * 1024);
            let (mut ws, _) = tokio_tungstenite::client_async_with_config(
                format!("ws://{addr}/v1/stream"),
                tokio_tungstenite::MaybeTlsStream::Plain(stream),
                Some(config),
            )
            .await
            .unwrap();
            let _hello = ws.next().await;
            ready.fetch_add(1, Relaxed);
            let mut lat: Vec<u32> = Vec::with_capacity(if sample { total as usize + 1 } else { 0 });
            if stall {
                while !stop.load(Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                return lat;
            }
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Text(t) = m
                    && let Some(seq) = seq_of(t.as_str())
                {
                    if sample {
                        let now = t0.elapsed().as_nanos() as u64;
                        let at = sent[seq as usize].load(Relaxed);
                        lat.push(((now.saturating_sub(at)) / 1000) as u32);
                    }
                    delivered.fetch_add(1, Relaxed);
                    if seq == total {
                        break;
                    }
                }
            }
            lat
        }));
    }
    while ready.load(Relaxed) < s.panels as u64 {
        std::thread::sleep(Duration::from_millis(5));
    }

    let meta = EventMeta {
        subject: Some(IdString::try_from("temp").unwrap()),
        ..Default::default()
    };
    let topic = Topic::try_from("line1/temp").unwrap();
    let body = br#"{"temperature":21.5,"unit":"C","line":"line1","station":7}"#;
    let ticks0 = procfs::thread_ticks("asbgw-srv");
    let start = Instant::now();
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    for seq in 1..=total {
        let due = start + interval * (seq as u32 - 1);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let ev = EncodedEvent::encode(seq, &topic, &meta, body);
        sent[seq as usize].store(t0.elapsed().as_nanos() as u64, Relaxed);
        ctx.journal.append(ev, false).unwrap();
    }
    let readers_expected = (s.panels - stalled) as u64 * total;
    let deadline = Instant::now() + Duration::from_secs(20);
    while delivered.load(Relaxed) < readers_expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ticks = procfs::thread_ticks("asbgw-srv") - ticks0;
    let hz = 100.0; // USER_HZ on Linux
    stop.store(true, Relaxed);
    let mut lat: Vec<u32> = Vec::new();
    client_rt.block_on(async {
        for r in readers {
            if let Ok(Ok(l)) = tokio::time::timeout(Duration::from_secs(5), r).await {
                lat.extend(l);
            }
        }
    });
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as u64
    };
    let gaps = ctx.metrics.gaps.get();
    let vm_hwm_kib = procfs::status_field("self", "VmHWM:").unwrap_or(0);
    let vm_rss_kib = procfs::status_field("self", "VmRSS:").unwrap_or(0);
    trigger.fire();
    let _ =
        server_rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), server).await });
    client_rt.shutdown_timeout(Duration::from_secs(1));
    server_rt.shutdown_timeout(Duration::from_secs(1));
    Result {
        delivered: delivered.load(Relaxed),
        expected: readers_expected,
        secs: elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        server_cpu_pct: ticks as f64 / hz / elapsed * 100.0,
        vm_hwm_kib,
        vm_rss_kib,
        gaps,
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let secs: u64 = std::env::var("PANELS_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rate: u64 = std::env::var("PANELS_BENCH_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    println!(
        "panels benchmark: {rate} events/s for {secs} s, JSON frames, one server worker thread"
    );
    println!(
        "{:>7} {:>8} {:>12} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10} {:>5}",
        "panels",
        "stalled",
        "frames/s",
        "delivered",
        "p50 ms",
        "p99 ms",
        "srv CPU",
        "RSS MiB",
        "HWM MiB",
        "gaps"
    );
    for s in [
        Scenario {
            panels: 100,
            stalled_pct: 0,
        },
        Scenario {
            panels: 100,
            stalled_pct: 5,
        },
        Scenario {
            panels: 1000,
            stalled_pct: 0,
        },
        Scenario {
            panels: 1000,
            stalled_pct: 5,
        },
    ] {
        let r = run(&s, rate, secs);
        println!(
            "{:>7} {:>7}% {:>12.0} {:>9.1}% {:>9.2} {:>9.2} {:>8.0}% {:>10.1} {:>10.1} {:>5}",
            s.panels,
            s.stalled_pct,
            r.delivered as f64 / r.secs,
            r.delivered as f64 / r.expected.max(1) as f64 * 100.0,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.server_cpu_pct,
            r.vm_rss_kib as f64 / 1024.0,
            r.vm_hwm_kib as f64 / 1024.0,
            r.gaps
        );
    }
}
