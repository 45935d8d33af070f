//! The whole pipeline against peers, side by side in one run (issue 7; not a test).
//!
//! Per scenario, a fresh server process is started (pinned to core 0 with `taskset` when
//! 2+ cores exist) and N WebSocket panel clients, written in Rust (tokio-tungstenite, one
//! runtime thread, pinned to core 1 with the rest of this process), connect to it. An
//! open-loop source publishes at a fixed rate, each body `{"i":N,"t":NANOS,"p":"xx…"}`
//! carrying its index and the publish time (nanoseconds since a base `Instant` of this
//! process: publisher and panels share the clock). Servers:
//!
//! - `gateway` / `gateway+mirror`: `asb-gateway run` (the release binary) fed by the ASB
//!   emulator (in this process, AMQP 1.0 on loopback); with the mirror, `[mqtt]` points
//!   at a mosquitto of its own with `required = true` (settle after PUBACK).
//! - `node-ws`: `bench/node-gateway.js`, the usual first version of a Node.js gateway
//!   (`ws` broadcast), fed over a WebSocket on `/feed`.
//! - `mosquitto-ws`: mosquitto's WebSocket listener as the fan-out; the panels speak
//!   MQTT 3.1.1 over WebSocket (QoS 0, `bench/#`), the source publishes with rumqttc.
//!
//! Reported per scenario (one JSON line each, then a Markdown table): events/s published
//! and ingested, frames/s delivered, completeness (reading panels' first/last index,
//! missing), latency p50/p99/max (publish → panel receipt), the server's peak RSS
//! (VmHWM), CPU % (utime+stime of the process), core 0 softirq %, the panel clients'
//! CPU %, and with `PIPELINE_BENCH_SYSCALLS=1` the server's write-family syscalls per
//! delivered frame (`perf stat` on the syscall tracepoints: it slows every syscall of the
//! server, so it is a separate run, not the default).
//!
//! Run: `scripts/bench.sh` (installs the peers, builds, runs this). Env:
//! `PIPELINE_BENCH_QUICK=1` (a quick subset), `PIPELINE_BENCH_SECS` (default 6),
//! `PIPELINE_BENCH_ONLY=gateway,gateway+mirror,node-ws,mosquitto-ws`,
//! `PIPELINE_BENCH_GATEWAY` (path of the gateway binary), `PIPELINE_BENCH_SYSCALLS=1`,
//! `PIPELINE_BENCH_MEMORY_MIB` (a higher `budget.memory_mib`, for an older binary whose
//! worst case is larger), `PIPELINE_BENCH_SCENARIOS=kind:panels:bytes:rate,…` (only
//! those, e.g. `firehose:1000:4096:400`).

#[path = "../tests/support/mod.rs"]
mod support;

use support::daemon::Daemon;
use support::mosquitto::{Mosquitto, MosquittoOptions};
use support::{http, procfs};

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use asb_gateway::config::{Config, LoadEnv};
use asb_gateway::emulator::{EmulatorHandle, client::Publisher};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const ENTITY: &str = "operational-events/Subscriptions/edge";
/// Latency is recorded on at most this many reading panels (bounds the bench's memory).
const SAMPLED_PANELS: usize = 200;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Peer {
    Gateway,
    GatewayMirror,
    Node,
    Mosquitto,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Gateway => "gateway",
            Peer::GatewayMirror => "gateway+mirror",
            Peer::Node => "node-ws",
            Peer::Mosquitto => "mosquitto-ws",
        }
    }
    fn all() -> [Peer; 4] {
        [
            Peer::Gateway,
            Peer::GatewayMirror,
            Peer::Node,
            Peer::Mosquitto,
        ]
    }
}

#[derive(Clone, Debug)]
struct Scenario {
    kind: &'static str,
    panels: usize,
    size: usize,
    rate: u64,
    stalled_pct: usize,
}

impl Scenario {
    /// The same panels, event size and rate (stalls and kind aside).
    fn same_load(&self, o: &Scenario) -> bool {
        (self.panels, self.size, self.rate) == (o.panels, o.size, o.rate)
    }
}

/// A server under test and how to feed it.
struct Server {
    proc: Proc,
    /// Processes that belong to the scenario but are not measured (the mirror's broker).
    others: Vec<Mosquitto>,
    ws: SocketAddr,
    path: &'static str,
    feed: Feed,
    budget: Option<(f64, u64)>,
    dir: PathBuf,
}

enum Feed {
    Emulator(EmulatorHandle),
    NodeWs(SocketAddr),
    Mqtt(u16),
}

/// The measured process.
enum Proc {
    Gateway(Daemon),
    Node(Child),
    Broker(Mosquitto),
}

impl Proc {
    fn pid(&self) -> u32 {
        match self {
            Proc::Gateway(d) => d.pid(),
            Proc::Node(c) => c.id(),
            Proc::Broker(m) => m.pid().expect("mosquitto runs"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        match &mut self.proc {
            Proc::Gateway(d) => {
                d.stop(Duration::from_secs(3));
            }
            Proc::Node(child) => {
                let pid = child.id().to_string();
                let _ = Command::new("kill").args(["-TERM", &pid]).status();
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(3) {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            // stopped (SIGTERM) on drop
            Proc::Broker(_) => {}
        }
        self.others.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Cores available at start (before this process pins itself to core 1).
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn pinned() -> bool {
    cores() >= 2
}

/// `cmd args…`, under `taskset -c 0` when 2+ cores exist (taskset execs: same pid).
fn command(program: &str, args: &[&str]) -> Command {
    if pinned() {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", program]).args(args);
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        c
    }
}

use support::free_port;

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "asbgw-pipeline-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn wait_port(port: u16) {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "port {port} not up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// mosquitto (anonymous) on a free port and, if given, a WebSocket listener on `ws`;
/// pinned to core 0 with `pin` when 2+ cores exist.
fn mosquitto(ws: Option<u16>, pin: bool) -> Mosquitto {
    let m = Mosquitto::start_with(MosquittoOptions {
        extra: ws
            .map(|ws| format!("listener {ws}\nprotocol websockets\n"))
            .unwrap_or_default(),
        pin_cpu: (pin && pinned()).then_some(0),
        ..Default::default()
    });
    if let Some(ws) = ws {
        wait_port(ws);
    }
    m
}

fn gateway_binary() -> String {
    std::env::var("PIPELINE_BENCH_GATEWAY").unwrap_or_else(|_| support::EXE.to_string())
}

fn gateway_config(
    em: &EmulatorHandle,
    mirror: Option<u16>,
    max_panels: usize,
    memory_mib: u64,
) -> String {
    let mqtt = mirror
        .map(|p| {
            format!(
                "[mqtt]\nurl = \"mqtt://127.0.0.1:{p}\"\nclient_id = \"bench-gw\"\n\
                 prefix = \"bench\"\nqos = 1\nrequired = true\n"
            )
        })
        .unwrap_or_default();
    format!(
        "[source]\nconnection_string = {:?}\n[[source.subscriptions]]\n\
         topic = \"operational-events\"\nsubscription = \"edge\"\n\
         [journal]\nevents = 4096\nmax_event_bytes = 8192\nunsettled = 256\n\
         [panels]\nlisten = \"127.0.0.1:0\"\nmax_panels = {max_panels}\n\
         [budget]\nmemory_mib = {memory_mib}\n{mqtt}",
        em.connection_string()
    )
}

/// The worst-case budget `check-config` prints for `text`: (total MiB, memory_mib).
fn budget_of(text: &str) -> asb_gateway::budget::Budget {
    let c = Config::parse(text, &LoadEnv::default()).expect("bench config parses");
    asb_gateway::budget::compute(&c)
}

/// `max_panels` is the scenario's panel count plus 10%: the budget grows with it.
async fn start_gateway(mirror: bool, panels: usize, print_budget: bool) -> Server {
    let max_panels = panels + panels / 10;
    let em = support::emulator::start_default().await;
    let dir = temp_dir("gw");
    let mut others = Vec::new();
    let mirror_port = mirror.then(|| {
        // the mirror's broker runs beside the clients, not on the gateway's core
        let m = mosquitto(None, false);
        let p = m.port;
        others.push(m);
        p
    });
    // memory_mib: the smallest whole MiB (multiple of 8) that the worst case fits in
    let b = budget_of(&gateway_config(&em, mirror_port, max_panels, 4096));
    let mut mib = (b.total() as f64 / (1 << 20) as f64 / 8.0).ceil() as u64 * 8;
    // An older binary (PIPELINE_BENCH_GATEWAY) may count a larger worst case and refuse
    // to start under this one's budget: PIPELINE_BENCH_MEMORY_MIB raises the limit.
    if let Some(at_least) = std::env::var("PIPELINE_BENCH_MEMORY_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        mib = mib.max(at_least);
    }
    let text = gateway_config(&em, mirror_port, max_panels, mib);
    let b = budget_of(&text);
    assert!(b.fits());
    if print_budget {
        println!(
            "check-config budget for the {} config (max_panels {max_panels}):\n{}",
            if mirror { "gateway+mirror" } else { "gateway" },
            b.render()
        );
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, &text).unwrap();
    let bin = gateway_binary();
    let daemon = Daemon::with_config_file(&path)
        .program(&bin)
        .prefix(if pinned() {
            &["taskset", "-c", "0"]
        } else {
            &[]
        })
        .rust_log("warn,asb_gateway::app=info")
        .start();
    let addr = daemon.panels();
    // Publish only once the source (and the mirror) is connected: events published
    // before would wait in the emulator and count as latency of the gateway.
    let t = Instant::now();
    while http::get_blocking(addr, "/healthz").map(|(status, _)| status) != Some(200) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "gateway not healthy after 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Server {
        proc: Proc::Gateway(daemon),
        others,
        ws: addr,
        path: "/v1/stream",
        feed: Feed::Emulator(em),
        budget: Some((b.total() as f64 / (1 << 20) as f64, mib)),
        dir,
    }
}

fn start_node() -> Server {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/node-gateway.js");
    let mut child = command("node", &[script.to_str().unwrap(), "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node: run scripts/setup/bench.sh");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("node gateway: {line:?} (run scripts/setup/bench.sh)"))
        .parse()
        .unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    Server {
        proc: Proc::Node(child),
        others: Vec::new(),
        ws: addr,
        path: "/",
        feed: Feed::NodeWs(addr),
        budget: None,
        dir: temp_dir("node"),
    }
}

fn start_mosquitto_ws() -> Server {
    let dir = temp_dir("mq");
    let ws = free_port();
    let broker = mosquitto(Some(ws), true);
    let tcp = broker.port;
    Server {
        proc: Proc::Broker(broker),
        others: Vec::new(),
        ws: ([127, 0, 0, 1], ws).into(),
        path: "/",
        feed: Feed::Mqtt(tcp),
        budget: None,
        dir,
    }
}

// ---- measurement ----

#[derive(Clone, Copy, Default)]
struct ProcSample {
    ticks: u64,
    hwm_kib: u64,
}

fn proc_sample(pid: u32) -> ProcSample {
    let pid = pid.to_string();
    ProcSample {
        ticks: procfs::process_ticks(&pid),
        hwm_kib: procfs::status_field(&pid, "VmHWM:").unwrap_or(0),
    }
}

/// softirq ticks of core 0 (where the server runs when pinned) and all its ticks.
fn core0_softirq() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat
        .lines()
        .find(|l| l.starts_with(if pinned() { "cpu0 " } else { "cpu " }))
        .unwrap_or("");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    (
        v.get(6).copied().unwrap_or(0),
        v.iter().take(8).sum::<u64>(),
    )
}

/// The write-family syscalls the kernel counts for a process while the returned child
/// runs: `perf stat` on the syscall tracepoints. `/proc/PID/io` `syscw` cannot be used:
/// it counts write/writev only, and Rust's `TcpStream` and libwebsockets write sockets
/// with send(). None when perf is missing or not allowed. Counting costs the server
/// CPU on every syscall, hence opt-in.
const WRITE_SYSCALLS: &str = "syscalls:sys_enter_write,syscalls:sys_enter_writev,\
                              syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg";

fn perf_writes_start(pid: u32) -> Option<Child> {
    Command::new("perf")
        .args([
            "stat",
            "-x",
            ",",
            "-e",
            WRITE_SYSCALLS,
            "-p",
            &pid.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ok()
}

/// Stop `perf stat` and sum its counts (None if it counted nothing usable).
fn perf_writes_stop(child: Option<Child>) -> Option<u64> {
    let child = child?;
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let counts: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("syscalls:sys_enter_"))
        .filter_map(|l| l.split(',').next()?.trim().parse().ok())
        .collect();
    (counts.len() == 4).then(|| counts.iter().sum())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- panel clients ----

#[derive(Default)]
struct ClientResult {
    stalled: bool,
    first: Option<u64>,
    last: Option<u64>,
    count: u64,
    gaps: u64,
    lat_us: Vec<u32>,
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Gateway,
    Plain,
    Mqtt,
}

struct Shared {
    t0: Instant,
    frames: AtomicU64,
    last_rx_ns: AtomicU64,
    ready: AtomicUsize,
}

/// `{"i":N,"t":T,…` anywhere in `b` → (N, T).
fn index_time(b: &[u8]) -> Option<(u64, u64)> {
    const KEY: &[u8] = b"{\"i\":";
    let at = b.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let num = |s: &[u8]| -> (u64, usize) {
        let mut v = 0u64;
        let mut n = 0;
        while n < s.len() && s[n].is_ascii_digit() {
            v = v * 10 + (s[n] - b'0') as u64;
            n += 1;
        }
        (v, n)
    };
    let (i, n) = num(&b[at..]);
    let rest = b[at + n..].strip_prefix(b",\"t\":")?;
    let (t, m) = num(rest);
    (n > 0 && m > 0).then_some((i, t))
}

fn mqtt_connect(id: &str) -> Vec<u8> {
    let mut v = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0];
    v.extend_from_slice(&(id.len() as u16).to_be_bytes());
    v.extend_from_slice(id.as_bytes());
    let mut p = vec![0x10, v.len() as u8];
    p.extend(v);
    p
}

fn mqtt_subscribe(filter: &str) -> Vec<u8> {
    let mut v = vec![0, 1];
    v.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    v.extend_from_slice(filter.as_bytes());
    v.push(0);
    let mut p = vec![0x82, v.len() as u8];
    p.extend(v);
    p
}

/// Split complete MQTT packets off the front of `buf`: (first byte, body) each.
fn mqtt_packets(buf: &mut Vec<u8>, mut each: impl FnMut(u8, &[u8])) {
    let mut pos = 0;
    loop {
        let b = &buf[pos..];
        if b.len() < 2 {
            break;
        }
        let (mut len, mut mul, mut i) = (0usize, 1usize, 1usize);
        let complete_header = loop {
            if i >= b.len() || i > 4 {
                break false;
            }
            len += (b[i] & 0x7f) as usize * mul;
            mul *= 128;
            i += 1;
            if b[i - 1] & 0x80 == 0 {
                break true;
            }
        };
        if !complete_header || b.len() < i + len {
            break;
        }
        each(b[0], &b[i..i + len]);
        pos += i + len;
    }
    buf.drain(..pos);
}

struct ClientSpec {
    proto: Proto,
    addr: SocketAddr,
    path: &'static str,
    stall: bool,
    sample: bool,
    capacity: usize,
    id: usize,
}

async fn panel(
    spec: ClientSpec,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> ClientResult {
    let mut res = ClientResult {
        stalled: spec.stall,
        lat_us: Vec::with_capacity(if spec.sample { spec.capacity } else { 0 }),
        ..Default::default()
    };
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    if spec.stall {
        sock.set_recv_buffer_size(2048).unwrap();
    }
    let stream = sock.connect(spec.addr).await.expect("panel connect");
    let _ = stream.set_nodelay(true);
    let mut req = format!("ws://{}{}", spec.addr, spec.path)
        .into_client_request()
        .unwrap();
    if spec.proto == Proto::Mqtt {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        req,
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
        Some(config),
    )
    .await
    .expect("panel handshake");
    let mut mqbuf: Vec<u8> = Vec::with_capacity(if spec.proto == Proto::Mqtt { 16384 } else { 0 });
    match spec.proto {
        Proto::Gateway => {
            let _hello = ws.next().await;
        }
        Proto::Plain => {}
        Proto::Mqtt => {
            ws.send(Message::binary(mqtt_connect(&format!("panel-{}", spec.id))))
                .await
                .unwrap();
            ws.send(Message::binary(mqtt_subscribe("bench/#")))
                .await
                .unwrap();
            // CONNACK, SUBACK
            let mut acks = 0;
            while acks < 2 {
                let Some(Ok(m)) = ws.next().await else {
                    panic!("mosquitto closed the panel")
                };
                mqbuf.extend_from_slice(&m.into_data());
                mqtt_packets(&mut mqbuf, |h, _| {
                    if h >> 4 == 2 || h >> 4 == 9 {
                        acks += 1;
                    }
                });
            }
        }
    }
    shared.ready.fetch_add(1, Relaxed);
    if spec.stall {
        let _ = stop.wait_for(|s| *s).await;
        return res;
    }
    let t0 = shared.t0;
    let on_body = |res: &mut ClientResult, body: &[u8]| {
        if let Some((i, t)) = index_time(body) {
            let now = t0.elapsed().as_nanos() as u64;
            if spec.sample {
                res.lat_us
                    .push((now.saturating_sub(t) / 1000).min(u32::MAX as u64) as u32);
            }
            res.first.get_or_insert(i);
            res.last = Some(i);
            res.count += 1;
            shared.frames.fetch_add(1, Relaxed);
            shared.last_rx_ns.fetch_max(now, Relaxed);
        } else if spec.proto == Proto::Gateway && body.windows(5).any(|w| w == b"\"gap\"") {
            res.gaps += 1;
        }
    };
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(Ok(msg)) = msg else { break };
        let data = match msg {
            Message::Text(t) => t.into(),
            Message::Binary(b) => b,
            _ => continue,
        };
        if spec.proto == Proto::Mqtt {
            mqbuf.extend_from_slice(&data);
            let r = &mut res;
            mqtt_packets(&mut mqbuf, |h, p| {
                if h >> 4 == 3 && p.len() >= 2 {
                    let tl = u16::from_be_bytes([p[0], p[1]]) as usize;
                    let skip = 2 + tl + if (h >> 1) & 3 > 0 { 2 } else { 0 };
                    if p.len() >= skip {
                        on_body(r, &p[skip..]);
                    }
                }
            });
        } else {
            on_body(&mut res, &data);
        }
    }
    res
}

// ---- source ----

fn body(i: u64, t: u64, size: usize, pad: &str) -> String {
    let head = format!("{{\"i\":{i},\"t\":{t},\"p\":\"");
    let n = size.saturating_sub(head.len() + 2).min(pad.len());
    format!("{head}{}\"}}", &pad[..n])
}

/// Publish `total` events at `rate`/s (open loop: event k is due at k/rate; a late
/// publisher sends at once, never waits to catch a tick). Stops at `deadline`.
/// Returns the number published.
async fn publish(
    feed: &Feed,
    total: u64,
    rate: u64,
    size: usize,
    t0: Instant,
    deadline: Instant,
    source_drops: Arc<AtomicU64>,
) -> u64 {
    let pad: Arc<str> = "x".repeat(size).into();
    let start = tokio::time::Instant::now();
    let due = move |k: u64| start + Duration::from_nanos(k * 1_000_000_000 / rate);
    let sent = Arc::new(AtomicU64::new(0));
    match feed {
        Feed::Emulator(em) => {
            // one in-flight send per publisher: enough publishers for the rate
            let n = rate.div_ceil(250).clamp(1, 8);
            let mut tasks = Vec::new();
            for j in 0..n {
                let (cs, pad, sent) = (em.connection_string(), pad.clone(), sent.clone());
                tasks.push(tokio::spawn(async move {
                    let mut p = Publisher::connect(&cs, "operational-events").await.unwrap();
                    let mut k = j;
                    while k < total && Instant::now() < deadline {
                        tokio::time::sleep_until(due(k)).await;
                        let t = t0.elapsed().as_nanos() as u64;
                        p.send_json("temp", &[], body(k, t, size, &pad), "application/json")
                            .await
                            .unwrap();
                        sent.fetch_add(1, Relaxed);
                        k += n;
                    }
                    let _ = p.close().await;
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
        Feed::NodeWs(addr) => {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/feed"))
                .await
                .unwrap();
            let mut k = 0;
            while k < total && Instant::now() < deadline {
                tokio::time::sleep_until(due(k)).await;
                let t = t0.elapsed().as_nanos() as u64;
                ws.send(Message::text(body(k, t, size, &pad)))
                    .await
                    .unwrap();
                sent.fetch_add(1, Relaxed);
                k += 1;
            }
            let _ = ws.close(None).await;
        }
        Feed::Mqtt(port) => {
            use rumqttc::{AsyncClient, MqttOptions, QoS};
            let mut opts = MqttOptions::new("bench-source", "127.0.0.1", *port);
            opts.set_keep_alive(Duration::from_secs(30));
            opts.set_max_packet_size(64 * 1024, 64 * 1024);
            let (client, mut el) = AsyncClient::new(opts, 1024);
            // Keep polling through errors: rumqttc reconnects on the next poll. A broker
            // that drops the publisher under load is reported, not a crash of the bench.
            let drops = source_drops.clone();
            let poll = tokio::spawn(async move {
                loop {
                    if el.poll().await.is_err() {
                        drops.fetch_add(1, Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            });
            let mut k = 0;
            while k < total && Instant::now() < deadline {
                tokio::time::sleep_until(due(k)).await;
                let t = t0.elapsed().as_nanos() as u64;
                client
                    .publish("bench/e", QoS::AtMostOnce, false, body(k, t, size, &pad))
                    .await
                    .unwrap();
                sent.fetch_add(1, Relaxed);
                k += 1;
            }
            // let the event loop write out what is queued
            tokio::time::sleep(Duration::from_millis(200)).await;
            // what follows is our own disconnect, not a drop
            let drops_during_run = source_drops.load(Relaxed);
            let _ = client.disconnect().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            poll.abort();
            source_drops.store(drops_during_run, Relaxed);
        }
    }
    sent.load(Relaxed)
}

// ---- one scenario ----

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

struct Outcome {
    json: serde_json::Value,
    row: Row,
}

#[derive(Clone)]
struct Row {
    peer: Peer,
    sc: Scenario,
    published_per_s: f64,
    delivered_per_s: f64,
    complete_pct: f64,
    missing: u64,
    p50: f64,
    p99: f64,
    max: f64,
    rss_mib: f64,
    cpu_pct: f64,
    softirq_pct: f64,
    syscw_per_frame: f64,
    client_cpu_pct: f64,
    gaps: u64,
    budget: Option<(f64, u64)>,
}

fn run_scenario(
    peer: Peer,
    sc: &Scenario,
    secs: f64,
    src_rt: &tokio::runtime::Runtime,
    cli_rt: &tokio::runtime::Runtime,
    print_budget: bool,
    count_syscalls: bool,
) -> Outcome {
    let server = match peer {
        Peer::Gateway => src_rt.block_on(start_gateway(false, sc.panels, print_budget)),
        Peer::GatewayMirror => src_rt.block_on(start_gateway(true, sc.panels, print_budget)),
        Peer::Node => start_node(),
        Peer::Mosquitto => start_mosquitto_ws(),
    };
    let pid = server.proc.pid();
    let shared = Arc::new(Shared {
        t0: Instant::now(),
        frames: AtomicU64::new(0),
        last_rx_ns: AtomicU64::new(0),
        ready: AtomicUsize::new(0),
    });
    let total = (sc.rate as f64 * secs) as u64;
    let stalled = sc.panels * sc.stalled_pct / 100;
    let proto = match peer {
        Peer::Gateway | Peer::GatewayMirror => Proto::Gateway,
        Peer::Node => Proto::Plain,
        Peer::Mosquitto => Proto::Mqtt,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut clients = Vec::new();
    for i in 0..sc.panels {
        let spec = ClientSpec {
            proto,
            addr: server.ws,
            path: server.path,
            // the stalled panels spread among the others
            stall: stalled > 0
                && i % (sc.panels / stalled) == 1
                && i / (sc.panels / stalled) < stalled,
            sample: i % (sc.panels / SAMPLED_PANELS).max(1) == 0,
            capacity: total as usize + 16,
            id: i,
        };
        clients.push(cli_rt.spawn(panel(spec, shared.clone(), stop_rx.clone())));
        if i % 50 == 49 {
            // do not flood the listen backlog
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let t_connect = Instant::now();
    while shared.ready.load(Relaxed) < sc.panels {
        assert!(
            t_connect.elapsed() < Duration::from_secs(60),
            "{}: only {} of {} panels connected",
            peer.name(),
            shared.ready.load(Relaxed),
            sc.panels
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));

    let before = proc_sample(pid);
    let cli_before = procfs::thread_ticks("panel-cli");
    let sirq_before = core0_softirq();
    let perf = if count_syscalls {
        perf_writes_start(pid)
    } else {
        None
    };
    let start = Instant::now();
    let start_ns = shared.t0.elapsed().as_nanos() as u64;
    let deadline = start + Duration::from_secs_f64(secs + 2.0);
    let source_drops = Arc::new(AtomicU64::new(0));
    let published = src_rt.block_on(publish(
        &server.feed,
        total,
        sc.rate,
        sc.size,
        shared.t0,
        deadline,
        source_drops.clone(),
    ));
    let source_drops = source_drops.load(Relaxed);
    if source_drops > 0 {
        eprintln!(
            "{}: the source's broker connection dropped {source_drops} time(s) during the run",
            peer.name()
        );
        // why the broker dropped the source, from its own log
        let log = std::fs::read_to_string(server.dir.join("mosquitto.log")).unwrap_or_default();
        for line in log.lines().filter(|l| l.contains("bench-source")).take(5) {
            eprintln!("  mosquitto: {line}");
        }
    }
    let pub_secs = start.elapsed().as_secs_f64();
    // drain: until every reading panel has all, or nothing arrives for 1 s (max 10 s)
    let reading = (sc.panels - stalled) as u64;
    let drain0 = Instant::now();
    let mut last = (shared.frames.load(Relaxed), Instant::now());
    while shared.frames.load(Relaxed) < reading * published
        && last.1.elapsed() < Duration::from_secs(1)
        && drain0.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
        let f = shared.frames.load(Relaxed);
        if f != last.0 {
            last = (f, Instant::now());
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let after = proc_sample(pid);
    let cli_after = procfs::thread_ticks("panel-cli");
    let sirq_after = core0_softirq();
    let perf_writes = perf_writes_stop(perf);
    let ingested = match &server.feed {
        Feed::Emulator(em) => em.stats().get(ENTITY).map_or(0, |s| s.completed),
        _ => published,
    };
    stop_tx.send(true).unwrap();
    let results: Vec<ClientResult> = cli_rt.block_on(async {
        let mut v = Vec::new();
        for c in clients {
            v.push(c.await.unwrap());
        }
        v
    });
    let budget = server.budget;
    drop_server(server, src_rt);

    let frames = shared.frames.load(Relaxed);
    let rx_secs = (shared.last_rx_ns.load(Relaxed).saturating_sub(start_ns)) as f64 / 1e9;
    let mut lat: Vec<u32> = results
        .iter()
        .flat_map(|r| r.lat_us.iter().copied())
        .collect();
    lat.sort_unstable();
    let readers: Vec<&ClientResult> = results.iter().filter(|r| !r.stalled).collect();
    let missing: u64 = readers
        .iter()
        .map(|r| published - r.count.min(published))
        .sum();
    let complete_pct = if published == 0 {
        0.0
    } else {
        100.0 * readers.iter().map(|r| r.count).sum::<u64>() as f64
            / (readers.len() as u64 * published) as f64
    };
    let first = readers.iter().filter_map(|r| r.first).min();
    let last_i = readers.iter().filter_map(|r| r.last).max();
    let complete_panels = readers.iter().filter(|r| r.count == published).count();
    let gaps: u64 = results.iter().map(|r| r.gaps).sum();
    let ticks_per_s = 100.0;
    let cpu_pct = (after.ticks - before.ticks) as f64 / ticks_per_s / wall * 100.0;
    let client_cpu_pct = (cli_after - cli_before) as f64 / ticks_per_s / wall * 100.0;
    let (s0, a0) = sirq_before;
    let (s1, a1) = sirq_after;
    let softirq_pct = if a1 > a0 {
        100.0 * (s1 - s0) as f64 / (a1 - a0) as f64
    } else {
        0.0
    };
    let row = Row {
        peer,
        sc: sc.clone(),
        published_per_s: published as f64 / pub_secs,
        delivered_per_s: if rx_secs > 0.0 {
            frames as f64 / rx_secs
        } else {
            0.0
        },
        complete_pct,
        missing,
        p50: pct(&lat, 0.50),
        p99: pct(&lat, 0.99),
        max: lat.last().map_or(f64::NAN, |v| *v as f64 / 1000.0),
        rss_mib: after.hwm_kib as f64 / 1024.0,
        cpu_pct,
        softirq_pct,
        syscw_per_frame: match perf_writes {
            Some(w) if frames > 0 => w as f64 / frames as f64,
            _ => f64::NAN,
        },
        client_cpu_pct,
        gaps,
        budget,
    };
    let json = serde_json::json!({
        "scenario": sc.kind,
        "server": peer.name(),
        "panels": sc.panels,
        "stalled": stalled,
        "event_bytes": sc.size,
        "rate": sc.rate,
        "secs": secs,
        "published": published,
        "published_per_s": round(row.published_per_s),
        "ingested": ingested,
        "frames": frames,
        "delivered_per_s": round(row.delivered_per_s),
        "expected_frames": reading * published,
        "complete_pct": round(complete_pct),
        "complete_panels": complete_panels,
        "reading_panels": reading,
        "first": first,
        "last": last_i,
        "missing": missing,
        "gaps": gaps,
        "source_connection_drops": source_drops,
        "latency_ms": {"p50": round(row.p50), "p99": round(row.p99), "max": round(row.max), "samples": lat.len()},
        "server_rss_hwm_mib": round(row.rss_mib),
        "server_cpu_pct": round(cpu_pct),
        "core0_softirq_pct": round(softirq_pct),
        "write_syscalls": perf_writes,
        "write_syscalls_per_frame": perf_writes.map(|_| round(row.syscw_per_frame)),
        "client_cpu_pct": round(client_cpu_pct),
        "budget_total_mib": budget.map(|b| round(b.0)),
        "budget_memory_mib": budget.map(|b| b.1),
        "rss_within_budget": budget.map(|b| row.rss_mib <= b.0),
        "loadavg": loadavg(),
    });
    Outcome { json, row }
}

fn drop_server(server: Server, src_rt: &tokio::runtime::Runtime) {
    let mut server = server;
    let feed = std::mem::replace(&mut server.feed, Feed::Mqtt(0));
    drop(server);
    if let Feed::Emulator(em) = feed {
        src_rt.block_on(em.shutdown());
    }
}

fn round(v: f64) -> f64 {
    if v.is_finite() {
        (v * 100.0).round() / 100.0
    } else {
        -1.0
    }
}

fn scenarios(quick: bool) -> Vec<Scenario> {
    let s = |kind, panels, size, rate, stalled_pct| Scenario {
        kind,
        panels,
        size,
        rate,
        stalled_pct,
    };
    if quick {
        return vec![
            s("base", 100, 256, 500, 0),
            s("stall", 100, 256, 500, 5),
            s("firehose", 100, 4096, 2000, 0),
        ];
    }
    vec![
        s("base", 100, 256, 100, 0),
        s("base", 100, 256, 1000, 0),
        s("base", 100, 4096, 500, 0),
        s("base", 1000, 256, 100, 0),
        s("stall", 1000, 256, 100, 5),
        s("base", 1000, 256, 200, 0),
        s("base", 1000, 4096, 50, 0),
        s("firehose", 1000, 4096, 400, 0),
        s("firehose", 1000, 256, 1000, 0),
        s("base", 5000, 256, 20, 0),
        s("base", 10000, 256, 10, 0),
    ]
}

fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| scenario | server | panels | bytes | rate/s | published/s | delivered/s | complete % | missing | p50 ms | p99 ms | max ms | RSS MiB | CPU % | softirq % | writes/frame | client CPU % |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let kind = if r.sc.stalled_pct > 0 {
            format!("stall {}%", r.sc.stalled_pct)
        } else {
            r.sc.kind.to_string()
        };
        s += &format!(
            "| {kind} | {} | {} | {} | {} | {:.0} | {:.0} | {:.2} | {} | {:.1} | {:.1} | {:.1} | {:.1}{} | {:.0} | {:.1} | {} | {:.0} |\n",
            r.peer.name(),
            r.sc.panels,
            r.sc.size,
            r.sc.rate,
            r.published_per_s,
            r.delivered_per_s,
            r.complete_pct,
            r.missing,
            r.p50,
            r.p99,
            r.max,
            r.rss_mib,
            r.budget
                .map(|b| format!(" (budget {:.1})", b.0))
                .unwrap_or_default(),
            r.cpu_pct,
            r.softirq_pct,
            if r.syscw_per_frame.is_finite() {
                format!("{:.3}", r.syscw_per_frame)
            } else {
                "–".to_string()
            },
            r.client_cpu_pct,
        );
        if r.gaps > 0 {
            s.pop();
            s += &format!(" gaps {}\n", r.gaps);
        }
    }
    s
}

fn ratios(rows: &[Row]) -> String {
    let mut s = String::from(
        "| scenario | panels | bytes | rate/s | peer | delivered/s gw÷peer | p99 gw÷peer | RSS gw÷peer |\n|---|---:|---:|---:|---|---:|---:|---:|\n",
    );
    for gw in rows.iter().filter(|r| r.peer == Peer::Gateway) {
        for p in rows.iter().filter(|r| {
            r.peer != Peer::Gateway
                && r.sc.kind == gw.sc.kind
                && r.sc.same_load(&gw.sc)
                && r.sc.stalled_pct == gw.sc.stalled_pct
        }) {
            s += &format!(
                "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} |\n",
                if gw.sc.stalled_pct > 0 {
                    "stall"
                } else {
                    gw.sc.kind
                },
                gw.sc.panels,
                gw.sc.size,
                gw.sc.rate,
                p.peer.name(),
                gw.delivered_per_s / p.delivered_per_s,
                gw.p99 / p.p99,
                gw.rss_mib / p.rss_mib,
            );
        }
    }
    s
}

/// Per server: the reading panels' completeness and p99 with stalled panels, against the
/// run with the same panels, size and rate and no stalls (the bound: 100 % and
/// p99 within 1.5×), and the server's peak RSS in both.
fn slow_consumers(rows: &[Row]) -> String {
    let mut s = String::from(
        "| server | panels | bytes | rate/s | stalled | complete % | p99 ms (no stall) | p99 ms (stall) | p99 ratio | RSS MiB (no stall → stall) | within 1.5× |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    for st in rows.iter().filter(|r| r.sc.stalled_pct > 0) {
        let Some(base) = rows
            .iter()
            .find(|r| r.peer == st.peer && r.sc.stalled_pct == 0 && r.sc.same_load(&st.sc))
        else {
            continue;
        };
        let ratio = st.p99 / base.p99;
        s += &format!(
            "| {} | {} | {} | {} | {}% | {:.2} | {:.1} | {:.1} | {:.2} | {:.1} → {:.1} | {} |\n",
            st.peer.name(),
            st.sc.panels,
            st.sc.size,
            st.sc.rate,
            st.sc.stalled_pct,
            st.complete_pct,
            base.p99,
            st.p99,
            ratio,
            base.rss_mib,
            st.rss_mib,
            if st.complete_pct >= 100.0 && ratio <= 1.5 {
                "yes"
            } else {
                "NO"
            },
        );
    }
    s
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken from the command line
    let quick = std::env::var("PIPELINE_BENCH_QUICK").is_ok_and(|v| v != "0");
    let syscalls = std::env::var("PIPELINE_BENCH_SYSCALLS").is_ok_and(|v| v != "0");
    let secs: f64 = std::env::var("PIPELINE_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 3.0 } else { 6.0 });
    let only: Option<Vec<String>> = std::env::var("PIPELINE_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let peers: Vec<Peer> = Peer::all()
        .into_iter()
        .filter(|p| {
            only.as_ref()
                .is_none_or(|o| o.iter().any(|n| n == p.name()))
        })
        .collect();
    if cores() >= 2 {
        // this process (clients, emulator, sources) on core 1, servers on core 0
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status();
    }
    let src_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("source")
        .enable_all()
        .build()
        .unwrap();
    let cli_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("panel-cli")
        .enable_all()
        .build()
        .unwrap();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    println!(
        "pipeline bench: {} cores ({cpu}), {mem}, load {}, {secs} s per scenario, servers {}pinned to core 0, gateway {}, write syscalls {}",
        cores(),
        loadavg(),
        if pinned() { "" } else { "not " },
        gateway_binary(),
        if syscalls {
            "counted with perf (slows the servers)"
        } else {
            "not counted (PIPELINE_BENCH_SYSCALLS=1)"
        }
    );
    let t_all = Instant::now();
    let mut rows = Vec::new();
    let mut printed = std::collections::HashSet::new();
    // PIPELINE_BENCH_SCENARIOS=firehose:1000:4096:400,base:100:256:1000 runs only those
    let picked: Option<Vec<String>> = std::env::var("PIPELINE_BENCH_SCENARIOS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let wanted = |sc: &Scenario| {
        let name = format!("{}:{}:{}:{}", sc.kind, sc.panels, sc.size, sc.rate);
        picked.as_ref().is_none_or(|p| p.contains(&name))
    };
    for sc in scenarios(quick).into_iter().filter(|sc| wanted(sc)) {
        for &peer in &peers {
            let first = printed.insert((peer, sc.panels));
            let out = run_scenario(peer, &sc, secs, &src_rt, &cli_rt, first, syscalls);
            println!("{}", out.json);
            rows.push(out.row);
        }
    }
    println!("\n{}", markdown(&rows));
    println!("gateway ÷ peer:\n\n{}", ratios(&rows));
    println!(
        "slow consumers (stalled run ÷ the same load without stalls):\n\n{}",
        slow_consumers(&rows)
    );
    for r in rows.iter().filter(|r| r.budget.is_some()) {
        let (total, mib) = r.budget.unwrap();
        if r.rss_mib > total {
            println!(
                "BUDGET EXCEEDED: {} {} panels {} B {}/s: peak RSS {:.1} MiB > budget {:.1} MiB (memory_mib {mib})",
                r.peer.name(),
                r.sc.panels,
                r.sc.size,
                r.sc.rate,
                r.rss_mib,
                total
            );
        }
    }
    println!(
        "done in {:.0} s, load {}",
        t_all.elapsed().as_secs_f64(),
        loadavg()
    );
}
