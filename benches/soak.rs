//! Soak: the `asb-gateway run` process at a steady load for a bounded time, with panels
//! connecting and disconnecting all the time. Samples the gateway's RSS (VmRSS), open
//! file descriptors (/proc/PID/fd) and threads (/proc/PID/status) every few seconds and
//! reports start (after warm-up) and end values and the RSS slope (least squares,
//! KiB/min), as JSON and as a Markdown table.
//!
//! Not a CI test. `cargo bench --bench soak`; environment:
//! - `ASBGW_SOAK_SECS` (default 600) — the measured run, after warm-up;
//! - `ASBGW_SOAK_WARMUP_SECS` (default 30);
//! - `ASBGW_SOAK_RATE` (messages/s, default 200);
//! - `ASBGW_SOAK_SAMPLE_SECS` (default 5).
//!
//! Peers: the ASB emulator in this process, a real mosquitto (the mirror is required),
//! 4 panels that stay and a churn of short-lived panels (a new one every 200 ms, each
//! reading for 0.3–3 s, some with a filter, some postcard).

#[path = "../tests/support/mod.rs"]
mod support;

use support::daemon::{Daemon, Log};
use support::{http, mosquitto, procfs};

/// The body of GET `path` ("" when unreachable).
fn http_get(addr: SocketAddr, path: &str) -> String {
    http::get_blocking(addr, path)
        .map(|(_, body)| body)
        .unwrap_or_default()
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use asb_gateway::emulator::client::Publisher;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ENTITY: &str = "operational-events/Subscriptions/edge";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    t_secs: f64,
    rss_kib: u64,
    fds: u64,
    threads: u64,
    /// Tokio tasks alive in the gateway (`asbgw_tasks_alive` from `/metrics`).
    tasks: u64,
}

fn sample(pid: u32, panels: SocketAddr, t0: Instant) -> Option<Sample> {
    let pid_s = pid.to_string();
    let field = |name: &str| procfs::status_field(&pid_s, name);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    let tasks = http_get(panels, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix("asbgw_tasks_alive "))
        .and_then(|v| v.trim().parse().ok())?;
    Some(Sample {
        t_secs: t0.elapsed().as_secs_f64(),
        rss_kib: field("VmRSS:")?,
        fds,
        threads: field("Threads:")?,
        tasks,
    })
}

/// Least-squares slope of RSS over time, KiB per minute.
fn slope_kib_per_min(s: &[Sample]) -> f64 {
    let n = s.len() as f64;
    if s.len() < 2 {
        return 0.0;
    }
    let mx = s.iter().map(|x| x.t_secs).sum::<f64>() / n;
    let my = s.iter().map(|x| x.rss_kib as f64).sum::<f64>() / n;
    let num: f64 = s
        .iter()
        .map(|x| (x.t_secs - mx) * (x.rss_kib as f64 - my))
        .sum();
    let den: f64 = s.iter().map(|x| (x.t_secs - mx).powi(2)).sum();
    if den == 0.0 { 0.0 } else { num / den * 60.0 }
}

/// One panel: connect, read for `hold` (or forever), close.
async fn panel(
    addr: SocketAddr,
    query: &str,
    postcard: bool,
    hold: Option<Duration>,
    frames: Arc<AtomicU64>,
) {
    let mut req = format!("ws://{addr}/v1/stream{query}")
        .into_client_request()
        .unwrap();
    if postcard {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "asbgw.v1.postcard".parse().unwrap(),
        );
    }
    let Ok(Ok((mut ws, _))) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(req),
    )
    .await
    else {
        return;
    };
    let until = hold.map(|h| tokio::time::Instant::now() + h);
    loop {
        let next = match until {
            Some(u) => match tokio::time::timeout_at(u, ws.next()).await {
                Ok(n) => n,
                Err(_) => break,
            },
            None => ws.next().await,
        };
        match next {
            Some(Ok(_)) => {
                frames.fetch_add(1, Ordering::Relaxed);
            }
            _ => return,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}

fn main() {
    let secs = env_u64("ASBGW_SOAK_SECS", 600);
    let warmup = env_u64("ASBGW_SOAK_WARMUP_SECS", 30);
    let rate = env_u64("ASBGW_SOAK_RATE", 200).max(1);
    let every = env_u64("ASBGW_SOAK_SAMPLE_SECS", 5).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(secs, warmup, rate, every));
}

async fn run(secs: u64, warmup: u64, rate: u64, every: u64) {
    let broker = mosquitto::Mosquitto::start();
    let em = support::emulator::start_default().await;
    let dir = std::env::temp_dir().join(format!("asbgw-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nconnection_string = {cs:?}\n[[source.subscriptions]]\n\
             topic = \"operational-events\"\nsubscription = \"edge\"\n\
             [routing]\ntopic = \"{{prop:line}}/{{subject}}\"\n\
             [panels]\nlisten = \"127.0.0.1:0\"\n\
             [mqtt]\nurl = \"{url}\"\nclient_id = \"soak-{pid}\"\nprefix = \"soak\"\nrequired = true\n",
            cs = em.connection_string(),
            url = broker.url(),
            pid = std::process::id(),
        ),
    )
    .unwrap();
    // Warnings are counted as they come, not printed; the last lines are kept.
    let warnings = Arc::new(AtomicU64::new(0));
    let w = warnings.clone();
    let mut gateway = Daemon::with_config_file(&config)
        .rust_log("warn,asb_gateway=info")
        .log(&Log::default(), 10_000)
        .on_line(move |line| {
            if line.contains("WARN") || line.contains("ERROR") {
                w.fetch_add(1, Ordering::Relaxed);
            }
        })
        .start();
    let pid = gateway.pid();
    let panels = gateway.panels();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let frames = Arc::new(AtomicU64::new(0));
    let churned = Arc::new(AtomicU64::new(0));

    // Steady load.
    let publisher = {
        let (cs, stop, sent) = (em.connection_string(), stop.clone(), sent.clone());
        tokio::spawn(async move {
            let mut p = Publisher::connect(&cs, "operational-events").await.unwrap();
            let t0 = tokio::time::Instant::now();
            let interval = Duration::from_secs_f64(1.0 / rate as f64);
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep_until(t0 + interval.mul_f64(n as f64)).await;
                let line = format!("line{}", n % 4);
                p.send_json(
                    "temp",
                    &[("line", line.as_str())],
                    format!("{{\"n\":{n},\"v\":{}}}", n % 97),
                    "application/json",
                )
                .await
                .expect("publish");
                n += 1;
                sent.store(n, Ordering::Relaxed);
            }
            let _ = p.close().await;
        })
    };
    // Panels that stay, and panels that come and go.
    let mut stayers = Vec::new();
    for i in 0..4 {
        let q = if i % 2 == 0 { "" } else { "?filter=line1/%23" };
        stayers.push(tokio::spawn(panel(panels, q, i == 3, None, frames.clone())));
    }
    let churn = {
        let (stop, frames, churned) = (stop.clone(), frames.clone(), churned.clone());
        tokio::spawn(async move {
            let mut live = tokio::task::JoinSet::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                while live.try_join_next().is_some() {}
                if live.len() >= 16 {
                    continue;
                }
                i += 1;
                let q = match i % 3 {
                    0 => "",
                    1 => "?filter=line2/%23&filter=line3/temp",
                    _ => "?filter=%2B/temp",
                };
                let hold = Duration::from_millis(300 + fastrand::u64(..2700));
                live.spawn(panel(
                    panels,
                    q,
                    i.is_multiple_of(4),
                    Some(hold),
                    frames.clone(),
                ));
                churned.fetch_add(1, Ordering::Relaxed);
            }
            live.shutdown().await;
        })
    };

    let t0 = Instant::now();
    eprintln!("soak: warm-up {warmup} s, then {secs} s at {rate} msg/s (gateway pid {pid})");
    tokio::time::sleep(Duration::from_secs(warmup)).await;
    let mut samples = Vec::new();
    let t_measure = Instant::now();
    loop {
        let s = sample(pid, panels, t0).expect("gateway alive");
        samples.push(s);
        if t_measure.elapsed() >= Duration::from_secs(secs) {
            break;
        }
        eprintln!(
            "soak: t={:>6.0}s rss={} KiB fds={} threads={} tasks={} sent={} completed={} panels churned={}",
            s.t_secs,
            s.rss_kib,
            s.fds,
            s.threads,
            s.tasks,
            sent.load(Ordering::Relaxed),
            em.stats()[ENTITY].completed,
            churned.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_secs(every)).await;
    }
    let health = http_get(panels, "/healthz");
    stop.store(true, Ordering::Relaxed);
    let _ = publisher.await;
    let _ = churn.await;
    for s in stayers {
        s.abort();
    }
    // After the churn: panel sockets and fds come back to the idle level.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = sample(pid, panels, t0).expect("gateway alive");
    let health_idle = http_get(panels, "/healthz");
    let stats = em.stats()[ENTITY].clone();

    let (exit, _) = gateway.terminate();
    let _ = std::fs::remove_dir_all(&dir);

    let first = samples[0];
    let last = *samples.last().unwrap();
    let slope = slope_kib_per_min(&samples);
    // Allocator high-water marks (a peak of concurrent panels) show as steps early on; a
    // leak keeps the same slope in the second half.
    let slope_late = slope_kib_per_min(&samples[samples.len() / 2..]);
    let json = serde_json::json!({
        "bench": "soak",
        "measured_secs": secs,
        "warmup_secs": warmup,
        "rate_msg_per_s": rate,
        "samples": samples.len(),
        "sent": sent.load(Ordering::Relaxed),
        "completed": stats.completed,
        "active_at_end": stats.active,
        "locked_at_end": stats.locked,
        "panel_frames": frames.load(Ordering::Relaxed),
        "panels_churned": churned.load(Ordering::Relaxed),
        "rss_kib_start": first.rss_kib,
        "rss_kib_end": last.rss_kib,
        "rss_kib_max": samples.iter().map(|s| s.rss_kib).max(),
        "rss_slope_kib_per_min": (slope * 10.0).round() / 10.0,
        "rss_slope_second_half_kib_per_min": (slope_late * 10.0).round() / 10.0,
        "fds_start": first.fds,
        "fds_end": last.fds,
        "fds_idle_after": idle.fds,
        "threads_start": first.threads,
        "threads_end": last.threads,
        "threads_idle_after": idle.threads,
        "tasks_start": first.tasks,
        "tasks_end": last.tasks,
        "tasks_max": samples.iter().map(|s| s.tasks).max(),
        "tasks_idle_after": idle.tasks,
        "healthz_end": health,
        "healthz_idle_after": health_idle,
        "gateway_warnings": warnings.load(Ordering::Relaxed),
        "exit_code": exit,
    });
    println!("{}", serde_json::to_string_pretty(&json).unwrap());
    println!();
    println!(
        "| metric | start (after {warmup} s warm-up) | end ({secs} s later) | idle after churn |"
    );
    println!("|---|---|---|---|");
    println!(
        "| RSS KiB | {} | {} | {} |",
        first.rss_kib, last.rss_kib, idle.rss_kib
    );
    println!("| open fds | {} | {} | {} |", first.fds, last.fds, idle.fds);
    println!(
        "| threads | {} | {} | {} |",
        first.threads, last.threads, idle.threads
    );
    println!(
        "| tokio tasks | {} | {} | {} |",
        first.tasks, last.tasks, idle.tasks
    );
    println!();
    println!(
        "RSS slope {slope:.1} KiB/min (least squares over {} samples; second half \
         {slope_late:.1} KiB/min; max {} KiB); \
         {} messages sent, {} completed; {} panel frames; {} panels churned; exit {exit:?}",
        samples.len(),
        samples.iter().map(|s| s.rss_kib).max().unwrap_or(0),
        sent.load(Ordering::Relaxed),
        stats.completed,
        frames.load(Ordering::Relaxed),
        churned.load(Ordering::Relaxed),
    );
    drop(broker);
    em.shutdown().await;
}
